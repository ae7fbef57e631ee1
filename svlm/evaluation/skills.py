"""Skills as they emerge: at every validation, accuracy per question type on
a fixed set of validation questions, with the picture and with a blank one,
logged (metrics.jsonl, wandb) and drawn against training time.

The questions come from the stage's validation file when its records say
their questions' types (`type`, or `types` one a question: the embedded
shapes and scenes data do): every question of a record is asked alone, with
the record's picture, as eval.py asks the test questions; the first
`stage.skills` of each type in file order are kept, the same ones all run
long. A validation logs

    skills/<type>, skills/all               exact-match accuracy (svlm/evaluation/answers.py)
    skills_blind/<type>, skills_blind/all   the same questions with a blank picture
    time                                    seconds since the stage began

and <run_dir>/skills.png is drawn again from every stage's metrics.jsonl: one
curve per type against minutes of training (stages end to end), solid with
the picture, dashed without it. A model that has not learned to look has
its two curves of a type together.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from svlm.atomic import new_file
from svlm.data.chat import IMAGE_TOKEN, ChatEncoder
from svlm.data.dataset import ChatDataset, encode_record
from svlm.data.formats import DataError, Record, read_records
from svlm.evaluation.answers import accuracy, answer_questions, question_types
from svlm.models.vlm import VLM

MAX_NEW_TOKENS = 12  # the skills' answers are a few words
STAGES = ("stage1", "stage2")


class QuestionSet(ChatDataset):
    """Records already read (a list), encoded up front; images load lazily."""

    def load(self, records: list[Record]) -> None:
        self.examples = []
        for rec in records:
            try:
                self.examples.append(encode_record(rec, self.encoder, self.image_dir, self.max_len, self.max_images)[0])
            except DataError:
                continue  # reported where the validation data was read

    def __len__(self) -> int:
        return len(self.examples)


def single_questions(records: Iterable[Record], per_type: int) -> list[Record]:
    """Each question of each one-picture record, alone with its picture and its
    answer: the first `per_type` of each type."""
    taken: Counter = Counter()
    out = []
    for rec in records:
        if len(rec.images) != 1:
            continue
        users = [text.replace(IMAGE_TOKEN, "").strip() for role, text in rec.turns if role == "user"]
        answers = [text for role, text in rec.turns if role == "assistant"]
        for i, (qtype, q, a) in enumerate(zip(question_types(rec.meta), users, answers)):
            if qtype == "caption" or taken[qtype] >= per_type:
                continue
            taken[qtype] += 1
            meta = {**{k: v for k, v in rec.meta.items() if k != "types"}, "type": qtype}
            out.append(
                Record([("user", f"{IMAGE_TOKEN}\n{q}"), ("assistant", a)], rec.images, f"{rec.where}#{i}", meta)
            )
    return out


def skill_questions(val_file, encoder: ChatEncoder, processor, max_len: int, per_type: int) -> QuestionSet | None:
    """The skill questions of a validation file (a DataFile), or None when it has no typed questions."""
    if per_type <= 0 or val_file is None or val_file.is_table:
        return None
    records = single_questions(read_records(val_file.path, on_error="skip", fmt=val_file.fmt), per_type)
    if not records:
        return None
    found = QuestionSet(records, val_file.images, encoder, processor, max_len)
    return found if len(found) else None


@torch.no_grad()
def score_skills(
    model: VLM,
    tokenizer,
    encoder: ChatEncoder,
    questions: QuestionSet,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    autocast: AbstractContextManager | None = None,
) -> dict[str, float]:
    """skills/<type> and skills_blind/<type> (and /all) on the question set; the
    model's train/eval mode and the random state are as they were afterwards."""
    was_training = model.training
    with torch.random.fork_rng(devices=[]), autocast or nullcontext():
        predictions = answer_questions(model, tokenizer, encoder, questions, batch_size, MAX_NEW_TOKENS, None,
                                       MAX_NEW_TOKENS, rank, world, blind=True)  # fmt: skip
    model.train(was_training)
    out = {}
    for prefix, field in (("skills", "correct"), ("skills_blind", "blind_correct")):
        acc = accuracy(predictions, field)
        out[f"{prefix}/all"] = acc.get("all", float("nan"))
        out.update({f"{prefix}/{k[5:]}": v for k, v in acc.items() if k.startswith("type/")})
    return out


# ----------------------------------------------------------------- the picture


def skill_curves(run_dir: Path) -> dict[str, dict[str, list[float]]]:
    """Per question type: minutes of training (the stages end to end), the
    model's accuracy and the blind accuracy at each validation, from the
    stages' metrics.jsonl."""
    curves: dict[str, dict[str, list[float]]] = {}
    offset = 0.0
    for stage in STAGES:
        path = run_dir / stage / "metrics.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for rec in records:
            for key, value in rec.items():
                if key.startswith("skills/") and key != "skills/all":
                    qtype = key.split("/", 1)[1]
                    c = curves.setdefault(qtype, {"minutes": [], "model": [], "blind": []})
                    c["minutes"].append((offset + rec.get("time", 0.0)) / 60)
                    c["model"].append(value)
                    c["blind"].append(rec.get(f"skills_blind/{qtype}", float("nan")))
        offset += max((r.get("time", 0.0) for r in records), default=0.0)
    return curves


def draw_skills(run_dir: Path, out: Path | None = None) -> Path | None:
    """skills.png in the run folder (None when no validation scored skills)."""
    curves = skill_curves(run_dir)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out or run_dir / "skills.png"
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (qtype, c) in enumerate(sorted(curves.items())):
        colour = f"C{i % 10}"
        ax.plot(c["minutes"], c["model"], color=colour, marker="o", markersize=3, label=qtype)
        ax.plot(c["minutes"], c["blind"], color=colour, linestyle="--", linewidth=1, alpha=0.8)
    ax.plot([], [], color="grey", linestyle="--", label="blank picture")
    ax.set_xlabel("minutes of training (stage 1, then stage 2)")
    ax.set_ylabel("exact-match accuracy on validation questions")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title(f"skills of {run_dir.name} (solid: with the picture, dashed: blank picture)", fontsize=8)
    fig.tight_layout()
    with new_file(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
