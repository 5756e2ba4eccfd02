"""``refiner attention``: raw and refined attention maps of one image, their metrics, and pictures.

Writes ``attention.png`` (class-token maps per head over the image for the chosen layers, raw and refined,
plus attention rollout), ``attention_stats.json`` (metrics of every attention layer) and ``metrics.png``
(metrics against depth; with ``--compare`` a second model's curves on the same axes).
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from ..errors import UsageError
from .model_source import add_model_options, load_model

EXAMPLE = """examples:
  refiner attention --model refiner_vit_s_patch16_224 --checkpoint weights.pth --image cat.jpg --output attn/
  refiner attention --model runs/demo --image docs/examples/digits/7/val_0.png --output runs/demo/attention
"""

# Layers drawn in attention.png when --layers is not given: all of them up to this many, else evenly spaced.
DEFAULT_SHOWN = 4


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        'attention',
        help='draw raw and refined attention maps of an image and measure their diversity and locality',
        description=__doc__, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p)
    p.add_argument('--image', required=True, help='input image file (any format Pillow reads)')
    p.add_argument('--output', required=True, metavar='DIR',
                   help='output folder for attention.png, attention_stats.json, metrics.png')
    p.add_argument('--layers', type=int, nargs='+', default=None,
                   help=f'attention layers to draw in attention.png (negative from the end); default: all, or '
                        f'{DEFAULT_SHOWN} evenly spaced ones. Metrics always cover every layer')
    p.add_argument('--compare', default=None, metavar='M2',
                   help='a second model (same forms as --model) whose metric curves are drawn beside the first')
    p.add_argument('--compare-checkpoint', default=None, metavar='C2', help='weights of the --compare model')
    p.set_defaults(func=run, runs_models=True)


def load_image(path: str, data_config: Dict[str, Any]) -> Tuple[Any, Any]:
    """The image preprocessed with the model's data config, and the same pixels in [0, 1] for display."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform

    try:
        with Image.open(path) as image:
            image = image.convert('L' if data_config['input_size'][0] == 1 else 'RGB')
    except FileNotFoundError as e:
        raise UsageError(f'{path}: no such file') from e
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f'{path}: not a readable image ({e})') from e
    x = create_transform(**data_config)(image).unsqueeze(0)
    mean = torch.tensor(data_config['mean']).view(-1, 1, 1)
    std = torch.tensor(data_config['std']).view(-1, 1, 1)
    shown = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return x, np.repeat(shown, 3, axis=2) if shown.shape[2] == 1 else shown


def _default_shown(count: int) -> List[int]:
    if count <= DEFAULT_SHOWN:
        return list(range(count))
    return sorted({round(i * (count - 1) / (DEFAULT_SHOWN - 1)) for i in range(DEFAULT_SHOWN)})


def _analyse(args: argparse.Namespace, name: str, checkpoint: Any, first: bool):
    from ..analysis import attention_maps, token_grid

    resolved = load_model(args, name, checkpoint, args.model_kwargs if first else [])
    x, shown = load_image(args.image, resolved.data_config)
    try:
        records = attention_maps(resolved.model, x)
    except TypeError as e:
        raise UsageError(f'--model {name}: {e}') from e
    grid = token_grid(resolved.model, x.shape[-2:])
    return records, grid, shown


def _save_figure(fig, path: Path) -> None:
    from ..utils.io import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format='png'))


def run(args: argparse.Namespace) -> int:
    from ..analysis import layer_stats
    from ..analysis.plots import attention_figure, metrics_figure  # matplotlib only when drawing
    from ..utils.io import atomic_write

    out = Path(args.output)
    records, grid, image = _analyse(args, args.model, args.checkpoint, first=True)
    count = len(records)
    if args.layers is None:
        shown = _default_shown(count)
    else:
        bad = [i for i in args.layers if not -count <= i < count]
        if bad:
            raise UsageError(f'--layers {bad}: out of range, {args.model} has {count} attention layers')
        shown = sorted({i % count for i in args.layers})
    stats = layer_stats(records, grid)
    result = {'model': args.model, 'checkpoint': args.checkpoint, 'image': args.image, 'grid': list(grid),
              'layers': stats}
    curves = {args.model: stats}
    if args.compare:
        other, other_grid, _ = _analyse(args, args.compare, args.compare_checkpoint, first=False)
        other_stats = layer_stats(other, other_grid)
        result['compare'] = {'model': args.compare, 'checkpoint': args.compare_checkpoint,
                             'grid': list(other_grid), 'layers': other_stats}
        curves[args.compare] = other_stats

    title = f'{args.model} on {Path(args.image).name}: class-token attention'
    _save_figure(attention_figure(image, records, grid, shown, title), out / 'attention.png')
    _save_figure(metrics_figure(curves, 'attention metrics against depth'), out / 'metrics.png')
    atomic_write(out / 'attention_stats.json', lambda f: f.write(json.dumps(result, indent=1).encode()))
    kinds = ', '.join(f'{r["block"]}:{r["kind"]}' for r in records)
    print(f'{count} attention layers ({kinds})')
    print(f'wrote {out / "attention.png"}, {out / "attention_stats.json"}, {out / "metrics.png"}')
    return 0
