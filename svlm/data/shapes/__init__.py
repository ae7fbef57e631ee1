"""The embedded `shapes` data set: pictures of coloured shapes drawn with PIL,
with captions (stage 1, task "pretrain") and questions and answers (stage 2,
task "sft"), in English and Chinese.

Each picture is split into four quadrants; a picture holds 1 to `max_shapes`
shapes, each in its own quadrant. Everything is drawn from one seed, so the
same settings always give the same files. The set is written once, in the
original SVLM's format (jsonl of `conversations` + `image`, images in a
folder), to a cache folder named by a hash of the settings, and read back by
the same loader that reads real data:

    <root>/images/train-000000.png ...
    <root>/pretrain_train.jsonl  pretrain_val.jsonl   (captions)
    <root>/sft_train.jsonl       sft_val.jsonl        (several questions a picture, multi-turn)
    <root>/sft_test.jsonl                             (one question a line, with its type and language)

Every record also lists its picture's `objects` (colour, kind, size, and the
centre x, y and radius r as fractions of the side), what the object head
(model.object_head) learns from.

With one shape a picture there are questions on colour, kind, size and
position; with several, the questions name a quadrant or a shape, and count
and existence questions join in.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from svlm.data.drawing import COLOURS, KINDS, SIZES, background, draw_shape, shade
from svlm.data.generated import build_cached, conversation, settings_key
from svlm.errors import ConfigError

VERSION = 6  # bump when the drawing or the wording changes: the cache key includes it

POSITIONS = {"top left": "左上", "top right": "右上", "bottom left": "左下", "bottom right": "右下"}
NUMBERS_ZH = {1: "一", 2: "两", 3: "三", 4: "四"}

CAPTION_PROMPTS = {
    "en": ["Describe the picture.", "What is in this picture?", "What do you see?"],
    "zh": ["描述这张图片。", "这张图里有什么？", "你看到了什么？"],
}


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    size: str
    position: str


@dataclass
class ShapesSpec:
    """What to generate; every field takes part in the cache key."""

    n_train: int = 6000
    n_val: int = 300
    n_test: int = 600
    image_size: int = 64
    max_shapes: int = 1
    languages: tuple[str, ...] = ("en", "zh")
    seed: int = 0

    def __post_init__(self) -> None:
        self.languages = tuple(self.languages)
        if not 1 <= self.max_shapes <= 4:
            raise ConfigError(f"data.max_shapes must be between 1 and 4 (one shape a quadrant), got {self.max_shapes}")
        bad = [lang for lang in self.languages if lang not in ("en", "zh")]
        if bad or not self.languages:
            raise ConfigError(f"data.languages must be a non-empty list of 'en' and 'zh', got {list(self.languages)}")
        if self.image_size < 32:
            raise ConfigError(f"data.image_size must be at least 32, got {self.image_size}")
        if min(self.n_train, self.n_val, self.n_test) < 1:
            raise ConfigError("data.n_train, data.n_val and data.n_test must all be at least 1")

    def key(self) -> str:
        return settings_key(self, VERSION)


# --------------------------------------------------------------------- drawing


def draw(shapes: list[Shape], size: int, rng: random.Random) -> tuple[Image.Image, list[dict]]:
    """The picture, and each shape's attributes and place (the records' `objects`)."""
    objects = []
    image = Image.new("RGB", (size, size), background(rng))
    d = ImageDraw.Draw(image)
    half = size / 2
    for s in shapes:
        col = list(POSITIONS).index(s.position) % 2
        row = list(POSITIONS).index(s.position) // 2
        frac = rng.uniform(0.11, 0.14) if s.size == "small" else rng.uniform(0.20, 0.24)
        r = frac * size
        margin = r + 1
        cx = col * half + rng.uniform(margin, half - margin) if half - margin > margin else col * half + half / 2
        cy = row * half + rng.uniform(margin, half - margin) if half - margin > margin else row * half + half / 2
        draw_shape(d, s.kind, cx, cy, r, shade(s.colour, rng))
        objects.append({"colour": s.colour, "kind": s.kind, "size": s.size, "x": round(cx / size, 4),
                        "y": round(cy / size, 4), "r": round(frac, 4)})  # fmt: skip
    return image, objects


def sample_shapes(max_shapes: int, rng: random.Random) -> list[Shape]:
    n = rng.randint(1, max_shapes)
    places = rng.sample(list(POSITIONS), n)
    return [
        Shape(rng.choice(list(COLOURS)), rng.choice(list(KINDS)), rng.choice(list(SIZES)), place) for place in places
    ]


# --------------------------------------------------------------------- wording


def describe(s: Shape, lang: str) -> str:
    if lang == "en":
        return f"a {s.size} {s.colour} {s.kind} in the {s.position}"
    return f"{POSITIONS[s.position]}方有一个{SIZES[s.size]}的{COLOURS[s.colour][0]}{KINDS[s.kind]}"


def caption(shapes: list[Shape], lang: str) -> str:
    ordered = sorted(shapes, key=lambda s: list(POSITIONS).index(s.position))
    parts = [describe(s, lang) for s in ordered]
    if lang == "en":
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return text[0].upper() + text[1:] + "."
    return "，".join(parts) + "。"


def questions(shapes: list[Shape], multi: bool, lang: str, rng: random.Random) -> list[tuple[str, str, str]]:
    """(question type, question, answer) triples about one picture."""
    en = lang == "en"
    if not multi:
        s = shapes[0]
        return [
            (
                "colour",
                "What colour is the shape?" if en else "这个形状是什么颜色？",
                s.colour if en else COLOURS[s.colour][0],
            ),
            ("kind", "What shape is it?" if en else "这是什么形状？", s.kind if en else KINDS[s.kind]),
            ("size", "Is the shape large or small?" if en else "这个形状是大还是小？", s.size if en else SIZES[s.size]),
            (
                "position",
                "Where is the shape?" if en else "这个形状在哪里？",
                s.position if en else POSITIONS[s.position],
            ),
        ]
    out = []
    s = rng.choice(shapes)
    p_en, p_zh = s.position, POSITIONS[s.position]
    out.append(
        (
            "colour",
            f"What colour is the shape in the {p_en}?" if en else f"{p_zh}的形状是什么颜色？",
            s.colour if en else COLOURS[s.colour][0],
        )
    )
    s = rng.choice(shapes)
    p_en, p_zh = s.position, POSITIONS[s.position]
    out.append(
        ("kind", f"What shape is in the {p_en}?" if en else f"{p_zh}是什么形状？", s.kind if en else KINDS[s.kind])
    )
    s = rng.choice(shapes)
    p_en, p_zh = s.position, POSITIONS[s.position]
    out.append(
        (
            "size",
            f"Is the shape in the {p_en} large or small?" if en else f"{p_zh}的形状是大还是小？",
            s.size if en else SIZES[s.size],
        )
    )
    unique = [s for s in shapes if sum(t.colour == s.colour and t.kind == s.kind for t in shapes) == 1]
    s = rng.choice(unique) if unique else None
    if s is not None:
        c_zh, k_zh = COLOURS[s.colour][0], KINDS[s.kind]
        out.append(
            (
                "position",
                f"Where is the {s.colour} {s.kind}?" if en else f"{c_zh}{k_zh}在哪里？",
                s.position if en else POSITIONS[s.position],
            )
        )
    n = len(shapes)
    out.append(("count", "How many shapes are there?" if en else "图里有几个形状？", str(n) if en else NUMBERS_ZH[n]))
    if rng.random() < 0.5:
        s = rng.choice(shapes)
        colour, kind, present = s.colour, s.kind, True
    else:
        absent = [(c, k) for c in COLOURS for k in KINDS if not any(t.colour == c and t.kind == k for t in shapes)]
        (colour, kind), present = rng.choice(absent), False
    if en:
        out.append(("exists", f"Is there a {colour} {kind}?", "yes" if present else "no"))
    else:
        out.append(("exists", f"有{COLOURS[colour][0]}的{KINDS[kind]}吗？", "有" if present else "没有"))
    return out


# -------------------------------------------------------------------- writing


def _split_records(split: str, n: int, spec: ShapesSpec, root: Path, rng: random.Random) -> dict[str, list[dict]]:
    multi = spec.max_shapes > 1
    files: dict[str, list[dict]] = {"pretrain": [], "sft": []}
    for i in range(n):
        shapes = sample_shapes(spec.max_shapes, rng)
        name = f"{split}-{i:06d}.png"
        image, objects = draw(shapes, spec.image_size, rng)
        image.save(root / "images" / name)
        lang = spec.languages[i % len(spec.languages)]
        cap = caption(shapes, lang)
        files["pretrain"].append(
            {
                "id": f"{split}-{i}",
                "image": name,
                "lang": lang,
                "objects": objects,
                "conversations": conversation([(rng.choice(CAPTION_PROMPTS[lang]), cap)]),
            }
        )
        qa = questions(shapes, multi, lang, rng)
        if split == "test":  # one question a line, for exact-match scoring by type and language
            for qtype, q, a in qa:
                files["sft"].append(
                    {
                        "id": f"{split}-{i}-{qtype}",
                        "image": name,
                        "lang": lang,
                        "type": qtype,
                        "objects": objects,
                        "conversations": conversation([(q, a)]),
                    }
                )
            continue
        if rng.random() < 0.3:  # keep captioning alive in stage 2
            qa.append(("caption", rng.choice(CAPTION_PROMPTS[lang]), cap))
        rng.shuffle(qa)
        files["sft"].append({
            "id": f"{split}-{i}", "image": name, "lang": lang, "types": [t for t, _, _ in qa], "objects": objects,
            "conversations": conversation([(q, a) for _, q, a in qa]),
        })  # fmt: skip
    return files


def build_shapes(spec: ShapesSpec, cache_dir: str | os.PathLike) -> Path:
    """Write the data set under cache_dir (once) and return its folder."""

    def write(root: Path) -> dict[str, list[dict]]:
        rng = random.Random(spec.seed)
        out = {}
        for split, n in (("train", spec.n_train), ("val", spec.n_val), ("test", spec.n_test)):
            for task, records in _split_records(split, n, spec, root, rng).items():
                if not (split == "test" and task == "pretrain"):
                    out[f"{task}_{split}.jsonl"] = records
        return out

    return build_cached("shapes", spec, VERSION, cache_dir, write)
