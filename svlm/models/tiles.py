"""High-resolution images as tiles (model.vision.tiles=[R, C], off by default).

An image larger than the encoder's size S is cut into a grid of up to R rows
x C columns of S x S tiles, plus one global thumbnail of the whole picture,
as nanoVLM and SmolVLM do. The grid follows the image: rows = ceil(H / S)
and columns = ceil(W / S), each capped at R and C; the image is resized to
exactly (columns x S, rows x S) and cut. An image that fits one tile (a 1 x 1
grid) stays one view, as without tiles. Each view is encoded and compressed
as any image is (the projector's N visual tokens).

Token layout of one image with a grid of r x c > 1 (what an <image> tag
expands to; [N] stands for the N visual-token slots of a view):

    <row_1_col_1>[N]<row_1_col_2>[N] ... <row_1_col_c>[N]\\n
    ...
    <row_r_col_1>[N] ... <row_r_col_c>[N]\\n
    <global_img>[N]

The views come to the model in the same order: tiles row by row, then the
thumbnail. The separators are nanoVLM's names, written as plain text (the
tokenizer's own pieces, no new vocabulary): a model needs no new embedding
rows, and a pretrained language model with frozen embeddings reads
"row 1, column 2" as the text it is. An image then costs
(r * c + 1) * N visual tokens plus the separators' text; the largest grid's
cost is budgeted against data.max_len when a run starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

GLOBAL = "<global_img>"


def separator(row: int, col: int) -> str:
    """The text before tile (row, col), counted from 1."""
    return f"<row_{row}_col_{col}>"


@dataclass(frozen=True)
class Tiling:
    """How images are tiled: at most `rows` x `cols` tiles of `size` pixels."""

    rows: int
    cols: int
    size: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"model.vision.tiles=[{self.rows}, {self.cols}]: both must be at least 1")

    @property
    def max_views(self) -> int:
        return 1 if self.rows * self.cols == 1 else self.rows * self.cols + 1

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of an image of this size."""
        return min(self.rows, max(1, math.ceil(height / self.size))), min(
            self.cols, max(1, math.ceil(width / self.size))
        )

    def views(self, image: Image.Image) -> tuple[list[Image.Image], tuple[int, int]]:
        """The views of an image (tiles row by row, then the thumbnail; one view for
        a 1 x 1 grid), each still to be resized to the encoder's size, and the grid."""
        rows, cols = self.grid(*image.size)
        if rows * cols == 1:
            return [image], (1, 1)
        s = self.size
        whole = image.resize((cols * s, rows * s), resample=Image.Resampling.BICUBIC)
        tiles = [whole.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
        return [*tiles, image], (rows, cols)


def layout(grid: tuple[int, int]) -> list[str | None]:
    """An image's token layout (see the module docstring): separator texts, and
    None where a view's visual tokens go."""
    rows, cols = grid
    if rows * cols == 1:
        return [None]
    out: list[str | None] = []
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            out += [separator(r, c), None]
        out.append("\n")
    return [*out, GLOBAL, None]
