"""The judge-free benchmarks, each as lmms-eval 0.7.3 defines it (its task YAML
and utils.py, with the `default` pre/post prompts): repository, split,
prompt, answer reading, per-question score and aggregate metrics.
tests/test_benchmarks.py feeds the same replies to these and to lmms-eval's
own functions (when it is installed) and gets the same numbers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from statistics import mean

from svlm.benchmarks.answers import exact_match, leading_letter, option_letter, yes_no
from svlm.benchmarks.task import Task

LETTER_POST = "\nAnswer with the option's letter from the given choices directly"
SHORT_POST = "\nAnswer the question using a single word or phrase."
YES_NO_SUFFIX = " Please answer yes or no."  # MMStar and MME drop it when they add their post prompt


def options(choices: list[str]) -> str:
    return "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))


@dataclass(frozen=True)
class MMStar(Task):
    CATEGORIES = ("coarse perception", "fine-grained perception", "instance reasoning", "logical reasoning",
                  "science & technology", "math")  # fmt: skip

    def prompt(self, doc: dict) -> str:
        return doc["question"].strip().replace(YES_NO_SUFFIX, "") + LETTER_POST

    def score(self, doc: dict, reply: str) -> dict:
        letter = option_letter(reply, "ABCD")
        return {"parsed": letter, "correct": letter == doc["answer"].strip().upper(), "category": doc["category"],
                "l2_category": doc["l2_category"]}  # fmt: skip

    @staticmethod
    def by_l2(scored: list[dict]) -> float:
        """The mean over l2 categories of each one's accuracy (lmms-eval's mmstar_aggregate_results)."""
        groups = defaultdict(list)
        for s in scored:
            groups[s["l2_category"]].append(float(s["correct"]))
        return mean(mean(v) for v in groups.values())

    def aggregate(self, scored: list[dict]) -> dict[str, float]:
        out = {c: self.by_l2([s for s in scored if s["category"] == c]) for c in self.CATEGORIES
               if any(s["category"] == c for s in scored)}  # fmt: skip
        return {**out, "average": self.by_l2(scored)}


@dataclass(frozen=True)
class POPE(Task):
    def prompt(self, doc: dict) -> str:
        return doc["question"].strip() + SHORT_POST

    def score(self, doc: dict, reply: str) -> dict:
        pred, truth = reply.lower().strip(), doc["answer"].lower().strip()
        return {"parsed": pred, "correct": pred == truth, "truth": truth}

    def aggregate(self, scored: list[dict]) -> dict[str, float]:
        yes = [s for s in scored if s["truth"] == "yes"]
        tp = sum(s["parsed"] == "yes" for s in yes)
        fp = sum(s["parsed"] == "yes" and s["truth"] == "no" for s in scored)
        fn = sum(s["parsed"] == "no" for s in yes)  # lmms-eval counts a "no" only, not other replies
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        answered = sum(s["truth"] in ("yes", "no") for s in scored)
        return {
            "pope_accuracy": mean(float(s["correct"]) for s in scored),
            "pope_precision": precision,
            "pope_recall": recall,
            "pope_f1_score": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            # lmms-eval's yes ratio is the share of "yes" among the ground truths (VLMEvalKit: among the replies)
            "pope_yes_ratio": len(yes) / answered if answered else 0.0,
        }


@dataclass(frozen=True)
class MME(Task):
    PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")  # fmt: skip

    def prompt(self, doc: dict) -> str:
        return doc["question"].strip().replace(YES_NO_SUFFIX, "") + SHORT_POST

    def score(self, doc: dict, reply: str) -> dict:
        pred = yes_no(reply)
        truth = doc["answer"].lower().strip().replace(".", "")
        return {"parsed": pred, "correct": pred == truth, "question_id": doc["question_id"],
                "category": doc["category"]}  # fmt: skip

    def aggregate(self, scored: list[dict]) -> dict[str, float]:
        """Per category, the mean over its images of acc + acc+ (each image asks a pair of questions: acc
        = share right x 100, acc+ = 100 when both are); the perception and cognition totals are sums of
        their categories. An image with only one of its pair scored (a benchmark limit) is left out."""
        pairs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for s in scored:
            pairs[s["category"]][s["question_id"]].append(float(s["correct"]))
        totals = {"mme_perception_score": 0.0, "mme_cognition_score": 0.0}
        for category, images in pairs.items():
            whole = [v for v in images.values() if len(v) == 2]
            if not whole:
                continue
            score = mean(mean(v) * 100 + (sum(v) == 2) * 100 for v in whole)
            totals["mme_perception_score" if category in self.PERCEPTION else "mme_cognition_score"] += score
        return totals


@dataclass(frozen=True)
class ScienceQA(Task):
    def target(self, doc: dict) -> str:
        return chr(ord("A") + int(doc["answer"]))

    def prompt(self, doc: dict) -> str:
        context = f"Context: {doc['hint']}\n" if doc["hint"] else ""
        return f"{context}{doc['question']}\n{options(doc['choices'])}{LETTER_POST}."

    def score(self, doc: dict, reply: str) -> dict:
        target, pred = self.target(doc).lower(), reply.strip()
        if pred.lower() == target:  # LLaVA's reading: the letter alone, or "B. ..." with a capital and a period
            return {"parsed": pred, "correct": True}
        letter = pred[0] if len(pred) >= 2 and pred[0].isupper() and pred[1] == "." else ""
        return {"parsed": letter or pred, "correct": letter.lower() == target}

    def aggregate(self, scored: list[dict]) -> dict[str, float]:
        return {"exact_match": mean(float(s["correct"]) for s in scored)}


@dataclass(frozen=True)
class AI2D(Task):
    def target(self, doc: dict) -> str:
        return chr(ord("A") + int(doc["answer"]))

    def prompt(self, doc: dict) -> str:
        return f"{doc['question']}\n{options(doc['options'])}{LETTER_POST}."

    def score(self, doc: dict, reply: str) -> dict:
        parsed = leading_letter(reply)
        return {"parsed": parsed, "correct": bool(exact_match(parsed, self.target(doc)))}

    def aggregate(self, scored: list[dict]) -> dict[str, float]:
        return {"exact_match": mean(float(s["correct"]) for s in scored)}


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        MMStar("mmstar", "Lin-Chen/MMStar", "val", ("index", "question", "image", "answer", "category", "l2_category"),
               measures="18 perception and reasoning skills in 6 categories, 1,500 four-choice questions that need "
               "the image", id_column="index", headline=("average", 1.0)),
        POPE("pope", "lmms-lab-encoder/POPE", "test", ("question_id", "question", "answer", "image"),
             max_new_tokens=128, measures="object hallucination: 9,000 yes/no questions on COCO objects",
             id_column="question_id", headline=("pope_accuracy", 1.0)),
        MME("mme", "lmms-lab-encoder/MME", "test", ("question_id", "question", "answer", "image", "category"),
            max_new_tokens=16, measures="14 perception and cognition subtasks, a yes/no pair a picture",
            id_column="question_id", headline=("mme_perception_score", 2000.0)),
        ScienceQA("scienceqa_img", "lmms-lab-encoder/ScienceQA", "test", ("question", "choices", "answer", "hint",
                  "image"), subset="ScienceQA-IMG", max_new_tokens=16,
                  measures="grade-school science questions with a picture, 2,017 multiple choice"),
        AI2D("ai2d", "lmms-lab-encoder/ai2d", "test", ("question", "options", "answer", "image"), max_new_tokens=16,
             measures="science diagrams: 3,088 four-choice questions"),
    )
}  # fmt: skip
