"""Datasets by name: the embedded digits, MNIST 5k, an ImageFolder root with ``train/`` and ``val/``, or a timm spec.

Everything a user can get wrong about the data is checked here, before a model is built, and reported as a
:class:`~refiner_vit.errors.DataError` (a ``ValueError``) naming the folder or the spec.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional

from PIL import Image
from timm.data import create_dataset
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import DataError
from .digits import DigitsDataset
from .mnist5k import MNIST5K, mnist5k_folder

__all__ = ['BadImage', 'DataSource', 'NamedImageFolder', 'class_folders', 'eval_source', 'open_split', 'resolve_data']

DIGITS = 'digits'
# Folder names accepted for the validation split of an ImageFolder root, in order of preference.
VAL_FOLDERS = ('val', 'validation')


@dataclass(frozen=True)
class DataSource:
    """What ``--data`` names: ``kind`` is ``'digits'``, ``'folder'`` (root with train/ and val/) or ``'timm'``."""
    kind: str
    spec: str
    classes: List[str]
    train_root: Optional[Path] = None
    val_root: Optional[Path] = None


def class_folders(root: Path) -> List[str]:
    """Sorted class subfolders of ``root`` (hidden ones ignored), as ImageFolder orders them."""
    if not root.is_dir():
        raise DataError(f'{root}: no such folder')
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    if not classes:
        raise DataError(f'{root}: no class folders (expected {root}/<class>/<image files>)')
    empty = [c for c in classes if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (root / c).rglob('*'))]
    if empty:
        raise DataError(f'{root}: class folders without images: {", ".join(empty[:5])}')
    return classes


def _folder_source(root: Path) -> DataSource:
    train = root / 'train'
    val = next((root / name for name in VAL_FOLDERS if (root / name).is_dir()), None)
    if not train.is_dir() or val is None:
        raise DataError(f'--data {root}: expected the subfolders train/ and val/ (each with one folder per class)')
    train_classes, val_classes = class_folders(train), class_folders(val)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(
            f'--data {root}: class folders differ between train/ and {val.name}/ '
            f'(only in train: {only_train[:5] or "none"}; only in {val.name}: {only_val[:5] or "none"})'
        )
    return DataSource('folder', str(root), train_classes, train, val)


def resolve_data(spec: str, data_dir: Optional[str] = None) -> DataSource:
    """Check ``--data`` and find its classes, without decoding any image (MNIST 5k's copy is written on first use
    and its files checked against their digests).

    Args:
        spec: ``'digits'``, ``'mnist5k'`` (an ImageFolder written once under ``data_dir``, see
            :mod:`~refiner_vit.data.mnist5k`), a folder with ``train/`` and ``val/``, or a timm dataset spec
            (``torch/cifar10``, ``hfds/...``) read from ``data_dir``.
        data_dir: Root folder for timm dataset specs and for the MNIST 5k copy.
    """
    if spec == DIGITS:
        return DataSource('digits', spec, list(DigitsDataset.classes))
    if spec == MNIST5K:
        return _folder_source(mnist5k_folder(data_dir))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f'--data {spec}: not a folder')
        return _folder_source(path)
    if '/' in spec and not spec.startswith(('/', '.', '~')) and spec.split('/', 1)[0].isidentifier():
        return DataSource('timm', spec, [], Path(data_dir) if data_dir else None)
    raise DataError(f"--data {spec}: no such folder (expected 'digits', 'mnist5k', a folder with train/ and val/, "
                     "or a timm dataset spec such as torch/cifar10 with --data-dir)")


class BadImage(NamedTuple):
    """What :class:`NamedImageFolder` returns for a file it cannot read when told to skip such files."""

    path: str
    reason: str


class NamedImageFolder(ImageFolder):
    """torchvision's ImageFolder whose errors name the image file that could not be read.

    With ``skip_bad=True`` an unreadable file becomes a :class:`BadImage` item instead of an error; the loader's
    collate function drops it from the batch and reports its name (:func:`~refiner_vit.data.loader.batches`).
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, skip_bad: bool = False) -> None:
        super().__init__(root, transform)
        self.skip_bad = skip_bad

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with open(path, 'rb') as f:
                img = Image.open(f)
                img = img.convert('RGB')
        except Exception as e:  # PIL raises many types for truncated / foreign files
            reason = f'{type(e).__name__}: {e}'
            if self.skip_bad:
                return BadImage(path, reason)
            raise DataError(f'{path}: cannot read image ({reason}); repair or remove it, or train with '
                             '--skip-bad-images') from e
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def open_split(source: DataSource, split: str, transform: Optional[Callable], download: bool = False,
               skip_bad: bool = False) -> Dataset:
    """The ``'train'`` or ``'val'`` split of ``source`` with ``transform`` applied to each image.

    ``skip_bad``: unreadable files of an image folder are dropped (and reported) instead of stopping the run.
    """
    if source.kind == 'digits':
        return DigitsDataset(split, transform)
    if source.kind == 'folder':
        return NamedImageFolder(str(source.train_root if split == 'train' else source.val_root), transform, skip_bad)
    timm_split = 'train' if split == 'train' else 'validation'
    try:
        dataset = create_dataset(source.spec, root=str(source.train_root or ''), split=timm_split,
                                 is_training=split == 'train', download=download)
    except Exception as e:  # timm / torchvision raise many kinds for missing data or unknown names
        raise DataError(f'--data {source.spec}: cannot open the {timm_split} split ({type(e).__name__}: {e})') from e
    dataset.transform = transform
    return dataset


def eval_source(spec: str, data_dir: Optional[str] = None) -> DataSource:
    """Like :func:`resolve_data`, but a folder needs only a validation split: ``val/`` or class folders directly."""
    path = Path(spec).expanduser()
    if spec in (DIGITS, MNIST5K) or not path.is_dir() or (path / 'train').is_dir():
        return resolve_data(spec, data_dir)
    val = next((path / name for name in VAL_FOLDERS if (path / name).is_dir()), path)
    return DataSource('folder', spec, class_folders(val), None, val)
