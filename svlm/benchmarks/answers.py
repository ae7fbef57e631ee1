"""Reading an answer out of a model's reply, as lmms-eval (0.7.3) does for each task.

- `option_letter`: the choice letter of a free-form reply (lmms-eval's
  `extract_mcq_answer`, used by MMStar): every way a letter can appear is a
  candidate with a priority (standalone at the start 10, at the end 9, after
  an answer phrase 7, "(B)" 6, "B." 5, "B:" 4, "B)" 3, "B " 2, anywhere 0 only
  when nothing else matched); the highest priority wins, the last position
  among equals.
- `yes_no`: MME's reading (from Otter's evaluation): "yes"/"no", a lone
  "y"/"n", else "yes" or "no" within the first four characters, else "other".
- `leading_letter`: AI2D's filter: the letter of a reply that starts "B." (the
  reply itself otherwise).
- `exact_match`: the Hugging Face `evaluate` exact match lmms-eval scores with
  (case and punctuation ignored when asked).
"""

from __future__ import annotations

import re
import string

CHOICES = "ABCDEFGH"
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip
PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
            "space": 2, "fallback": 0}  # fmt: skip


def option_letter(reply: str, choices: str = CHOICES) -> str:
    """The choice letter a reply gives ("" when none is found)."""
    if not reply or not reply.strip():
        return ""
    text = reply.strip()
    for mark in ",.!?;:'\"":  # one after the other, as lmms-eval strips them
        text = text.strip(mark)
    padded = f" {text} "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter)

    def add(kind: str, position: int, letter: str) -> None:
        found.append((PRIORITY[kind], position, letter))

    for kind, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                          ("space", "{} ")):  # fmt: skip
        for letter in choices:
            if pattern.format(letter) in padded:
                add(kind, padded.rfind(pattern.format(letter)), letter)
    lower = padded.lower()
    for phrase in ANSWER_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for letter in choices:
                where = padded.find(letter, at + len(phrase))
                if where != -1:
                    add("phrase", where, letter)
    bare = text.strip()
    for letter in choices:
        if bare.startswith(letter) and (len(bare) == 1 or not bare[1].isalpha()):
            add("start", 0, letter)
        if bare.endswith(letter) and (len(bare) == 1 or not bare[-2].isalpha()):
            add("end", len(padded) - 1, letter)
    if not found:
        for letter in choices:
            if letter in padded:
                add("fallback", padded.rfind(letter), letter)
    return max(found)[2] if found else ""


def yes_no(reply: str) -> str:
    """MME's reading of a reply: "yes", "no" or "other"."""
    text = reply.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")


def leading_letter(reply: str) -> str:
    """AI2D's filter: "B" for a reply starting "B.", else the reply unchanged."""
    match = LEADING_LETTER.match(reply)
    return match.group(1) if match else reply


PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, reference: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
    """1.0 when equal after lower-casing and dropping ASCII punctuation (as asked), else 0.0."""
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        prediction, reference = prediction.translate(PUNCTUATION), reference.translate(PUNCTUATION)
    return float(prediction == reference)
