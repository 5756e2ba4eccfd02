"""``refiner attention``: raw and refined attention maps of one image, their metrics, and pictures.

Writes ``attention.png`` (class-token maps per head over the image for the chosen layers, raw and refined,
plus attention rollout), ``attention_stats.json`` (metrics of every attention layer) and ``metrics.png``
(metrics against depth; with ``--compare`` a second model's curves on the same axes).
"""
import argparse
import json
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import timm
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import nn

from ..analysis import attention_maps, layer_stats, token_grid
from ..errors import UsageError
from ..io import atomic_write
from ..models.loading import load_weights, read_weights

# Weight files looked for in a timm local-dir model folder, in this order.
LOCAL_DIR_WEIGHTS = ('model.safetensors', 'pytorch_model.bin', 'model.pth')
# Layers drawn in attention.png when --layers is not given: all of them up to this many, else evenly spaced.
DEFAULT_SHOWN = 4


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        'attention',
        help='draw raw and refined attention maps of an image and measure their diversity and locality',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument('--model', required=True,
                   help="timm model name (e.g. refiner_vit_s_patch16_224, deit_small_patch16_224) or "
                        "'local-dir:FOLDER' with a timm config.json and weights")
    p.add_argument('--checkpoint', default=None,
                   help='weights: a state dict (.safetensors or torch file), a dict holding it under "model" or '
                        '"state_dict", or the authors\' Refiner-ViT checkpoint; random weights when omitted')
    p.add_argument('--image', required=True, help='input image file (any format Pillow reads)')
    p.add_argument('--out', required=True, help='output folder for attention.png, attention_stats.json, metrics.png')
    p.add_argument('--layers', type=int, nargs='+', default=None,
                   help=f'attention layers to draw in attention.png (negative from the end); default: all, or '
                        f'{DEFAULT_SHOWN} evenly spaced ones. Metrics always cover every layer')
    p.add_argument('--compare', default=None, metavar='M2',
                   help='a second model (same forms as --model) whose metric curves are drawn beside the first')
    p.add_argument('--compare-checkpoint', default=None, metavar='C2', help='weights of the --compare model')
    p.set_defaults(func=run)


def _local_dir_weights(name: str) -> Optional[str]:
    folder = Path(name[len('local-dir:'):])
    found = [folder / f for f in LOCAL_DIR_WEIGHTS if (folder / f).is_file()]
    if not found:
        raise UsageError(f'{folder}: no weights file ({", ".join(LOCAL_DIR_WEIGHTS)}); pass --checkpoint')
    return str(found[0])


def load_model(name: str, checkpoint: Optional[str]) -> nn.Module:
    """Build ``name`` with timm and load ``checkpoint`` into it without executing code; eval mode.

    The number of classes follows the checkpoint's ``head.weight`` when it has one.
    """
    if checkpoint is None and name.startswith('local-dir:'):
        checkpoint = _local_dir_weights(name)
    state = None if checkpoint is None else read_weights(checkpoint)
    kwargs = {}
    if state is not None and 'head.weight' in state:
        kwargs['num_classes'] = state['head.weight'].shape[0]
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise UsageError(f'--model {name}: cannot build it ({e})') from e
    if state is not None:
        load_weights(model, state, checkpoint)
    return model.eval()


def load_image(path: str, model: nn.Module) -> Tuple[torch.Tensor, np.ndarray]:
    """The image preprocessed with the model's data config, and the same pixels in [0, 1] for display."""
    config = resolve_data_config(model=model)
    try:
        with Image.open(path) as image:
            image = image.convert('L' if config['input_size'][0] == 1 else 'RGB')
    except FileNotFoundError as e:
        raise UsageError(f'{path}: no such file') from e
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f'{path}: not a readable image ({e})') from e
    x = create_transform(**config)(image).unsqueeze(0)
    mean = torch.tensor(config['mean']).view(-1, 1, 1)
    std = torch.tensor(config['std']).view(-1, 1, 1)
    shown = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return x, np.repeat(shown, 3, axis=2) if shown.shape[2] == 1 else shown


def _default_shown(count: int) -> List[int]:
    if count <= DEFAULT_SHOWN:
        return list(range(count))
    return sorted({round(i * (count - 1) / (DEFAULT_SHOWN - 1)) for i in range(DEFAULT_SHOWN)})


def _analyse(name: str, checkpoint: Optional[str], image_path: str):
    model = load_model(name, checkpoint)
    x, shown = load_image(image_path, model)
    try:
        records = attention_maps(model, x)
    except TypeError as e:
        raise UsageError(f'--model {name}: {e}') from e
    grid = token_grid(model, x.shape[-2:])
    return records, grid, shown


def _save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format='png'))


def run(args: argparse.Namespace) -> int:
    from ..analysis.plots import attention_figure, metrics_figure  # matplotlib only when drawing

    out = Path(args.out)
    records, grid, image = _analyse(args.model, args.checkpoint, args.image)
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
        other, other_grid, _ = _analyse(args.compare, args.compare_checkpoint, args.image)
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
