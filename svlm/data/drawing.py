"""What the embedded data sets (svlm/data/shapes/, svlm/data/scenes/) draw with:
the colours and kinds of shape, with their English and Chinese names, and one
shape drawn with PIL."""

from __future__ import annotations

import random

from PIL import ImageDraw

COLOURS = {  # name: (Chinese, RGB)
    "red": ("红色", (215, 35, 35)),
    "orange": ("橙色", (245, 135, 20)),
    "yellow": ("黄色", (230, 210, 25)),
    "green": ("绿色", (35, 160, 55)),
    "blue": ("蓝色", (35, 75, 215)),
    "purple": ("紫色", (135, 45, 185)),
}
KINDS = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "cross": "十字形"}
SIZES = {"small": "小", "large": "大"}
# What each drawn object has, in the order an object head (svlm/models/object_head.py) reads them.
ATTRIBUTES = {"colour": list(COLOURS), "kind": list(KINDS), "size": list(SIZES)}


def object_classes() -> list[int]:
    """Classes of each attribute, "no object" (0) included."""
    return [len(values) + 1 for values in ATTRIBUTES.values()]


def object_labels(objects: list[dict], grid: int) -> list[list[int]]:
    """The class of each attribute for each cell of a grid x grid split of the
    picture (row by row): the object whose centre (x, y, fractions of the side)
    lies in the cell, else 0; a cell holding two centres is labelled by the later one."""
    labels = [[0] * len(ATTRIBUTES) for _ in range(grid * grid)]
    for o in objects:
        cell = min(int(o["y"] * grid), grid - 1) * grid + min(int(o["x"] * grid), grid - 1)
        labels[cell] = [values.index(o[name]) + 1 for name, values in ATTRIBUTES.items()]
    return labels


def background(rng: random.Random) -> tuple[int, int, int]:
    """A light background colour."""
    return tuple(rng.randint(200, 255) for _ in range(3))


def shade(colour: str, rng: random.Random) -> tuple[int, int, int]:
    """The colour's RGB, each channel moved by up to 15."""
    return tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[colour][1])


def draw_shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    """One shape of radius r (half its width) centred at (cx, cy)."""
    if kind == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        q = r * 0.85
        d.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif kind == "cross":
        w = r * 0.36
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown kind of shape {kind!r}; the kinds: {', '.join(KINDS)}")
