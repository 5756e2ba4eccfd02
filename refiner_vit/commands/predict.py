"""``refiner predict``: top-k classes with names and probabilities for image files or a folder of images."""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from ..errors import UsageError
from .model_source import add_model_options, load_model

EXAMPLE = """examples:
  refiner predict --model runs/x/checkpoint-last.pth photos/ --topk 3 --format json
  refiner predict --model runs/demo docs/examples/digits    # after `make demo`: the sample digits in the repo
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'predict', help='classify image files with a trained model', epilog=EXAMPLE,
        description='Print the top-k classes (names from the run) and their probabilities for each image. Files '
                    'that cannot be read are skipped and listed at the end (exit code 1).',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument('inputs', nargs='+', help='image files and/or folders (searched recursively)')
    add_model_options(p, use_ema=True)
    p.add_argument('--topk', type=int, default=5, help='classes per image (default: 5)')
    p.add_argument('--img-size', type=int, help='input size (default: the one the model was trained at)')
    p.add_argument('--crop-pct', type=float, help="centre-crop fraction (default: the model's)")
    p.add_argument('--format', choices=('table', 'json'), default='table', help='output format (default: table)')
    p.set_defaults(func=run, runs_models=True)


def image_files(inputs: List[str]) -> List[Path]:
    """The image files named or inside the folders named, each once (in the order first met)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files: Dict[Path, Path] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(f for f in path.rglob('*') if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise UsageError(f'{path}: no image files in this folder')
        elif path.is_file():
            found = [path]
        else:
            raise UsageError(f'{path}: no such file or folder')
        for f in found:
            files.setdefault(f.resolve(), f)
    return list(files.values())


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from ..data import build_eval_transform

    if args.topk < 1:
        raise UsageError(f'--topk must be >= 1, got {args.topk}')
    files = image_files(args.inputs)
    resolved = load_model(args, args.model, args.checkpoint, args.model_kwargs, args.img_size)
    if args.crop_pct:
        resolved.data_config['crop_pct'] = args.crop_pct
    model, names = resolved.model, resolved.class_names
    transform = build_eval_transform(resolved.data_config)
    results: List[dict] = []
    failed: List[Tuple[Path, str]] = []
    for path in files:
        try:
            with Image.open(path) as img:
                x = transform(img.convert('RGB'))[None]
        except Exception as e:  # PIL raises many types for unreadable files
            failed.append((path, f'{type(e).__name__}: {e}'))
            continue
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
    if failed:
        listed = '; '.join(f'{path} ({reason})' for path, reason in failed)
        print(f'refiner predict: could not read {len(failed)} of {len(files)} images: {listed}', file=sys.stderr)
        return 1
    return 0
