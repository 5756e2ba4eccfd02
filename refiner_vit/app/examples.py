"""Example images that need nothing from the network: validation digits, and pictures drawn here for large models.

Every model gets the first validation digit of each of a few classes (scikit-learn ships them; they are the
validation split of ``refiner train``'s default data, so the default model never trained on them). Models with
an input of more than :data:`SMALL_INPUT` pixels (ImageNet-size models) also get, first, a few simple pictures drawn
with Pillow: shapes with edges and texture, on which attention has something to find.
"""
from typing import Dict

from PIL import Image, ImageDraw

__all__ = ['SMALL_INPUT', 'example_images']

SMALL_INPUT = 32
DIGIT_CLASSES = (0, 3, 5, 7, 9)
DRAWN_SIZE = 224


def _digits() -> Dict[str, Image.Image]:
    from ..data.digits import DigitsDataset

    val = DigitsDataset('val')
    first = {}
    for index, label in enumerate(val.targets):
        if label in DIGIT_CLASSES and label not in first:
            first[label] = index
    return {f'digit {label} (validation #{first[label]})': val[first[label]][0] for label in sorted(first)}


def _drawn() -> Dict[str, Image.Image]:
    size = DRAWN_SIZE
    ball = Image.new('RGB', (size, size), (90, 140, 200))
    draw = ImageDraw.Draw(ball)
    draw.rectangle((0, size * 2 // 3, size, size), fill=(60, 150, 60))
    draw.ellipse((size // 3, size // 4, size * 2 // 3 + 20, size * 7 // 12 + 20), fill=(230, 200, 40), outline='black',
                 width=3)
    checks = Image.new('RGB', (size, size), 'white')
    draw = ImageDraw.Draw(checks)
    step = size // 8
    for r in range(8):
        for c in range(8):
            if (r + c) % 2:
                draw.rectangle((c * step, r * step, (c + 1) * step - 1, (r + 1) * step - 1), fill=(40, 40, 40))
    draw.ellipse((size // 4, size // 4, size * 3 // 4, size * 3 // 4), fill=(200, 40, 40))
    stripes = Image.new('RGB', (size, size), (240, 230, 210))
    draw = ImageDraw.Draw(stripes)
    for i in range(-size, size, 24):
        draw.line((i, 0, i + size, size), fill=(30, 30, 120), width=9)
    return {'drawn: ball on grass': ball, 'drawn: checkerboard with a disc': checks, 'drawn: diagonal stripes': stripes}


def example_images(input_size: int) -> Dict[str, Image.Image]:
    """Name -> image, the examples that suit a model whose input is ``input_size`` pixels square."""
    return {**_drawn(), **_digits()} if input_size > SMALL_INPUT else _digits()
