"""Reading an uploaded file as an image, refusing what could hurt the server.

A file is checked in the order that costs least: its size on disk (``max_bytes``), then the image header alone,
which gives the pixel count (``max_pixels``) before a single pixel is decoded. A decompression bomb (a small
file that decodes to a huge image) is therefore refused from its header. Only then are the pixels decoded.
Every refusal is an :class:`~refiner_vit.errors.UploadError` whose message names the file by its base name (the
page never shows server paths).
"""
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import UploadError

__all__ = ['UploadLimits', 'open_upload']


@dataclass(frozen=True)
class UploadLimits:
    """The largest upload the app reads: bytes on disk and decoded pixels (width x height)."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096


def open_upload(path: str, limits: UploadLimits = UploadLimits()) -> Image.Image:
    """The decoded image in ``path`` (first frame of an animation), or an ``UploadError`` saying why not.

    Raises:
        UploadError: more than ``limits.max_bytes`` bytes, more than ``limits.max_pixels`` pixels, or not an image
            Pillow can read.
    """
    name = Path(path).name
    size = os.path.getsize(path)
    if size > limits.max_bytes:
        raise UploadError(f'{name}: {size:,} bytes are more than the {limits.max_bytes:,} an upload may have')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise UploadError(f'{name}: {width}x{height} pixels are more than the {limits.max_pixels:,} an '
                                      'upload may have')
                image.load()
                return image.copy()
    except UploadError:
        raise
    except UnidentifiedImageError as e:
        raise UploadError(f'{name}: not an image (Pillow cannot read it)') from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadError(f'{name}: refused as a decompression bomb ({e})') from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated files, bad chunks
        raise UploadError(f'{name}: a damaged or unsupported image ({e})') from e
