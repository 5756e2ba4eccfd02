"""Write "digit scenes", a small 32 px ImageFolder made from real handwritten digits, for data_efficiency.py.

Each image is one of scikit-learn's 8x8 digits (UCI), upscaled to a random side of 12-20 px and pasted at a
random place of a black 32x32 canvas, with a random 4x4 fragment of another digit pasted elsewhere as clutter
and mild Gaussian noise. Unlike the digits themselves, the class is no longer at a fixed place or scale, so the
model has to find it. Training scenes use the digits' training split and validation scenes its validation
split (no digit appears in both). Deterministic for a given ``--seed``.

Usage::

    python benchmarks/make_digit_scenes.py runs/digit_scenes --train-per-class 100 --val-per-class 30
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from refiner_vit.data.digits import DigitsDataset

CANVAS = 32


def scene(digit: np.ndarray, clutter: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One grey 32x32 scene: ``digit`` (8x8 uint8) resized and placed at random, plus a clutter fragment."""
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    fy, fx = rng.integers(0, 5, size=2)
    fragment = np.asarray(Image.fromarray(clutter[fy:fy + 4, fx:fx + 4]).resize((8, 8), Image.BILINEAR))
    cy, cx = rng.integers(0, CANVAS - 8, size=2)
    canvas[cy:cy + 8, cx:cx + 8] = fragment * 0.6
    side = int(rng.integers(12, 21))
    glyph = np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR), dtype=np.float32)
    y, x = rng.integers(0, CANVAS - side + 1, size=2)
    canvas[y:y + side, x:x + side] = np.maximum(canvas[y:y + side, x:x + side], glyph)
    canvas += rng.normal(0., 12., size=canvas.shape)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def write_split(root: Path, split: str, per_class: int, rng: np.random.Generator) -> int:
    """``per_class`` scenes of each class under ``root/split/<class>/``; returns the number written."""
    dataset = DigitsDataset(split)
    images, labels = dataset.images, np.asarray(dataset.targets)
    written = 0
    for label in range(len(DigitsDataset.classes)):
        pool = np.flatnonzero(labels == label)
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            digit = images[pool[rng.integers(len(pool))]]
            clutter = images[rng.integers(len(images))]
            scene(digit, clutter, rng).save(folder / f'{i:04d}.png')
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('output', help='ImageFolder root to write (train/ and val/ are created)')
    parser.add_argument('--train-per-class', type=int, default=100, help='training scenes per digit class')
    parser.add_argument('--val-per-class', type=int, default=30, help='validation scenes per digit class')
    parser.add_argument('--seed', type=int, default=0, help='random seed of placement, size, clutter and noise')
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    root = Path(args.output)
    counts = [write_split(root, split, n, rng) for split, n in (('train', args.train_per_class),
                                                                 ('val', args.val_per_class))]
    print(f'{root}: {counts[0]} training and {counts[1]} validation scenes of {CANVAS} px')


if __name__ == '__main__':
    main()
