"""The question families of the scenes data set, one function a type: each
returns (question, answer) about a scene, or None when the scene has no such
question. `focus` holds the objects a question should be about where it can
(all of them, or the compositional split's held-out pairs); `pairs` the
colour-kind pairs a question may mention when the scene does not hold them."""

from __future__ import annotations

import math
import random

from svlm.data.drawing import COLOURS, KINDS, SIZES
from svlm.data.scenes.world import HAS, PLURALS, YES_NO, Obj, cell_name, name, number, refer

QA = tuple[str, str]


def exists(objs: list[Obj], focus: list[Obj], pairs: list[tuple[str, str]], lang: str, rng: random.Random) -> QA:
    """Is there a red circle? Half yes; of the noes, most name a colour or a kind
    the picture holds, in a pair it does not (a hard negative)."""
    present = {(o.colour, o.kind) for o in objs}
    if rng.random() < 0.5:
        o = rng.choice(focus)
        colour, kind, answer = o.colour, o.kind, True
    else:
        absent = [p for p in pairs if p not in present]
        hard = [p for p in absent if any(p[0] == o.colour or p[1] == o.kind for o in objs)]
        colour, kind = rng.choice(hard if hard and rng.random() < 0.8 else absent)
        answer = False
    yes, no = HAS[lang]
    if lang == "en":
        return f"Is there a {colour} {kind}?", yes if answer else no
    return f"有{COLOURS[colour][0]}{KINDS[kind]}吗？", yes if answer else no


def count(objs: list[Obj], focus: list[Obj], pairs, lang: str, rng: random.Random) -> QA:
    """How many objects / red objects / circles / large objects are there?"""
    what = rng.choice(["all", "colour", "kind", "size"])
    en = lang == "en"
    if what == "all":
        n, q = len(objs), "How many objects are there?" if en else "图里有几个物体？"
    elif what == "colour":
        c = rng.choice(focus).colour if rng.random() < 0.75 else rng.choice(list(COLOURS))
        n = sum(o.colour == c for o in objs)
        q = f"How many {c} objects are there?" if en else f"有几个{COLOURS[c][0]}的物体？"
    elif what == "kind":
        k = rng.choice(focus).kind if rng.random() < 0.75 else rng.choice(list(KINDS))
        n = sum(o.kind == k for o in objs)
        q = f"How many {PLURALS[k]} are there?" if en else f"有几个{KINDS[k]}？"
    else:
        s = rng.choice(list(SIZES))
        n = sum(o.size == s for o in objs)
        q = f"How many {s} objects are there?" if en else f"有几个{SIZES[s]}的物体？"
    return q, number(n, lang)


ASK = {  # attribute: (English question, Chinese question, the answer)
    "colour": (
        "What colour is {}?",
        "{}是什么颜色？",
        lambda o, lang: o.colour if lang == "en" else COLOURS[o.colour][0],
    ),
    "kind": ("What shape is {}?", "{}是什么形状？", lambda o, lang: o.kind if lang == "en" else KINDS[o.kind]),
    "size": ("Is {} large or small?", "{}是大还是小？", lambda o, lang: o.size if lang == "en" else SIZES[o.size]),
    "position": ("Where is {}?", "{}在哪里？", cell_name),
}


def attribute(attr: str, objs: list[Obj], focus: list[Obj], lang: str, rng: random.Random) -> QA | None:
    """What colour is the triangle? (colour, kind, size, position): the object is
    named by what makes it unique, never by the attribute asked for."""
    named = [(o, ref) for o in focus if (ref := refer(o, objs, attr, lang, rng)) is not None]
    if not named:
        return None
    o, ref = rng.choice(named)
    q_en, q_zh, answer = ASK[attr]
    return (q_en if lang == "en" else q_zh).format(ref), answer(o, lang)


def obj(objs: list[Obj], focus: list[Obj], pairs, lang: str, rng: random.Random) -> QA:
    """The object with an attribute: What is in the top left? / Which object is large?"""
    en = lang == "en"
    sizes = [s for s in SIZES if sum(o.size == s for o in objs) == 1 and any(o.size == s for o in focus)]
    if sizes and rng.random() < 0.3:
        s = rng.choice(sizes)
        o = next(o for o in objs if o.size == s)
        return (f"Which object is {s}?" if en else f"哪个物体是{SIZES[s]}的？"), name(o, lang)
    o = rng.choice(focus)
    return (f"What is in the {cell_name(o, 'en')}?" if en else f"{cell_name(o, 'zh')}是什么？"), name(o, lang)


def relation(objs: list[Obj], focus: list[Obj], pairs, lang: str, rng: random.Random) -> QA | None:
    """Is the red circle to the left of / above the blue square? (yes / no,
    balanced; neither object named by its place) or What is nearest to the red circle?"""
    if len(objs) < 2:
        return None
    if rng.random() < 0.25:
        nearest = closest(objs, focus, lang, rng)
        if nearest is not None:
            return nearest
    way = rng.choice(["left", "above"])
    holds = (lambda a, b: a.col < b.col) if way == "left" else (lambda a, b: a.row < b.row)
    want = rng.random() < 0.5
    named = [(a, b) for a in objs for b in objs if a is not b and (a in focus or b in focus)]
    chosen = [(a, b) for a, b in named if holds(a, b) == want] or named
    a, b = rng.choice(chosen)
    ref_a, ref_b = refer(a, objs, "position", lang, rng), refer(b, objs, "position", lang, rng)
    if ref_a is None or ref_b is None:  # two alike objects: named by their places, the question gives itself away
        return None
    yes, no = YES_NO[lang]
    answer = yes if holds(a, b) else no
    if lang == "en":
        where = "to the left of" if way == "left" else "above"
        return f"Is {ref_a} {where} {ref_b}?", answer
    return f"{ref_a}在{ref_b}的{'左边' if way == 'left' else '上面'}吗？", answer


def closest(objs: list[Obj], focus: list[Obj], lang: str, rng: random.Random) -> QA | None:
    """What is nearest to the red circle? Only where the nearest is clearly nearer than the next."""
    candidates = []
    for o in focus:
        dist = sorted((math.dist((o.x, o.y), (t.x, t.y)), i) for i, t in enumerate(objs) if t is not o)
        if len(dist) == 1 or dist[1][0] >= 1.25 * dist[0][0]:
            candidates.append((o, objs[dist[0][1]]))
    if not candidates:
        return None
    o, near = rng.choice(candidates)
    ref = refer(o, objs, "", lang, rng)
    return (f"What is nearest to {ref}?" if lang == "en" else f"离{ref}最近的是什么？"), name(near, lang)


def compare(objs: list[Obj], focus: list[Obj], pairs, lang: str, rng: random.Random) -> QA:
    """Are there more circles than squares? / more red objects than blue objects? (yes / no, balanced)"""
    attr = rng.choice(["kind", "colour"])
    values = list(KINDS) if attr == "kind" else list(COLOURS)
    n = {v: sum(getattr(o, attr) == v for o in objs) for v in values}
    want = rng.random() < 0.5
    options = [(a, b) for a in values for b in values if a != b and n[a] + n[b] > 0]
    chosen = [(a, b) for a, b in options if (n[a] > n[b]) == want] or options
    a, b = rng.choice(chosen)
    yes, no = YES_NO[lang]
    answer = yes if n[a] > n[b] else no
    if lang == "en":
        if attr == "kind":
            return f"Are there more {PLURALS[a]} than {PLURALS[b]}?", answer
        return f"Are there more {a} objects than {b} objects?", answer
    if attr == "kind":
        return f"{KINDS[a]}比{KINDS[b]}多吗？", answer
    return f"{COLOURS[a][0]}的物体比{COLOURS[b][0]}的物体多吗？", answer


def ask(qtype: str, objs: list[Obj], focus: list[Obj], pairs, lang: str, rng: random.Random) -> QA | None:
    """One question of a type (see svlm/data/scenes/__init__.py), or None when the scene has none."""
    if qtype in ASK:
        return attribute(qtype, objs, focus, lang, rng)
    family = {"exists": exists, "count": count, "object": obj, "relation": relation, "compare": compare}[qtype]
    return family(objs, focus, pairs, lang, rng)
