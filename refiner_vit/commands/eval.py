"""``refiner eval``: top-1 / top-5 / loss of a trained run, a checkpoint or a named timm model on a dataset."""
import argparse
import json
from pathlib import Path
from typing import Any, List, Optional

from ..errors import UsageError
from .model_source import add_model_options, load_model

EXAMPLE = """examples:
  refiner eval --model refiner_vit_s_patch16_224 --pretrained --data /data/imagenet --crop-pct 0.9
  refiner eval --model deit_tiny_patch16_224 --checkpoint weights.safetensors --data DIR
  refiner eval --model runs/x --use-ema             # the EMA weights of a run trained with --model-ema
  refiner eval --model runs/demo --format json      # after `make demo`: its best/ on its validation split
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'eval', help='accuracy of a trained model on a validation set', epilog=EXAMPLE,
        description='Evaluate a model on the validation split of a dataset. A run, its best/ folder or its '
                    'checkpoint-last.pth bring the model, its input settings and the data it was trained on.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p, use_ema=True)
    p.add_argument('--data', help="'digits', a folder with train/ and val/ (or val/ only), or a timm dataset spec "
                   "(default: the data the run was trained on, else digits)")
    p.add_argument('--data-dir', help='root folder of a timm dataset spec (default: the run\'s)')
    p.add_argument('--img-size', type=int, help='input size (default: the one the model was trained at)')
    p.add_argument('--crop-pct', type=float, help='centre-crop fraction (default: the model\'s)')
    p.add_argument('--batch-size', type=int, default=64, help='images per batch (default: 64)')
    p.add_argument('--workers', type=int, default=0, help='loader worker processes (default: 0)')
    p.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    p.add_argument('--format', choices=('text', 'json'), default='text', help='output format (default: text)')
    p.set_defaults(func=run, runs_models=True)


def _check_classes(target: str, names: Optional[List[str]], model: Any, source: Any, recorded: bool) -> None:
    """The data's class folders must be the ones a run was trained on, and never more than the model outputs
    (a label beyond the logits would otherwise crash inside the loss or give a meaningless accuracy)."""
    if not source.classes:
        return
    if recorded and names and list(names) != list(source.classes):
        raise UsageError(f'{target}: trained on {len(names)} classes ({", ".join(names[:5])}, ...), but --data '
                         f'{source.spec} has {len(source.classes)} ({", ".join(source.classes[:5])}, ...)')
    outputs = getattr(model, 'num_classes', None)
    if isinstance(outputs, int) and outputs < len(source.classes):
        raise UsageError(f'{target}: the model has {outputs} outputs, fewer than the {len(source.classes)} classes '
                         f'of --data {source.spec}')


def run(args: argparse.Namespace) -> int:
    from ..data import build_eval_transform, build_loader, open_split
    from ..data.datasets import eval_source
    from ..train.distributed import resolve_device
    from ..train.engine import evaluate

    for flag in ('batch_size', 'img_size', 'crop_pct'):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    device = resolve_device(args.device)
    resolved = load_model(args, args.model, args.checkpoint, args.model_kwargs, args.img_size)
    if args.crop_pct:
        resolved.data_config['crop_pct'] = args.crop_pct
    recorded = resolved.train_data or {}
    data = args.data or recorded.get('data') or 'digits'
    data_dir = args.data_dir if args.data_dir or args.data else recorded.get('data_dir')
    source = eval_source(data, data_dir)
    from_path = Path(args.model.removeprefix('local-dir:')).expanduser().exists()
    _check_classes(args.model, resolved.class_names, resolved.model, source, recorded=from_path)
    dataset = open_split(source, 'val', build_eval_transform(resolved.data_config))
    loader = build_loader(dataset, args.batch_size, False, args.workers, 0)
    result = evaluate(resolved.model.to(device), loader, device)
    result = dict(model=args.model, data=data, **{k: round(v, 4) for k, v in result.items()})
    if args.format == 'json':
        print(json.dumps(result))
    else:
        print(f"{args.model} on {data}: top-1 {result['top1']:.2f} %, top-5 {result['top5']:.2f} %, "
              f"loss {result['loss']:.4f} ({result['images']} images)")
    return 0
