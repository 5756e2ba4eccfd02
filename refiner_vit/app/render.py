"""The app's pictures, drawn with NumPy and Pillow (a click on a patch must redraw them well within a second), and
the metrics as tables for plots the browser draws.

Maps are drawn as in ``refiner attention``'s figures (:mod:`refiner_vit.analysis.plots`): each map over a dimmed
grey copy of the input, on its own colour scale (sequential from 0 for non-negative maps, diverging around 0 for
refined maps with negative weights), the query patch outlined.
"""
import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from ..analysis.plots import _colour_scale
from .session import LayerMaps

__all__ = ['METRICS', 'PICTURE_SIZE', 'describe_query', 'expanded_picture', 'input_picture', 'maps_picture',
           'metric_tables', 'top_labels']

PICTURE_SIZE = 320  # side of the clickable input picture, in screen pixels
PANEL = 120  # side of one map panel
BLOCKS_PER_BAND = 8  # blocks side by side before the picture wraps
LABEL_HEIGHT = 18
QUERY_COLOUR = (0, 255, 255)
Patch = Optional[Tuple[int, int]]
# The metrics of refiner_vit.analysis the page plots per block: key in layer_stats(), plot title.
METRICS = (
    ('head_similarity', 'head similarity (lower: more diverse heads)'),
    ('mean_distance', 'mean attention distance (patches)'),
    ('layer_similarity', 'similarity to the previous block'),
)


@functools.cache
def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _upscale(values: np.ndarray, size: int) -> np.ndarray:
    """``values`` (rows, cols[, 3]) blown up to ``size x size`` by nearest neighbour: each patch a flat block."""
    rows, cols = values.shape[:2]
    return values[np.arange(size) * rows // size][:, np.arange(size) * cols // size]


def _outline(draw: ImageDraw.ImageDraw, origin: Tuple[int, int], size: int, grid: Tuple[int, int], patch: Patch,
             ) -> None:
    if patch is None:
        return
    (x0, y0), (rows, cols) = origin, grid
    row, col = patch
    box = (x0 + col * size // cols, y0 + row * size // rows, x0 + (col + 1) * size // cols - 1,
           y0 + (row + 1) * size // rows - 1)
    draw.rectangle(box, outline=QUERY_COLOUR, width=2)


def input_picture(image: np.ndarray, grid: Tuple[int, int], patch: Patch) -> np.ndarray:
    """The model's input at :data:`PICTURE_SIZE` with the patch grid and the query patch: the picture one clicks."""
    picture = _upscale(image, PICTURE_SIZE)
    picture = (picture * 255).round().astype(np.uint8)
    rows, cols = grid
    for r in range(1, rows):
        picture[r * PICTURE_SIZE // rows, :] = picture[r * PICTURE_SIZE // rows, :] // 2 + 64
    for c in range(1, cols):
        picture[:, c * PICTURE_SIZE // cols] = picture[:, c * PICTURE_SIZE // cols] // 2 + 64
    shown = Image.fromarray(picture)
    _outline(ImageDraw.Draw(shown), (0, 0), PICTURE_SIZE, grid, patch)
    return np.asarray(shown)


def _panel(image: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One map over the dimmed grey input, ``PANEL x PANEL`` RGB uint8."""
    cmap, vmin, vmax = _colour_scale(torch.from_numpy(values))
    scaled = (_upscale(values, PANEL) - vmin) / (vmax - vmin)
    colours = colormaps[cmap](np.clip(scaled, 0, 1))[..., :3]
    grey = _upscale(image, PANEL).mean(axis=2, keepdims=True) / 2
    return ((0.25 * grey + 0.75 * colours) * 255).round().astype(np.uint8)


def _sheet(columns: int, rows: int, left: int) -> Tuple[Image.Image, ImageDraw.ImageDraw]:
    sheet = Image.new('RGB', (left + columns * (PANEL + 4), rows * (PANEL + LABEL_HEIGHT)), 'white')
    return sheet, ImageDraw.Draw(sheet)


def maps_picture(image: np.ndarray, layers: Sequence[LayerMaps], grid: Tuple[int, int], patch: Patch) -> np.ndarray:
    """Every layer's raw map and, below it, its refined map (the one that multiplies V), in bands of
    :data:`BLOCKS_PER_BAND` blocks."""
    refines = any(layer.refined is not None for layer in layers)
    kinds = ('raw', 'refined') if refines else ('raw',)
    bands = [layers[i:i + BLOCKS_PER_BAND] for i in range(0, len(layers), BLOCKS_PER_BAND)]
    left = 60
    sheet, draw = _sheet(min(len(layers), BLOCKS_PER_BAND), len(bands) * len(kinds), left)
    font = _font()
    for b, band in enumerate(bands):
        for k, kind in enumerate(kinds):
            y = (b * len(kinds) + k) * (PANEL + LABEL_HEIGHT)
            draw.text((2, y + LABEL_HEIGHT + PANEL // 2 - 6), kind, fill='black', font=font)
            for i, layer in enumerate(band):
                x = left + i * (PANEL + 4)
                values = layer.raw if kind == 'raw' else layer.refined
                draw.text((x, y + 2), f'block {layer.block} ({layer.kind})', fill='black', font=font)
                if values is None:
                    draw.rectangle((x, y + LABEL_HEIGHT, x + PANEL - 1, y + LABEL_HEIGHT + PANEL - 1), fill='#eeeeee')
                    draw.text((x + 8, y + LABEL_HEIGHT + PANEL // 2 - 6), 'not refined', fill='grey', font=font)
                    continue
                sheet.paste(Image.fromarray(_panel(image, values)), (x, y + LABEL_HEIGHT))
                _outline(draw, (x, y + LABEL_HEIGHT), PANEL, grid, patch)
    return np.asarray(sheet)


def expanded_picture(image: np.ndarray, weights: np.ndarray, maps: np.ndarray, grid: Tuple[int, int], patch: Patch,
                     ) -> np.ndarray:
    """A released refiner's expanded maps, each titled with the reduction weight the chosen head gives it."""
    per_row = BLOCKS_PER_BAND
    rows = -(-len(maps) // per_row)
    sheet, draw = _sheet(min(len(maps), per_row), rows, 0)
    font = _font()
    for i, (weight, values) in enumerate(zip(weights, maps)):
        x, y = (i % per_row) * (PANEL + 4), (i // per_row) * (PANEL + LABEL_HEIGHT)
        draw.text((x, y + 2), f'weight {weight:+.3f}', fill='black', font=font)
        sheet.paste(Image.fromarray(_panel(image, values)), (x, y + LABEL_HEIGHT))
        _outline(draw, (x, y + LABEL_HEIGHT), PANEL, grid, patch)
    return np.asarray(sheet)


def describe_query(patch: Patch) -> str:
    """How the page names the query token."""
    return 'the class token' if patch is None else f'the patch at row {patch[0]}, column {patch[1]}'


def top_labels(top: List[Tuple[str, float]]) -> dict:
    """The top-k as Gradio's Label wants it: name -> probability."""
    return dict(top)


def metric_tables(stats: List[Dict[str, Any]]) -> Tuple[Any, ...]:
    """For each of :data:`METRICS`, a pandas table of rows ``(block, value, map)``: the raw and refined maps of every
    block where the metric is defined (``layer_stats()`` gives None elsewhere). pandas comes with Gradio."""
    import pandas as pd

    tables = []
    for key, _ in METRICS:
        rows = [(layer['block'], layer[which][key], which) for layer in stats for which in ('raw', 'refined')
                if layer[which] is not None and layer[which][key] is not None]
        tables.append(pd.DataFrame(rows, columns=['block', 'value', 'map']))
    return tuple(tables)
