"""The embedded `scenes` data set: pictures of 1 to `max_objects` coloured
shapes on a 3 x 3 grid, drawn with PIL, with captions (stage 1, task
"pretrain") that name every object, and questions (stage 2, task "sft") that
cannot be answered without looking, in English and Chinese.

Every object has a colour (6), a kind (4), a size (2) and a cell of the grid
(9, each with a name: "top left" ... "centre" ... "bottom right"); its centre
is jittered within its cell. The question types (each test line says its
`type`):

    exists    Is there a red circle?                 yes / no, balanced; most "no"s are hard
                                                     negatives (a red object of another kind,
                                                     or a circle of another colour)
    count     How many objects / red objects / circles / large objects are there?
    colour    What colour is the triangle?           the object named by what makes it unique
    kind      What shape is the red object?
    size      Is the blue square large or small?
    position  Where is the green cross?              a cell's name
    object    What is in the top left? / Which object is large?   "red circle"
    relation  Is the red circle left of the blue square? / ... above ...?   yes / no, balanced;
              What is nearest to the red circle?     "blue square"
    compare   Are there more circles than squares?   yes / no, balanced

A few colour-kind pairs (HELD_OUT, as CLEVR's CoGenT holds out pairs) never
appear in the training, validation or test pictures, nor in their text; the
compositional split's pictures each hold at least one of them, and its
questions ask about those objects where the question type allows.

Everything is drawn from one seed; the set is written once to a cache folder
named by a hash of the settings, in the original SVLM's format:

    <root>/images/train-000000.png ...
    <root>/pretrain_train.jsonl  pretrain_val.jsonl   (captions)
    <root>/sft_train.jsonl       sft_val.jsonl        (data.questions questions a picture, multi-turn,
                                                       each turn's type in "types")
    <root>/sft_test.jsonl                             (one question a line, one of every type a picture)
    <root>/sft_test_compositional.jsonl               (the same, on pictures with held-out pairs)

Every record also lists its picture's `objects` (colour, kind, size, row,
col, and the centre x, y and radius r as fractions of the picture's side).
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from svlm.data.drawing import COLOURS, KINDS
from svlm.data.generated import build_cached, conversation, settings_key
from svlm.data.scenes.questions import ask
from svlm.data.scenes.world import HELD_OUT, Obj, caption, draw, sample_scene
from svlm.errors import ConfigError

VERSION = 1  # bump when the drawing or the wording changes: the cache key includes it

TYPES = ("exists", "count", "colour", "kind", "size", "position", "object", "relation", "compare")
CAPTION_PROMPTS = {
    "en": ["Describe the picture.", "What is in this picture?", "What do you see?"],
    "zh": ["描述这张图片。", "这张图里有什么？", "你看到了什么？"],
}


@dataclass
class ScenesSpec:
    """What to generate; every field takes part in the cache key."""

    n_train: int = 8000
    n_val: int = 300
    n_test: int = 400
    n_compositional: int = 200
    image_size: int = 72
    max_objects: int = 4
    questions: int = 12  # questions a training picture is asked (in one multi-turn sequence)
    languages: tuple[str, ...] = ("en", "zh")
    seed: int = 0

    def __post_init__(self) -> None:
        self.languages = tuple(self.languages)
        if not 1 <= self.max_objects <= 6:
            raise ConfigError(f"data.max_objects must be between 1 and 6, got {self.max_objects}")
        bad = [lang for lang in self.languages if lang not in ("en", "zh")]
        if bad or not self.languages:
            raise ConfigError(f"data.languages must be a non-empty list of 'en' and 'zh', got {list(self.languages)}")
        if self.image_size < 36:
            raise ConfigError(f"data.image_size must be at least 36 (12 pixels a cell), got {self.image_size}")
        if min(self.n_train, self.n_val, self.n_test) < 1 or self.n_compositional < 0:
            raise ConfigError("data.n_train, data.n_val and data.n_test must be at least 1, data.n_compositional >= 0")
        if self.questions < 1:
            raise ConfigError(f"data.questions is a number of questions a picture (>= 1), got {self.questions}")

    def key(self) -> str:
        return settings_key(self, VERSION)


# -------------------------------------------------------------------- writing


def questions(objs: list[Obj], focus: list[Obj], pairs, lang: str, types: list[str], rng: random.Random) -> list:
    """(type, question, answer) for each of `types` the scene has a question of, no question twice."""
    out, seen = [], set()
    for qtype in types:
        for _ in range(4):  # a type may have no question for a draw (two alike objects): draw again
            qa = ask(qtype, objs, focus, pairs, lang, rng)
            if qa is not None and qa[0] not in seen:
                seen.add(qa[0])
                out.append((qtype, *qa))
                break
    return out


def training_types(n: int, rng: random.Random) -> list[str]:
    """n question types: every type once (in a random order) before any twice."""
    out: list[str] = []
    while len(out) < n:
        out += rng.sample(TYPES, len(TYPES))
    return out[:n]


def picture(split: str, i: int, spec: ScenesSpec, root: Path, rng: random.Random) -> tuple[list[Obj], dict]:
    """A scene drawn to images/<split>-<i>.png; its record's common keys."""
    objs = sample_scene(spec.max_objects, rng, novel=split == "compositional")
    file = f"{split}-{i:06d}.png"
    draw(objs, spec.image_size, rng).save(root / "images" / file)
    lang = spec.languages[i % len(spec.languages)]
    return objs, {"id": f"{split}-{i}", "image": file, "lang": lang, "objects": [asdict(o) for o in objs]}


def split_records(split: str, n: int, spec: ScenesSpec, root: Path, rng: random.Random) -> dict[str, list[dict]]:
    """The records of a split by task: pretrain (captions) and sft (questions)."""
    pairs = [(c, k) for c in COLOURS for k in KINDS if split == "compositional" or (c, k) not in HELD_OUT]
    files: dict[str, list[dict]] = {"pretrain": [], "sft": []}
    for i in range(n):
        objs, rec = picture(split, i, spec, root, rng)
        lang = rec["lang"]
        focus = [o for o in objs if (o.colour, o.kind) in HELD_OUT] or objs
        cap = caption(objs, lang)
        prompt = rng.choice(CAPTION_PROMPTS[lang])
        files["pretrain"].append({**rec, "conversations": conversation([(prompt, cap)])})
        if split in ("test", "compositional"):  # one question a line, of every type, for scoring
            for qtype, q, a in questions(objs, focus, pairs, lang, list(TYPES), rng):
                line = {**rec, "id": f"{rec['id']}-{qtype}", "type": qtype}
                files["sft"].append({**line, "conversations": conversation([(q, a)])})
            continue
        qa = questions(objs, focus, pairs, lang, training_types(spec.questions, rng), rng)
        if rng.random() < 0.3:  # keep captioning alive in stage 2
            qa.insert(rng.randrange(len(qa) + 1), ("caption", prompt, cap))
        turns = [(q, a) for _, q, a in qa]
        files["sft"].append({**rec, "types": [t for t, _, _ in qa], "conversations": conversation(turns)})
    return files


def build_scenes(spec: ScenesSpec, cache_dir: str | os.PathLike) -> Path:
    """Write the data set under cache_dir (once) and return its folder."""

    def write(root: Path) -> dict[str, list[dict]]:
        rng = random.Random(spec.seed)
        out = {}
        splits = (("train", spec.n_train), ("val", spec.n_val), ("test", spec.n_test))
        for split, n in (*splits, ("compositional", spec.n_compositional)):
            records = split_records(split, n, spec, root, rng)
            if split in ("train", "val"):
                out[f"pretrain_{split}.jsonl"] = records["pretrain"]
            out[f"sft_{'test_compositional' if split == 'compositional' else split}.jsonl"] = records["sft"]
        return out

    return build_cached("scenes", spec, VERSION, cache_dir, write)
