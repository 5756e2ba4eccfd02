"""The study's data: ImageFolder copies of the named datasets, and stratified subsets as folders of links.

Every experiment reads an ImageFolder: ``digits`` (scikit-learn's 8x8 digits, its fixed split written once as PNG
files into the work folder), ``mnist5k`` (written once by :mod:`refiner_vit.data.mnist5k`) or a root with
``train/`` and ``val/``. Subsets (the tuning split, training fractions) are folders of symbolic links.
"""
import os
import random
from pathlib import Path
from typing import List, Sequence, Tuple

from refiner_vit.data.mnist5k import MNIST5K, mnist5k_folder
from refiner_vit.errors import DataError

Sample = Tuple[str, str]  # (absolute image path, class name)
# The input side each named dataset is studied at by default (its images' own side; digits: 16 as before).
NATIVE_SIZES = {'digits': 16, MNIST5K: 28}


def write_digits_folder(root: Path) -> Path:
    """scikit-learn's digits, its fixed train/val split written as PNG files (once) -> ImageFolder root."""
    from refiner_vit.data.digits import DigitsDataset

    done = root / '.complete'
    if not done.is_file():
        for split in ('train', 'val'):
            dataset = DigitsDataset(split)
            for index in range(len(dataset)):
                image, label = dataset[index]
                folder = root / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f'{index:05d}.png')
        done.write_text('ok\n')
    return root


def data_root(data: str, work: Path) -> Path:
    """The ImageFolder root of ``--data``: a named dataset's copy in ``work``, else the folder itself."""
    if data == 'digits':
        return write_digits_folder(work / 'digits')
    if data == MNIST5K:
        return mnist5k_folder(str(work))
    root = Path(data).expanduser().resolve()
    for split in ('train', 'val'):
        if not (root / split).is_dir():
            raise DataError(f"--data {data}: expected 'digits', 'mnist5k' or an ImageFolder root with train/ and val/")
    return root


def list_images(split_root: Path) -> List[Sample]:
    """``(absolute image path, class name)`` of an ImageFolder split, in ImageFolder order."""
    from refiner_vit.data.datasets import NamedImageFolder

    folder = NamedImageFolder(str(split_root))
    return [(os.path.abspath(path), folder.classes[target]) for path, target in folder.samples]


def stratified_subset(samples: Sequence[Sample], fraction: float, seed: int) -> Tuple[List[Sample], List[Sample]]:
    """``(chosen, rest)``: ``fraction`` of each class (at least one image), drawn with ``seed``."""
    rng = random.Random(seed)
    chosen, rest = [], []
    for name in sorted({c for _, c in samples}):
        items = [s for s in samples if s[1] == name]
        rng.shuffle(items)
        take = max(1, round(fraction * len(items)))
        chosen += items[:take]
        rest += items[take:]
    return chosen, rest


def link_split(dest: Path, samples: Sequence[Sample]) -> None:
    """An ImageFolder split of symbolic links to ``samples``, each named as its target file.

    ImageFolder orders a class's images by file name, and that order is the data order a seed shuffles. Links
    named after anything that depends on where the data or ``--work`` lives (an earlier version hashed the
    absolute path) give every work folder another data order, hence other tuning scores and possibly another
    tuned learning rate. Named as their targets, a subset keeps its source's order wherever it is built.
    """
    for path, name in samples:
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / Path(path).name
        if link.is_symlink() and os.readlink(link) != path:
            raise DataError(f'{link}: two images of class {name!r} share the file name {link.name!r}')
        if not link.is_symlink():
            link.symlink_to(path)


def make_subset_root(work: Path, name: str, train: Sequence[Sample], val: Sequence[Sample]) -> Path:
    """``work/subsets/name/{train,val}`` (made once)."""
    root = work / 'subsets' / name
    if not (root / '.complete').is_file():
        link_split(root / 'train', train)
        link_split(root / 'val', val)
        (root / '.complete').write_text('ok\n')
    return root
