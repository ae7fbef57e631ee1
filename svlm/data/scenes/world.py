"""The scenes world: objects on a 3 x 3 grid, drawn with PIL, and the words for
them in English and Chinese (svlm/data/scenes/__init__.py says what the data
set holds)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from svlm.data.drawing import COLOURS, KINDS, SIZES, background, draw_shape, shade

GRID = 3  # cells a side
CELLS = {  # (row, col): (English, Chinese)
    (0, 0): ("top left", "左上"),
    (0, 1): ("top middle", "上方"),
    (0, 2): ("top right", "右上"),
    (1, 0): ("middle left", "左方"),
    (1, 1): ("centre", "中间"),
    (1, 2): ("middle right", "右方"),
    (2, 0): ("bottom left", "左下"),
    (2, 1): ("bottom middle", "下方"),
    (2, 2): ("bottom right", "右下"),
}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBERS_EN = ["zero", "one", "two", "three", "four", "five", "six"]
NUMBERS_ZH = ["零", "一", "两", "三", "四", "五", "六"]
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "cross"), ("yellow", "square"))
YES_NO = {"en": ("yes", "no"), "zh": ("是", "不是")}
HAS = {"en": ("yes", "no"), "zh": ("有", "没有")}


@dataclass(frozen=True)
class Obj:
    colour: str
    kind: str
    size: str
    row: int
    col: int
    x: float = 0.5  # centre and radius, as fractions of the picture's side
    y: float = 0.5
    r: float = 0.1


# --------------------------------------------------------------------- scenes


def sample_scene(max_objects: int, rng: random.Random, novel: bool = False) -> list[Obj]:
    """1 to max_objects objects in distinct cells. Their colour-kind pairs avoid
    HELD_OUT, except that with novel=True at least one object has such a pair."""
    n = rng.randint(1, max_objects)
    cells = rng.sample(sorted(CELLS), n)
    allowed = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in HELD_OUT]
    pairs = [rng.choice(allowed) for _ in range(n)]
    if novel:
        pairs[0] = rng.choice(HELD_OUT)
        rng.shuffle(pairs)
    sizes = [rng.choice(list(SIZES)) for _ in range(n)]
    return [place(c, k, s, cell, rng) for (c, k), s, cell in zip(pairs, sizes, cells)]


def place(colour: str, kind: str, size: str, cell: tuple[int, int], rng: random.Random) -> Obj:
    """The object's radius by its size, its centre jittered within its cell."""
    r = (rng.uniform(0.20, 0.25) if size == "small" else rng.uniform(0.36, 0.42)) / GRID
    room = 0.5 / GRID - r - 0.01  # the centre may move this far from the cell's centre
    row, col = cell
    x = (col + 0.5) / GRID + rng.uniform(-room, room)
    y = (row + 0.5) / GRID + rng.uniform(-room, room)
    return Obj(colour, kind, size, row, col, round(x, 4), round(y, 4), round(r, 4))


def draw(objs: list[Obj], size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), background(rng))
    d = ImageDraw.Draw(image)
    for o in objs:
        draw_shape(d, o.kind, o.x * size, o.y * size, o.r * size, shade(o.colour, rng))
    return image


# --------------------------------------------------------------------- wording


def cell_name(o: Obj, lang: str) -> str:
    return CELLS[(o.row, o.col)][lang == "zh"]


def name(o: Obj, lang: str) -> str:
    """The object as an answer: its colour and kind ("red circle", "红色圆形")."""
    return f"{o.colour} {o.kind}" if lang == "en" else f"{COLOURS[o.colour][0]}{KINDS[o.kind]}"


def number(n: int, lang: str) -> str:
    return str(n) if lang == "en" else NUMBERS_ZH[n]


def caption(objs: list[Obj], lang: str) -> str:
    """Every object with its size, colour, kind and cell, in reading order."""
    ordered = sorted(objs, key=lambda o: (o.row, o.col))
    n = len(objs)
    if lang == "zh":
        parts = [f"{cell_name(o, 'zh')}有一个{SIZES[o.size]}的{COLOURS[o.colour][0]}{KINDS[o.kind]}" for o in ordered]
        return f"图中有{NUMBERS_ZH[n]}个物体：" + "，".join(parts) + "。"
    parts = [f"a {o.size} {o.colour} {o.kind} in the {cell_name(o, 'en')}" for o in ordered]
    listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{NUMBERS_EN[n].capitalize()} object{'s' if n > 1 else ''}: {listed}."


def references(o: Obj, objs: list[Obj], avoid: str, lang: str) -> list[str]:
    """The ways to name `o` that fit it alone among `objs` ("the triangle", "the
    red object", "the large red triangle", "the object in the top left"),
    without using the attribute `avoid` (colour, kind, size or position)."""
    en = lang == "en"
    colour, kind, size = COLOURS[o.colour][0], KINDS[o.kind], SIZES[o.size]
    options = {  # the attributes a phrase uses: (English, Chinese)
        ("kind",): (f"the {o.kind}", kind),
        ("colour",): (f"the {o.colour} object", f"{colour}的物体"),
        ("colour", "kind"): (f"the {o.colour} {o.kind}", f"{colour}{kind}"),
        ("size", "kind"): (f"the {o.size} {o.kind}", f"{size}的{kind}"),
        ("size", "colour", "kind"): (f"the {o.size} {o.colour} {o.kind}", f"{size}的{colour}{kind}"),
    }
    out = []
    for attrs, (phrase_en, phrase_zh) in options.items():
        unique = sum(all(getattr(t, a) == getattr(o, a) for a in attrs) for t in objs) == 1
        if unique and avoid not in attrs:
            out.append(phrase_en if en else phrase_zh)
    if avoid != "position":
        out.append(f"the object in the {cell_name(o, 'en')}" if en else f"{cell_name(o, 'zh')}的物体")
    return out


def refer(o: Obj, objs: list[Obj], avoid: str, lang: str, rng: random.Random) -> str | None:
    found = references(o, objs, avoid, lang)
    return rng.choice(found) if found else None
