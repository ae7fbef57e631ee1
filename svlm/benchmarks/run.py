"""Scoring a model on a benchmark: each process answers its share of the
questions (greedy, batched where prompts have one length), the scored
answers are gathered, and the main process aggregates them.

Prompts are built as lmms-eval sends them through an OpenAI-compatible
server: one user turn, the task's text and then the image (our server joins
the parts the same way, and the model's image_placement puts the image where
it was trained to see it), so `eval.py benchmark=<task>` and lmms-eval
`--model openai` against `python -m svlm.serve` ask the same questions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from svlm.benchmarks.task import Questions, Task
from svlm.data.chat import IMAGE_TOKEN, ChatEncoder
from svlm.data.formats import BadSamples, DataError
from svlm.inference.generation import generate
from svlm.models.vision import ImageProcessor
from svlm.models.vlm import VLM

BLOCK = 256  # questions prepared (pictures decoded and preprocessed) at once


def question_ids(encoder: ChatEncoder, processor: ImageProcessor, text: str, images: list):
    """(prompt ids, pixel views or None) of one question with its images after the text."""
    pixels, grids = processor.all_views(images)
    question = "\n".join([text, *[IMAGE_TOKEN] * len(images)])
    return encoder.prompt(question, image=len(images), grids=grids), pixels


@torch.no_grad()
def answer(model: VLM, encoder: ChatEncoder, prompts: list[tuple[list[int], torch.Tensor | None]],
           max_new_tokens: int, batch_size: int) -> list[str]:  # fmt: skip
    """Greedy replies, `batch_size` prompts of any lengths decoding together (a ragged batch:
    batching changes no answer)."""
    device = next(model.parameters()).device
    views = [pixels for _, pixels in prompts if pixels is not None]
    pixel_values = torch.cat(views).to(device) if views else None
    outs = generate(model, [ids for ids, _ in prompts], pixel_values, encoder.stop_ids, max_new_tokens,
                    batch_size=batch_size, banned_ids=encoder.banned_ids)  # fmt: skip
    return [encoder.tok.decode(out, skip_special_tokens=True) for out in outs]


def run_benchmark(
    model: VLM,
    encoder: ChatEncoder,
    questions: Questions,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    rank: int = 0,
    world: int = 1,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    bad: BadSamples | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, predictions: one dict a question) over the first `limit` questions (None: all).
    Every process returns both; a question whose image does not decode is counted in `bad`."""
    task = questions.task
    processor = ImageProcessor(model.cfg.vision)
    shard = list(range(len(questions) if limit is None else min(limit, len(questions))))[rank::world]
    budget = max_new_tokens or task.max_new_tokens
    predictions = []
    was_training = model.training
    model.eval()
    for block in range(0, len(shard), BLOCK):  # a block of questions at a time: their pictures in memory
        asked, prompts = [], []
        for i in shard[block : block + BLOCK]:
            doc = questions.doc(i)
            try:
                images = questions.images(doc, i)
            except DataError as e:  # counted, and the question left out (as a bad sample of training is)
                if bad is not None:
                    bad.add(e)
                continue
            asked.append((i, doc, task.prompt(doc)))
            prompts.append(question_ids(encoder, processor, asked[-1][2], images))
        with autocast():
            replies = answer(model, encoder, prompts, budget, batch_size)
        for (i, doc, text), reply in zip(asked, replies):
            qid = doc.get(task.id_column) if task.id_column else None
            predictions.append({"id": questions.where(i), "question_id": qid, "prompt": text, "answer": reply,
                                "row": i, **task.score(doc, reply)})  # fmt: skip
    model.train(was_training)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, predictions)
        predictions = [p for part in gathered for p in part]
    predictions.sort(key=lambda p: p["row"])
    metrics = task.aggregate(predictions) if predictions else {}
    return metrics, predictions


def write_results(out: Path, task: Task, path: str | Path, metrics: dict, predictions: list[dict]) -> None:
    """results.json (every metric) and predictions.jsonl (one line a question) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    results = {"task": task.name, "repo": task.repo, "split": task.split, "path": str(path),
               "questions": len(predictions), "metrics": metrics}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    keep = ("id", "question_id", "prompt", "answer", "parsed", "correct")
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps({k: p[k] for k in keep}, ensure_ascii=False, default=str) + "\n")


def table(task: Task, metrics: dict, n: int) -> str:
    lines = [f"{task.name} ({task.repo}, {n} questions)"]
    width = max((len(k) for k in metrics), default=0)
    lines += [f"  {k:<{width}}  {v:.4f}" for k, v in metrics.items()]
    return "\n".join(lines)
