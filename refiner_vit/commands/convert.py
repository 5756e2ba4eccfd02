"""``refiner convert --checkpoint FILE --output DIR``: the authors' checkpoint (or any Refiner-ViT weights) -> timm
local-dir.

Writes ``DIR/model.safetensors`` and ``DIR/config.json`` (timm's format: architecture, model
arguments, preprocessing, class names), so that after ``import refiner_vit``

    timm.create_model('local-dir:DIR', pretrained=True)

rebuilds the model offline. The checkpoint is read without executing code (a pickled object other than
tensors, containers and argparse.Namespace is refused). The variant and image size are recognised from the
tensor shapes unless --model / --img-size say otherwise; --img-size resamples the position embedding.
"""
import argparse
from pathlib import Path
from typing import List, Optional

from ..errors import UsageError
from .model_source import add_model_options

EXAMPLE = """examples:
  refiner convert --checkpoint L-448.pth.tar --output weights/refiner_vit_l_448       # variant and size from shapes
  refiner convert --checkpoint L-448.pth.tar --output weights/l384 --img-size 384 --no-use-ema --overwrite
  refiner convert --checkpoint runs/demo/best/model.safetensors --output runs/demo/converted   # after `make demo`
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        'convert',
        help="convert the authors' checkpoint to timm's local-dir format (model.safetensors + config.json)",
        description=__doc__, epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p, model='optional', checkpoint='required', pretrained=False, use_ema='auto', model_kwargs=False,
                      model_help='target model name (e.g. refiner_vit_l_patch16_384; its image size unless '
                                 "--img-size); default: recognised from the checkpoint's shapes")
    p.add_argument('--output', required=True, metavar='DIR', help='output folder for model.safetensors and config.json')
    p.add_argument('--img-size', type=int, default=None, metavar='PX',
                   help='image size to convert for (the position embedding is resampled); default: the '
                        "checkpoint's own, or the --model's")
    p.add_argument('--labels', default=None, metavar='FILE',
                   help='text file with one class name per line, in head order, stored in config.json; default: '
                        'ImageNet-1k synsets and descriptions for 1000-class heads, none otherwise')
    p.add_argument('--overwrite', action='store_true', help='replace model.safetensors / config.json in --output')
    p.set_defaults(func=run, runs_models=False)


def _read_labels(path: Optional[str]) -> Optional[List[str]]:
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding='utf-8').splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f'--labels {path}: cannot read ({e})') from e
    return [line.strip() for line in lines if line.strip()]


def run(args: argparse.Namespace) -> int:
    from ..models.convert import create_model_from_official
    from ..models.local_dir import save_local_dir

    labels = _read_labels(args.labels)
    try:
        model, source_key = create_model_from_official(args.checkpoint, model_name=args.model, use_ema=args.use_ema,
                                                       img_size=args.img_size)
        name = model.pretrained_cfg['architecture']
        size = model.patch_embed.img_size
        description = f'Converted by `refiner convert` from {Path(args.checkpoint).name} ({source_key} weights) ' \
                      f'for {name} at {size[0]}x{size[1]} px. {model.pretrained_cfg.get("description", "")}'.strip()
        save_local_dir(model, args.output, label_names=labels, description=description, overwrite=args.overwrite)
    except ValueError as e:
        raise UsageError(f'--labels {args.labels}: {e}' if str(e).startswith('label names') else str(e)) from e
    print(f'{args.checkpoint} ({source_key}) -> {args.output}: {name}, {size[0]}x{size[1]} px, '
          f'{model.num_classes} classes')
    print(f"load with: import refiner_vit, timm; timm.create_model('local-dir:{args.output}', pretrained=True)")
    return 0
