"""``refiner train``: train a (refined) ViT; defaults train a small Refiner-ViT on the embedded digits."""
import argparse

from ..errors import UsageError
from ..train.config import add_train_flags, config_from_args

EXAMPLE = """examples:
  refiner train --output runs/demo                         # digits, small Refiner-ViT, about a minute on a CPU
  refiner train --data DIR --img-size 32 --output runs/x   # DIR/train/<class>/*.png and DIR/val/<class>/*.png
  refiner train --output runs/demo --epochs 40 --resume auto     # continue a run (it is never overwritten silently)
  refiner train --config imagenet_refiner_s --data /data/imagenet --output runs/s    # a shipped recipe
  refiner train --config runs/x/config.yaml --output runs/y --seed 1                 # repeat a run, another seed
  torchrun --nproc_per_node 2 -m refiner_vit train --output runs/ddp
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'train', help='train a model (default: small Refiner-ViT on digits)', epilog=EXAMPLE,
        description='Train a Refiner-ViT, a refined timm ViT or any timm model, with the DeiT/authors\' recipe from '
                    "timm's parts. Every flag can also be set in a YAML file (--config); the command line wins.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_flags(p)
    p.set_defaults(func=run, runs_models=True)


def run(args: argparse.Namespace) -> int:
    from ..train.runner import fit

    try:
        config = config_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    summary = fit(config)
    if summary.get('top1') is not None:
        print(f"top-1 {summary['top1']:.2f} % (best {summary['best_top1']:.2f} %, top-5 {summary['top5']:.2f} %) "
              f"on {summary['data']} after {summary['epochs']} epochs, {summary['train_seconds']:.0f} s training; "
              f"outputs in {summary['output']}")
    return 0
