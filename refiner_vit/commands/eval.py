"""``refiner eval``: top-1 / top-5 / loss of a trained run, a checkpoint or a named timm model on a dataset."""
import argparse
import json
from pathlib import Path
from typing import Any, List, Optional

from ..errors import UsageError

EXAMPLE = """examples:
  refiner eval runs/demo/best                        # the digits validation split, settings from the run
  refiner eval runs/demo/checkpoint-last.pth --use-ema --data DIR
  refiner eval refiner_vit_s_patch16_224 --pretrained --data /data/imagenet --crop-pct 0.9
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'eval', help='accuracy of a trained model on a validation set', epilog=EXAMPLE,
        description='Evaluate a model on the validation split of a dataset. The model name and its input '
                    'settings are read from the checkpoint (RUN/best folder or RUN/checkpoint-last.pth).',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument('model', help='RUN/best folder, a refiner train checkpoint, or a timm model name')
    p.add_argument('--data', default='digits', help="'digits', a folder with train/ and val/ (or val/ only), "
                   'or a timm dataset spec (default: digits)')
    p.add_argument('--data-dir', help='root folder of a timm dataset spec')
    p.add_argument('--pretrained', action='store_true', help="with a model name: timm's pretrained weights")
    p.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of a training checkpoint')
    p.add_argument('--img-size', type=int, help='input size (default: the one the model was trained at)')
    p.add_argument('--crop-pct', type=float, help='centre-crop fraction (default: the model\'s)')
    p.add_argument('--batch-size', type=int, default=64, help='images per batch (default: 64)')
    p.add_argument('--workers', type=int, default=0, help='loader worker processes (default: 0)')
    p.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    p.add_argument('--json', action='store_true', help='print the result as JSON')
    p.set_defaults(func=run)


def _check_classes(target: str, names: Optional[List[str]], model: Any, source: Any) -> None:
    """The data's class folders must be the ones a run was trained on, and never more than the model outputs
    (a label beyond the logits would otherwise crash inside the loss or give a meaningless accuracy)."""
    if not source.classes:
        return
    if Path(target).exists() and names and list(names) != list(source.classes):
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
    from ..train.models import load_trained

    device = resolve_device(args.device)
    model, data_config, names = load_trained(args.model, use_ema=args.use_ema, pretrained=args.pretrained,
                                             img_size=args.img_size, crop_pct=args.crop_pct)
    source = eval_source(args.data, args.data_dir)
    _check_classes(args.model, names, model, source)
    dataset = open_split(source, 'val', build_eval_transform(data_config))
    loader = build_loader(dataset, args.batch_size, False, args.workers, 0)
    result = evaluate(model.to(device), loader, device)
    result = dict(model=args.model, data=args.data, **{k: round(v, 4) for k, v in result.items()})
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model} on {args.data}: top-1 {result['top1']:.2f} %, top-5 {result['top5']:.2f} %, "
              f"loss {result['loss']:.4f} ({result['images']} images)")
    return 0
