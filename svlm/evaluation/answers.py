"""Questions answered greedily and scored by exact match (after normalising),
overall, per language and per question type (when the records say them):
what eval.py reports as accuracy, and the skill curves during training."""

from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.distributed as dist

from svlm.data.chat import IGNORE, ChatEncoder
from svlm.data.formats import DataError
from svlm.inference.generation import generate
from svlm.models.vlm import VLM

BLOCK = 256  # prompts whose pictures are loaded at once


def normalize(text: str) -> str:
    """Lower case, no surrounding space or final punctuation (English and Chinese)."""
    return re.sub(r"[\s.。!！?？,，]+$", "", text.strip().lower())


def question_types(meta: dict) -> list[str]:
    """The types of a record's questions, in order: `type` (one question a record) or `types` (one a question)."""
    if isinstance(meta.get("type"), str):
        return [meta["type"]]
    found = meta.get("types")
    return [str(t) for t in found] if isinstance(found, list) else []


def first_questions(ds, encoder: ChatEncoder, tokenizer, limit: int | None, max_answer_tokens: int) -> list[dict]:
    """The prompt (ids up to the first answer) and reference of each sample's first
    question; samples whose reference is longer than max_answer_tokens are left
    out (exact match means little for long answers), and so are unreadable ones
    (reported where the data set was loaded)."""
    items = []
    for index in range(len(ds)):
        if limit is not None and len(items) >= limit:
            break
        try:
            ex = ds.example(index)
        except DataError:
            continue
        start = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)  # first answer token
        end = ex.labels.index(encoder.end_id, start) if encoder.end_id in ex.labels[start:] else len(ex.labels)
        if end - start <= max_answer_tokens:
            items.append(
                {"index": index, "ids": ex.input_ids[:start], "reference": tokenizer.decode(ex.labels[start:end])}
            )
    return items


def generate_answers(model: VLM, tokenizer, encoder: ChatEncoder, ds, items: list[dict], batch_size: int,
                     max_new_tokens: int, blind: bool = False) -> None:  # fmt: skip
    """Each item's greedy answer, as item["answer"] (items whose picture cannot be
    read get none). Prompts of any lengths decode together (a ragged batch: each
    row's tokens are those it gets alone), a block at a time so that only a
    block's pictures are in memory; shortest first, so that a block's prompts
    are alike in length and its prefills pad little. blind: every picture blank
    (svlm/evaluation/baselines.py)."""
    device = next(model.parameters()).device
    items = sorted(items, key=lambda it: len(it["ids"]))
    for first in range(0, len(items), BLOCK):
        block = items[first : first + BLOCK]
        fetched = [(it, f) for it in block if (f := ds[it["index"]]) is not None]  # an unreadable image: skipped
        views = [f["pixel_values"] for _, f in fetched if f["pixel_values"] is not None]
        pixel_values = torch.cat(views).to(device) if views else None  # each sample's (k, 3, S, S), in order
        if blind and pixel_values is not None:
            pixel_values = torch.zeros_like(pixel_values)  # the encoder's mean colour, once normalised
        outs = generate(model, [it["ids"] for it, _ in fetched], pixel_values, encoder.stop_ids, max_new_tokens,
                        batch_size=batch_size, banned_ids=encoder.banned_ids)  # fmt: skip
        for (it, _), out in zip(fetched, outs):
            it["answer"] = tokenizer.decode(out, skip_special_tokens=True)


@torch.no_grad()
def answer_questions(
    model: VLM,
    tokenizer,
    encoder: ChatEncoder,
    ds,
    batch_size: int,
    max_new_tokens: int,
    limit: int | None = None,
    max_answer_tokens: int = 16,
    rank: int = 0,
    world: int = 1,
    blind: bool = True,
) -> list[dict]:
    """Greedy answers to the first question of each sample, compared with its
    first answer; with blind, also the answer with a blank picture. Each
    process answers its share; every process gets every prediction, in the
    data set's order: index, where, prompt, reference, answer, correct, lang and
    type (None when the record does not say), blind_answer and blind_correct."""
    items = first_questions(ds, encoder, tokenizer, limit, max_answer_tokens)[rank::world]
    generate_answers(model, tokenizer, encoder, ds, items, batch_size, max_new_tokens)
    if blind:
        seen = [dict(it, answer=None) for it in items]
        generate_answers(model, tokenizer, encoder, ds, seen, batch_size, max_new_tokens, blind=True)
        for it, b in zip(items, seen):
            it["blind_answer"] = b["answer"]
    predictions = [prediction(it, ds, encoder, tokenizer) for it in items if "answer" in it]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, predictions)
        predictions = [p for part in gathered for p in part]
    return sorted(predictions, key=lambda p: p["index"])


def prediction(it: dict, ds, encoder: ChatEncoder, tokenizer) -> dict:
    """An answered item as a prediction (see answer_questions)."""
    ex = ds.example(it["index"])
    question = tokenizer.decode([t for t in it["ids"] if t != encoder.image_id], skip_special_tokens=True)
    out = {
        "index": it["index"], "where": ex.where, "prompt": question.strip(), "reference": it["reference"],
        "answer": it["answer"], "correct": normalize(it["answer"]) == normalize(it["reference"]),
        "lang": ex.meta.get("lang"), "type": (question_types(ex.meta) or [None])[0],
    }  # fmt: skip
    if it.get("blind_answer") is not None:
        out["blind_answer"] = it["blind_answer"]
        out["blind_correct"] = normalize(it["blind_answer"]) == normalize(it["reference"])
    return out


def accuracy(predictions: list[dict], field: str = "correct") -> dict:
    """The share of predictions whose `field` is true: all, per language
    (lang/<x>) and per question type (type/<x>); n: how many were scored.
    Predictions where `field` is missing or None are not counted."""
    totals, hits = defaultdict(int), defaultdict(int)
    for p in predictions:
        if p.get(field) is None:
            continue
        keys = ["all"] + [f"{k}/{p[k]}" for k in ("lang", "type") if p.get(k) is not None]
        for k in keys:
            totals[k] += 1
            hits[k] += bool(p[field])
    out: dict = {k: hits[k] / totals[k] for k in sorted(totals)}
    out["n"] = totals["all"]
    return out
