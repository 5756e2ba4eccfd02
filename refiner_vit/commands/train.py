"""``refiner train``: train a (refined) ViT; defaults train a small Refiner-ViT on the embedded digits."""
import argparse
import dataclasses

from ..errors import ConfigError, UsageError, WeightsError
from ..train.config import TrainConfig, add_train_flags, config_from_args

EXAMPLE = """examples:
  refiner train --data DIR --img-size 32 --output runs/x   # DIR/train/<class>/*.png and DIR/val/<class>/*.png
  refiner train --model deit_tiny_patch16_224 --refine --pretrained --data DIR --output runs/ft
  refiner train --config imagenet_refiner_s --data /data/imagenet --output runs/s    # a shipped recipe
  refiner train --config runs/x/config.yaml --output runs/y --seed 1                 # repeat a run, another seed
  torchrun --nproc_per_node 2 -m refiner_vit train --output runs/ddp
  refiner train --output runs/demo                         # what `make demo` runs: digits, small Refiner-ViT
  refiner train --output runs/demo --epochs 40 --resume auto      # continue it (a run is never overwritten silently)
  refiner train --model runs/demo --epochs 5 --output runs/demo_ft                 # fine-tune a trained run
"""

# Model arguments a run records that fine-tuning sets afresh (the data, the regularisation, the token-label head).
SET_BY_TRAINING = ('num_classes', 'img_size', 'drop_path_rate', 'drop_rate', 'aux_head', 'mix_token')


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'train', help='train a model (default: small Refiner-ViT on digits)', epilog=EXAMPLE,
        description='Train a Refiner-ViT, a refined timm ViT or any timm model, with the DeiT/authors\' recipe from '
                    "timm's parts. Every flag can also be set in a YAML file (--config); the command line wins.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_flags(p)
    p.set_defaults(func=run, runs_models=True)


def fine_tune_source(config: TrainConfig) -> TrainConfig:
    """The config to train when ``--model`` names a run, ``RUN/best``, a checkpoint or a local dir rather than a
    model: its architecture (refinement and input size included), starting from its weights unless
    ``--checkpoint`` gives others. The returned config names the architecture, so its ``config.yaml`` repeats the
    run without the source's folder layout."""
    from ..models.resolve import is_model_name, resolve_model

    if config.model is None or is_model_name(config.model):
        return config
    if config.pretrained:
        raise UsageError(f'--pretrained applies to a model name; --model {config.model} brings its own weights')
    try:
        source = resolve_model(config.model)
    except (ConfigError, WeightsError) as e:
        raise UsageError(f'--model {e}') from e
    carried = {k: v for k, v in source.spec['model_kwargs'].items() if k not in SET_BY_TRAINING}
    refined = source.spec.get('refine') or {}
    return dataclasses.replace(
        config, model=source.spec['model'], model_kwargs={**carried, **config.model_kwargs},
        img_size=config.img_size or source.data_config['input_size'][-1], checkpoint=config.checkpoint or config.model,
        refine=config.refine or bool(refined), refine_form=refined.get('form', config.refine_form))


def run(args: argparse.Namespace) -> int:
    from ..train.runner import fit

    try:
        config = config_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from e
    summary = fit(fine_tune_source(config))
    if summary.get('top1') is not None:
        print(f"top-1 {summary['top1']:.2f} % (best {summary['best_top1']:.2f} %, top-5 {summary['top5']:.2f} %) "
              f"on {summary['data']} after {summary['epochs']} epochs, {summary['train_seconds']:.0f} s training; "
              f"outputs in {summary['output']}")
    return 0
