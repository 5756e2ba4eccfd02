"""``refiner relabel``: write LV-ViT relabel maps (top-5 dense teacher logits per image) for token labeling.

Any timm model can be the teacher. Its dense output is the classifier applied at every location of its
final features: for a CNN (features ``NCHW`` or ``NHWC``) each location goes through ``forward_head`` as a
1x1 image, so pooling is the identity and any head norm / pre-logits layers are applied as in training;
for a ViT the head (the token-labeling ``aux_head`` when the model has one) is applied to every patch token.
The teacher sees the *whole* image resized to ``--img-size`` squared (no centre crop), so the map covers
exactly the image whose crop boxes the training transforms record.
"""
import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict

from ..errors import UsageError
from .model_source import add_model_options, load_model

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ['add_parser', 'dense_logits', 'run']

EXAMPLE = """examples:
  refiner relabel --teacher resnet50 --pretrained --data DIR --output DIR/token_labels   # labels DIR/train
  refiner relabel --teacher runs/demo --data docs/examples/digits --output runs/demo/token_labels
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        'relabel', help='generate token-labeling maps (top-5 dense teacher scores) for an image folder',
        description=__doc__, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p, flag='--teacher')
    p.add_argument('--data', required=True, metavar='DIR',
                   help='ImageFolder (class subfolders) to label, or a root holding it as the --split subfolder')
    p.add_argument('--split', default='train', metavar='NAME',
                   help='subfolder of --data labelled when it exists (default: train, as `refiner train` reads)')
    p.add_argument('--output', required=True, metavar='DIR', help='folder of the maps: DIR/<class>/<stem>.pt')
    p.add_argument('--img-size', type=int, metavar='N', help="teacher input size (default: the teacher's)")
    p.add_argument('--batch-size', type=int, default=64, metavar='N', help='images per batch (default: 64)')
    p.add_argument('--workers', type=int, default=2, metavar='N', help='data loader processes (default: 2)')
    p.set_defaults(func=run, runs_models=True)


def dense_logits(model: 'nn.Module', x: 'torch.Tensor') -> 'torch.Tensor':
    """The teacher's class logits at every location of its final features: ``(B, num_classes, H, W)``."""
    from torch import nn

    features = model.forward_features(x)
    if features.ndim == 3:
        tokens = features[:, getattr(model, 'num_prefix_tokens', 0):]
        aux_head = getattr(model, 'aux_head', None)
        head = aux_head if aux_head is not None else model.get_classifier()
        if aux_head is None:  # timm ViTs with avg pooling normalise after pooling; identity otherwise
            tokens = getattr(model, 'fc_norm', nn.Identity())(tokens)
        logits = head(tokens)
        grid = getattr(getattr(model, 'patch_embed', None), 'grid_size', None)
        rows, cols = grid if grid is not None and grid[0] * grid[1] == tokens.shape[1] else (None, None)
        if rows is None:
            rows = cols = int(round(tokens.shape[1] ** 0.5))
            if rows * cols != tokens.shape[1]:
                raise UsageError(f'teacher: cannot arrange {tokens.shape[1]} tokens on a square grid')
        return logits.transpose(1, 2).reshape(x.shape[0], -1, rows, cols)
    if features.ndim != 4:
        raise UsageError(f'teacher: unsupported feature shape {tuple(features.shape)}')
    channels = model.num_features
    nhwc = features.shape[1] != channels and features.shape[-1] == channels
    per_location = features if nhwc else features.permute(0, 2, 3, 1)
    B, H, W, _ = per_location.shape
    one_by_one = per_location.reshape(B * H * W, 1, 1, channels)
    logits = model.forward_head(one_by_one if nhwc else one_by_one.permute(0, 3, 1, 2))
    return logits.reshape(B, H, W, -1).permute(0, 3, 1, 2)


def _load_teacher(args: argparse.Namespace) -> 'nn.Module':
    model = load_model(args, args.teacher, args.checkpoint, args.model_kwargs).model
    if args.img_size and hasattr(model, 'set_input_size'):
        model.set_input_size(img_size=args.img_size)
    return model.eval()


def _image_root(args: argparse.Namespace) -> Path:
    root = Path(args.data)
    return root / args.split if (root / args.split).is_dir() else root


def run(args: argparse.Namespace) -> int:
    import torch
    from timm.data import resolve_data_config
    from timm.data.transforms_factory import transforms_imagenet_eval
    from tqdm import tqdm

    from ..data.token_labels import TOP_K, label_map_path, open_image_folder, pack_label_map, save_label_map

    if args.batch_size < 1:
        raise UsageError(f'--batch-size must be >= 1, got {args.batch_size}')
    root = _image_root(args)
    model = _load_teacher(args)
    config = resolve_data_config({'img_size': args.img_size} if args.img_size else {}, model=model)
    img_size = config['input_size'][-1]
    transform = transforms_imagenet_eval(
        img_size, crop_pct=1.0, crop_mode='squash', interpolation=config['interpolation'],
        mean=config['mean'], std=config['std'],
    )
    dataset = open_image_folder(root, transform)
    out = Path(args.output)
    paths = [label_map_path(out, dataset.filename(i)) for i in range(len(dataset))]
    _refuse_collisions(dataset, paths)

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model.to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    done = correct = 0
    map_shape = None
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc='relabel', unit='batch'):
            logits = dense_logits(model, images.to(device)).float().cpu()
            correct += int((logits.mean(dim=(2, 3)).argmax(dim=1) == labels).sum())
            for dense in logits:
                packed = pack_label_map(dense, TOP_K)
                save_label_map(packed, paths[done])
                done += 1
            map_shape = tuple(packed.shape)
    _write_manifest(out / 'relabel.json', {
        'teacher': args.teacher, 'checkpoint': args.checkpoint, 'pretrained': args.pretrained,
        'num_classes': int(logits.shape[1]), 'img_size': img_size, 'map_shape': map_shape, 'images': done,
        'data': str(root),
    })
    print(f'wrote {done} maps {list(map_shape)} to {out}; teacher top-1 against the folder labels: '
          f'{100. * correct / done:.2f}% (meaningful when the teacher was trained on these classes)')
    return 0


def _refuse_collisions(dataset, paths) -> None:
    """Two images with the same stem in one folder (``a.jpg``, ``a.png``) would share a map file."""
    seen: Dict[Path, int] = {}
    for i, path in enumerate(paths):
        if path in seen:
            raise UsageError(f'{dataset.filename(seen[path])} and {dataset.filename(i)} would share the map {path}; '
                             'rename one of them')
        seen[path] = i


def _write_manifest(path: Path, manifest: Dict[str, Any]) -> None:
    from ..utils.io import atomic_write

    atomic_write(path, lambda f: f.write((json.dumps(manifest, indent=2) + '\n').encode()))
