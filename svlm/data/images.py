"""Opening images, from files or from bytes embedded in a table, with errors
that say which file (or row) and which sample."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from svlm.data.formats import DataError


class EmbeddedImage:
    """An image stored in a row of a table (svlm/data/hub.py), its bytes read only
    when a batch needs it. `name` (file:row#k) says where it is; two references
    with the same name are the same image."""

    def __init__(self, table, row: int, column: str, k: int, name: str) -> None:
        self.table, self.row, self.column, self.k, self.name = table, row, column, k, name

    def read(self) -> bytes:
        """The image's encoded bytes (JPEG, PNG, ...); a DataError when there are none."""
        return self.table.image_bytes(self)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"EmbeddedImage({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EmbeddedImage) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def reason(error: Exception, source) -> str:
    """PIL's message, without the repr of an in-memory buffer it may name."""
    return str(error).replace(f" {source!r}", "") if isinstance(source, io.BytesIO) else str(error)


def open_image(path: str | Path | EmbeddedImage, where: str = "") -> Image.Image:
    """Open and fully decode an image (a file, or an EmbeddedImage's bytes); any
    failure is a DataError naming the file or row.

    Images over PIL's pixel limit (Image.MAX_IMAGE_PIXELS, about 89 million
    pixels) are refused as possible decompression bombs, before decoding.
    """
    where = where or str(path)
    source = io.BytesIO(path.read()) if isinstance(path, EmbeddedImage) else path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                im.load()
                return im.copy() if im.mode != "P" else im.convert("RGBA")
    except FileNotFoundError as e:
        raise DataError(where, "missing image", str(path)) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(where, "image too large", f"{path}: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(where, "unreadable image", f"{path}: {reason(e, source)}") from e


def image_size(path: str | Path | EmbeddedImage, where: str = "") -> tuple[int, int]:
    """(width, height) of an image from its header (not decoded): what choosing its tile grid needs."""
    source = io.BytesIO(path.read()) if isinstance(path, EmbeddedImage) else path
    try:
        with Image.open(source) as im:
            return im.size
    except FileNotFoundError as e:
        raise DataError(where or str(path), "missing image", str(path)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(where or str(path), "unreadable image", f"{path}: {reason(e, source)}") from e
