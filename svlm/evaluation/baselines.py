"""What a model scores without looking, to read its real score against.

- blind: the same model, each picture replaced by a blank one (every pixel
  the encoder's mean colour: zeros once normalised; answer_questions in
  svlm/evaluation/answers.py). A model that reads only the question scores
  the same with and without the picture.
- majority: the most common answer of each question type (and language) in
  the training data, given to every question of that type: what the
  question's type alone is worth.

Both are scored per question type beside the real score (eval.py,
svlm/evaluation/evaluate.py) and during training (svlm/evaluation/skills.py).
The majority needs training records that say their questions' types (the
embedded shapes and scenes data do: `types`, one a question).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

from svlm.data.formats import Record
from svlm.evaluation.answers import normalize, question_types

Majority = dict[tuple[str, str | None], str]  # (question type, language): the answer


def majority_answers(records: Iterable[Record]) -> Majority:
    """The most common normalised answer of each (question type, language) in
    `records`; empty when no record says its questions' types."""
    counts: dict[tuple[str, str | None], Counter] = defaultdict(Counter)
    for rec in records:
        answers = [text for role, text in rec.turns if role == "assistant"]
        lang = rec.meta.get("lang")
        for qtype, answer in zip(question_types(rec.meta), answers):
            counts[(qtype, lang)][normalize(answer)] += 1
    return {key: c.most_common(1)[0][0] for key, c in counts.items()}


def majority_correct(prediction: dict, majority: Majority) -> bool | None:
    """Whether the majority answer of the prediction's type is its reference (None: no majority known)."""
    guess = majority.get((prediction.get("type"), prediction.get("lang")))
    return None if guess is None else guess == normalize(prediction["reference"])
