"""scikit-learn's handwritten digits as an image dataset: real data that is always available offline.

1,797 grey 8x8 images of the digits 0-9 (UCI), shipped inside scikit-learn. The split is fixed (stratified,
``random_state=0``, 20 % validation: 1,437 train / 360 val images) so every run, machine and process sees the
same validation set and results can be compared. Items are RGB PIL images, so timm's transforms upsample
them to the model's input size like any other image.
"""
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ['DigitsDataset', 'DIGITS_SPLIT_SEED', 'DIGITS_VAL_FRACTION']

DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


def _split_digits(split: str) -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255. / 16.)).astype(np.uint8)  # pixel values are 0..16
    train_x, val_x, train_y, val_y = train_test_split(
        images, digits.target, test_size=DIGITS_VAL_FRACTION, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    return (train_x, train_y) if split == 'train' else (val_x, val_y)


class DigitsDataset(Dataset):
    """The fixed ``'train'`` or ``'val'`` split of the digits as ``(RGB PIL image or transformed, label)``."""

    classes: List[str] = [str(i) for i in range(10)]

    def __init__(self, split: str = 'train', transform: Optional[Callable] = None) -> None:
        if split not in ('train', 'val'):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.images, labels = _split_digits(split)
        self.targets = [int(t) for t in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index]).convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
