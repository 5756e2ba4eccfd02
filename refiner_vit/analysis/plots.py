"""Pictures of attention: class-token maps per head over the image, rollout, metrics against depth.

Figures are built with matplotlib's object API (no pyplot state), so they work headless and in threads;
the caller saves them.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .metrics import Grid, effective_maps, rollout

__all__ = ['attention_figure', 'metrics_figure', 'query_map']

METRICS = (
    ('mean_distance', 'mean attention distance (patches)'),
    ('head_similarity', 'head similarity (cosine; lower = more diverse)'),
    ('layer_similarity', 'similarity to previous layer (cosine)'),
    ('entropy', 'entropy (nats)'),
)


def query_map(maps: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``(H, rows, cols)``: what the class token attends to on the patch grid, for the first image.

    Without prefix tokens, the mean over query patches is shown instead.
    """
    prefix = maps.shape[-1] - grid[0] * grid[1]
    rows = maps[0, :, 0, prefix:] if prefix else maps[0, :, :, :].mean(dim=1)
    return rows.reshape(-1, *grid).float()


def _overlay(ax: Axes, image: np.ndarray, values: np.ndarray, cmap: str, vmin: float, vmax: float):
    """The map over a dimmed grey copy of the image, so that the map's colours read true."""
    height, width = image.shape[:2]
    ax.imshow(image.mean(axis=2), cmap='gray', vmin=0, vmax=2, extent=(0, width, height, 0))
    shown = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.75, extent=(0, width, height, 0),
                      interpolation='nearest')
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def _colour_scale(values: torch.Tensor) -> Tuple[str, float, float]:
    """A sequential map from 0 for non-negative maps; a diverging one centred on 0 otherwise."""
    low, high = values.min().item(), values.max().item()
    if low >= 0:
        return 'inferno', 0.0, max(high, 1e-12)
    bound = max(abs(low), abs(high))
    return 'coolwarm', -bound, bound


def _map_row(axes: Sequence[Axes], image: np.ndarray, maps: torch.Tensor, grid: Grid, label: str):
    """One panel per head and one for their mean, sharing a colour scale; the last axes holds the colour bar."""
    heads = query_map(maps, grid)
    panels = torch.cat((heads, heads.mean(dim=0, keepdim=True)))
    cmap, vmin, vmax = _colour_scale(panels)
    shown = None
    for h, (ax, values) in enumerate(zip(axes[:-1], panels)):
        shown = _overlay(ax, image, values.numpy(), cmap, vmin, vmax)
        ax.set_title(f'head {h}' if h < len(heads) else 'mean of heads', fontsize=8)
    axes[0].set_ylabel(label, fontsize=8)
    axes[-1].figure.colorbar(shown, cax=axes[-1])


def attention_figure(
        image: np.ndarray,
        records: List[Dict[str, Any]],
        grid: Grid,
        show: Sequence[int],
        title: str,
) -> Figure:
    """Grid of class-token maps: for each record index in ``show`` a raw row and, if refined, a refined row.

    The top row shows the input and the attention rollout over all ``records`` (raw maps, and the maps
    the layers attend with when any layer refines).

    Args:
        image: The preprocessed input as ``(height, width, 3)`` floats in [0, 1].
        records: Records of :func:`~refiner_vit.analysis.attention_maps` (all layers, for the rollout).
        grid: Patch grid (rows, cols).
        show: Indices into ``records`` of the layers to draw.
        title: Figure title.
    """
    heads = records[0]['raw'].shape[1]
    refines = any(r['refined'] is not None for r in records)
    rows = [('rollout', None)]
    for index in show:
        rows.append(('raw', records[index]))
        if records[index]['refined'] is not None:
            rows.append(('refined', records[index]))
    panels = heads + 1
    fig = Figure(figsize=(1.5 * panels + 1.2, 1.55 * len(rows) + 0.5), dpi=80, layout='constrained')
    axes = fig.subplots(len(rows), panels + 1, squeeze=False, width_ratios=[1] * panels + [0.08])
    for r, (which, record) in enumerate(rows[1:], start=1):
        maps = record['raw'] if which == 'raw' else record['refined']
        label = f'layer {record["block"]} ({record["kind"]})\n{which}'
        _map_row(axes[r], image, maps, grid, label)

    top = axes[0]
    top[0].imshow(image)
    top[0].set_title('input', fontsize=8)
    rollouts = [('rollout (raw maps)', [r['raw'] for r in records])]
    if refines:
        rollouts.append(('rollout (maps used)', [effective_maps(r) for r in records]))
    shown = None
    for ax, (name, layer_maps) in zip(top[1:], rollouts):
        values = query_map(rollout(layer_maps).unsqueeze(1), grid)[0]
        shown = _overlay(ax, image, values.numpy(), 'inferno', 0.0, values.max().item())
        ax.set_title(name, fontsize=8)
    for ax in top[:-1]:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in top[1 + len(rollouts):-1]:
        ax.set_axis_off()
    fig.colorbar(shown, cax=top[-1])
    fig.suptitle(title, fontsize=10)
    return fig


def metrics_figure(stats: Dict[str, List[Dict[str, Any]]], title: Optional[str] = None) -> Figure:
    """Metrics against depth, raw (solid) vs refined (dashed), one colour per model.

    Args:
        stats: ``{model label: layer_stats(...)}``; several models are drawn on the same axes.
        title: Figure title.
    """
    fig = Figure(figsize=(10, 6.5), dpi=80, layout='constrained')
    axes = fig.subplots(2, 2).flatten()
    colours = ['tab:blue', 'tab:orange', 'tab:green', 'tab:red']
    for ax, (key, label) in zip(axes, METRICS):
        for colour, (model, layers) in zip(colours * len(stats), stats.items()):
            for which, style in (('raw', 'o-'), ('refined', 's--')):
                points = [(layer['block'], layer[which][key]) for layer in layers
                          if layer[which] is not None and layer[which][key] is not None]
                if points:
                    x, y = zip(*points)
                    ax.plot(x, y, style, color=colour, label=f'{model}: {which}', markersize=4)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel('attention layer')
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc='outside lower center', ncol=min(4, len(names)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
