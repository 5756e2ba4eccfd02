"""``refiner predict``: top-k classes with names and probabilities for image files or a folder of images."""
import argparse
import json
from pathlib import Path
from typing import List

from ..errors import UsageError

EXAMPLE = """examples:
  refiner predict runs/demo/best digit.png other.jpg
  refiner predict runs/x/checkpoint-last.pth photos/ --topk 3 --format json
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'predict', help='classify image files with a trained model', epilog=EXAMPLE,
        description='Print the top-k classes (names from the run) and their probabilities for each image.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument('model', help='RUN/best folder, a refiner train checkpoint, or a timm model name')
    p.add_argument('inputs', nargs='+', help='image files and/or folders (searched recursively)')
    p.add_argument('--pretrained', action='store_true', help="with a model name: timm's pretrained weights")
    p.add_argument('--use-ema', action='store_true', help='use the EMA weights of a training checkpoint')
    p.add_argument('--topk', type=int, default=5, help='classes per image (default: 5)')
    p.add_argument('--img-size', type=int, help='input size (default: the one the model was trained at)')
    p.add_argument('--crop-pct', type=float, help="centre-crop fraction (default: the model's)")
    p.add_argument('--format', choices=('table', 'json'), default='table', help='output format (default: table)')
    p.set_defaults(func=run)


def _image_files(inputs: List[str]) -> List[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(f for f in path.rglob('*') if f.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise UsageError(f'{path}: no image files in this folder')
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f'{path}: no such file or folder')
    return files


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from ..data import build_eval_transform
    from ..train.models import load_trained

    if args.topk < 1:
        raise UsageError(f'--topk must be >= 1, got {args.topk}')
    files = _image_files(args.inputs)
    model, data_config, names = load_trained(args.model, use_ema=args.use_ema, pretrained=args.pretrained,
                                             img_size=args.img_size, crop_pct=args.crop_pct)
    transform = build_eval_transform(data_config)
    results = []
    for path in files:
        try:
            with Image.open(path) as img:
                x = transform(img.convert('RGB'))[None]
        except Exception as e:  # PIL raises many types for unreadable files
            raise UsageError(f'{path}: cannot read image ({type(e).__name__}: {e})') from e
        with torch.no_grad():
            probs = model(x).softmax(dim=-1)[0]
        top = probs.topk(min(args.topk, probs.numel()))
        classes = [dict(index=int(i), name=names[i] if names and i < len(names) else str(int(i)), prob=float(p))
                   for p, i in zip(top.values.tolist(), top.indices.tolist())]
        results.append(dict(file=str(path), top=classes))
    if args.format == 'json':
        print(json.dumps(results, indent=2))
    else:
        for item in results:
            ranked = ', '.join(f"{c['name']} {100 * c['prob']:.1f} %" for c in item['top'])
            print(f"{item['file']}: {ranked}")
    return 0
