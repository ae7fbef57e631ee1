"""Opening images with errors that say which file and which sample."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from svlm.data.formats import DataError


def open_image(path: str | Path, where: str = "") -> Image.Image:
    """Open and fully decode an image; any failure is a DataError naming the file.

    Images over PIL's pixel limit (Image.MAX_IMAGE_PIXELS, about 89 million
    pixels) are refused as possible decompression bombs, before decoding.
    """
    where = where or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.copy() if im.mode != "P" else im.convert("RGBA")
    except FileNotFoundError as e:
        raise DataError(where, "missing image", str(path)) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(where, "image too large", f"{path}: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(where, "unreadable image", f"{path}: {e}") from e
