"""Benchmarks in eval.py (svlm/benchmarks/): a few rows of each in the layout
its hub repository publishes (parquet, with real image bytes), scored by
`eval.py benchmark=<task>`, and our prompts, answer reading and metrics
against lmms-eval's own task functions where lmms-eval is installed."""

import importlib
import io
import json
import random
from pathlib import Path

import datasets
import pytest
from PIL import Image

from svlm.benchmarks.answers import option_letter, yes_no
from svlm.benchmarks.tasks import TASKS
from svlm.errors import ConfigError

IMAGE = datasets.Image()
S = datasets.Value("string")


def png(colour: str) -> dict:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, "PNG")
    return {"bytes": out.getvalue(), "path": None}


def card(configs: dict[str, list[tuple[str, str]]]) -> str:
    """A dataset card declaring each configuration's (split, path pattern)s, as hub repositories do."""
    lines = ["---", "configs:"]
    for config, files in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        lines += [line for split, path in files for line in (f"  - split: {split}", f"    path: {path}")]
    return "\n".join([*lines, "---", ""])


def mmstar(folder: Path) -> None:
    cats = [("coarse perception", "image scene and topic"), ("coarse perception", "image emotion"),
            ("math", "geometry"), ("math", "statistical reasoning")]  # fmt: skip
    rows = [{"index": i, "question": f"Which colour? Options: A: red, B: blue, C: green, D: grey {i}",
             "image": png("red"), "answer": "ABCD"[i % 4], "category": cats[i % 4][0], "l2_category": cats[i % 4][1],
             "meta_info": {"source": "x", "split": "val", "image_path": f"images/{i}.jpg"}} for i in range(12)]  # fmt: skip
    features = datasets.Features({"index": datasets.Value("int64"), "question": S, "image": IMAGE, "answer": S,
                                  "category": S, "l2_category": S,
                                  "meta_info": {"source": S, "split": S, "image_path": S}})  # fmt: skip
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "mmstar.parquet"))
    (folder / "README.md").write_text(card({"val": [("val", "mmstar.parquet")]}))


def pope(folder: Path) -> None:
    rows = [{"id": str(i), "question_id": str(i + 1), "question": f"Is there a {o} in the image?",
             "answer": "yes" if i % 2 else "no", "image_source": f"COCO_{i}", "image": png("blue"),
             "category": ["adversarial", "popular", "random"][i % 3]}
            for i, o in enumerate(["dog", "cat", "car", "cup", "bus", "man"] * 2)]  # fmt: skip
    features = datasets.Features({"id": S, "question_id": S, "question": S, "answer": S, "image_source": S,
                                  "image": IMAGE, "category": S})  # fmt: skip
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))


def mme(folder: Path) -> None:
    rows = []
    for k, category in enumerate(["existence", "count", "code_reasoning", "OCR"]):
        for answer in ("Yes", "No"):
            rows.append({"question_id": f"{category}/{k:04d}.png", "image": png("green"),
                         "question": f"Is it {category}? Please answer yes or no.", "answer": answer,
                         "category": category})  # fmt: skip
    features = datasets.Features({"question_id": S, "image": IMAGE, "question": S, "answer": S, "category": S})
    (folder / "data").mkdir(parents=True)
    for part in range(2):  # two shards, each holding whole pairs
        shard = datasets.Dataset.from_list(rows[part * 4 : part * 4 + 4], features=features)
        shard.to_parquet(str(folder / "data" / f"test-0000{part}-of-00002.parquet"))


def scienceqa(folder: Path) -> None:
    rows = [{"image": png("grey") if i % 5 else None, "question": f"Which is a mammal? ({i})",
             "choices": ["frog", "whale", "trout"][: 2 + i % 2], "answer": i % 2, "hint": "Look closely." if i % 2 else "",
             "task": "closed choice", "grade": "grade4", "subject": "natural science", "topic": "biology",
             "category": "Classification", "skill": "mammals", "lecture": "", "solution": ""} for i in range(10)]  # fmt: skip
    features = datasets.Features({"image": IMAGE, "question": S, "choices": datasets.List(S),
                                  "answer": datasets.Value("int8"), "hint": S, "task": S, "grade": S, "subject": S,
                                  "topic": S, "category": S, "skill": S, "lecture": S, "solution": S})  # fmt: skip
    for config in ("ScienceQA-IMG", "ScienceQA-FULL"):
        (folder / config).mkdir(parents=True)
        for split in ("test", "validation"):
            datasets.Dataset.from_list(rows, features=features).to_parquet(
                str(folder / config / f"{split}-00000-of-00001.parquet"))  # fmt: skip
    splits = ("test", "validation")
    (folder / "README.md").write_text(card({c: [(s, f"{c}/{s}-*") for s in splits] for c in ("ScienceQA-FULL",
                                                                                              "ScienceQA-IMG")}))  # fmt: skip


def ai2d(folder: Path) -> None:
    rows = [{"question": f"What eats the grass? ({i})", "options": ["rabbit", "hawk", "sun", "soil"],
             "answer": str(i % 4), "image": png("yellow")} for i in range(8)]  # fmt: skip
    features = datasets.Features({"question": S, "options": datasets.List(S), "answer": S, "image": IMAGE})
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))


BUILDERS = {"mmstar": mmstar, "pope": pope, "mme": mme, "scienceqa_img": scienceqa, "ai2d": ai2d}


@pytest.fixture(scope="module")
def clones(tmp_path_factory) -> dict[str, Path]:
    """Each benchmark as `git clone` of its repository would give it (folder named like the repository)."""
    root = tmp_path_factory.mktemp("benchmarks")
    out = {}
    for name, build in BUILDERS.items():
        folder = root / TASKS[name].repo.split("/")[1]
        folder.mkdir()
        build(folder)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, cache_dir, shapes_root, tokenizer):
    from conftest import compose, path_overrides, tiny_train_overrides

    from svlm.config import load_train_config
    from svlm.model_folder import save_model
    from svlm.training.prepare import build_model

    base = tmp_path_factory.mktemp("bench_model")
    cfg = load_train_config(compose("train", [*tiny_train_overrides("stage2"), *path_overrides(base, cache_dir)]))
    return save_model(base / "model", build_model(cfg, tokenizer), tokenizer, {"stage": "stage2", "finished": True})


def eval_cfg(model_dir, tmp_path, cache_dir, *extra):
    from conftest import compose, path_overrides

    from svlm.config import load_eval_config

    return load_eval_config(compose("eval", [f"ckpt={model_dir}", "hardware=cpu", "batch_size=4",
                                             *path_overrides(tmp_path, cache_dir), *extra]))  # fmt: skip


EXPECTED = {
    "mmstar": {"coarse perception", "math", "average"},
    "pope": {"pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio"},
    "mme": {"mme_perception_score", "mme_cognition_score"},
    "scienceqa_img": {"exact_match"},
    "ai2d": {"exact_match"},
}


@pytest.mark.parametrize("name", list(TASKS))
def test_eval_py_scores_each_benchmark(name, clones, model_dir, tmp_path, cache_dir, capsys):
    from svlm.evaluation.evaluate import evaluate

    out = evaluate(eval_cfg(model_dir, tmp_path, cache_dir, f"benchmark={name}", f"benchmark.path={clones[name]}",
                            "benchmark.max_new_tokens=4"))  # fmt: skip
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["metrics"]) == EXPECTED[name] and results["task"] == name
    lines = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == results["questions"] == out["questions"] > 0
    assert set(lines[0]) == {"id", "question_id", "prompt", "answer", "parsed", "correct"}
    assert name in capsys.readouterr().out


def test_limit_and_layout_errors(clones, model_dir, tmp_path, cache_dir):
    from svlm.evaluation.evaluate import evaluate

    out = evaluate(eval_cfg(model_dir, tmp_path, cache_dir, "benchmark=pope", f"benchmark.path={clones['pope']}",
                            "benchmark.limit=5", "benchmark.max_new_tokens=2"))  # fmt: skip
    assert out["questions"] == 5
    with pytest.raises(ConfigError, match="benchmark=nope: unknown task; the tasks: mmstar, pope, mme"):
        eval_cfg(model_dir, tmp_path, cache_dir, "benchmark=pope", "benchmark.name=nope", "benchmark.path=x")
    with pytest.raises(ConfigError, match="benchmark.path is required: a local copy of the Lin-Chen/MMStar"):
        eval_cfg(model_dir, tmp_path, cache_dir, "benchmark=mmstar")
    with pytest.raises(ConfigError, match=r"has splits \['test'\], not 'val'.*git clone https://huggingface.co/"
                                          r"datasets/Lin-Chen/MMStar"):  # fmt: skip
        evaluate(eval_cfg(model_dir, tmp_path, cache_dir, "benchmark=mmstar", f"benchmark.path={clones['pope']}"))
    with pytest.raises(ConfigError, match="has no column 'options'.*columns question, options, answer, image"):
        evaluate(eval_cfg(model_dir, tmp_path, cache_dir, "benchmark=ai2d", f"benchmark.path={clones['mme']}"))


REPLIES = ["A", "B", "b", "C.", "(D)", "The answer is B.", "I think A or C", "B. blue", " C", "yes", "No", "no.",
           "Yes, there is.", "y", "n", "nope", "", "A: red", "option D)", "答案是C", "a", "D is right", "none"]  # fmt: skip


def test_answer_reading_by_hand():
    assert [option_letter(r, "ABCD") for r in ["B", "(C)", "The answer is D.", "A. red", "xyz", ""]] == \
        ["B", "C", "D", "A", "", ""]  # fmt: skip
    assert [yes_no(r) for r in ["Yes.", "no", "Y", "not sure", "maybe"]] == ["yes", "no", "yes", "no", "other"]


def lmms_eval_utils(task_folder: str):
    try:
        return importlib.import_module(f"lmms_eval.tasks.{task_folder}.utils")
    except ImportError as e:
        pytest.skip(f"lmms-eval is not installed ({e}): see README, 'Benchmark scores'")


def task_yaml(task_folder: str, yaml_name: str) -> dict:
    """An lmms-eval task YAML, its `include` merged under it (its !function tags read as None)."""
    import yaml

    folder = Path(lmms_eval_utils(task_folder).__file__).parent

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    found = yaml.load((folder / yaml_name).read_text(), Loader=Loader)
    if "include" in found:
        found = {**yaml.load((folder / found.pop("include")).read_text(), Loader=Loader), **found}
    return found


def default_kwargs(task_folder: str, yaml_name: str, name: str) -> dict:
    """The `default` lmms_eval_specific_kwargs of a task, after checking that our task reads the
    repository, configuration and split lmms-eval reads, with its max_new_tokens."""
    found = task_yaml(task_folder, yaml_name)
    task = TASKS[name]
    assert (task.repo, task.split, task.subset) == (found["dataset_path"], found["test_split"],
                                                    found.get("dataset_name"))  # fmt: skip
    assert task.max_new_tokens == (found.get("generation_kwargs") or {}).get("max_new_tokens", 1024)
    return found["lmms_eval_specific_kwargs"]["default"]


def docs_of(name: str, folder: Path) -> list[dict]:
    from svlm.benchmarks.task import Questions

    questions = Questions(TASKS[name], folder)
    return [questions.doc(i) for i in range(len(questions))]


def replies_for(docs: list[dict]) -> list[str]:
    rng = random.Random(0)
    return [rng.choice(REPLIES) for _ in docs]


def test_mcq_and_yes_no_reading_equal_lmms_eval():
    mme = lmms_eval_utils("mme")  # skips without lmms-eval
    mcq = importlib.import_module("lmms_eval.tasks._task_utils.mcq_extract")
    tricky = [*REPLIES, ",.,B", ". B", "B.,", "The correct option is (C) but A", "AB", "Ba", "aB", "C)", "(A) or (B)"]
    for r in tricky:
        assert option_letter(r, "ABCD") == mcq.extract_mcq_answer(r, choices=["A", "B", "C", "D"]), r
        assert yes_no(r) == mme.parse_pred_ans(r), r


def test_prompts_and_metrics_equal_lmms_eval(clones):
    """The same docs and replies through our task and lmms-eval's: the same prompts and metrics."""
    import numpy as np

    # MMStar
    ut, kw = lmms_eval_utils("mmstar"), default_kwargs("mmstar", "mmstar.yaml", "mmstar")
    docs = docs_of("mmstar", clones["mmstar"])
    task, replies = TASKS["mmstar"], replies_for(docs)
    assert [task.prompt(d) for d in docs] == [ut.mmstar_doc_to_text(d, kw) for d in docs]
    theirs = [ut.mmstar_process_results(d, [r]) for d, r in zip(docs, replies)]
    ours = task.aggregate([task.score(d, r) for d, r in zip(docs, replies)])
    for metric, value in ours.items():
        assert value == pytest.approx(ut.mmstar_aggregate_results([t[metric] for t in theirs if metric in t])), metric
    # POPE
    ut, kw = lmms_eval_utils("pope"), default_kwargs("pope", "pope.yaml", "pope")
    docs, task = docs_of("pope", clones["pope"]), TASKS["pope"]
    replies = replies_for(docs)
    assert [task.prompt(d) for d in docs] == [ut.pope_doc_to_text(d, kw) for d in docs]
    theirs = [ut.pope_process_results(d, [r]) for d, r in zip(docs, replies)]
    ours = task.aggregate([task.score(d, r) for d, r in zip(docs, replies)])
    for metric in EXPECTED["pope"]:
        agg = getattr(ut, f"pope_aggregate_{metric.removeprefix('pope_')}")
        assert ours[metric] == pytest.approx(agg([t[metric] for t in theirs])), metric
    # MME
    ut, kw = lmms_eval_utils("mme"), default_kwargs("mme", "mme.yaml", "mme")
    docs, task = docs_of("mme", clones["mme"]), TASKS["mme"]
    replies = replies_for(docs)
    assert [task.prompt(d) for d in docs] == [ut.mme_doc_to_text(d, kw) for d in docs]
    theirs = [ut.mme_process_results(d, [r]) for d, r in zip(docs, replies)]
    ours = task.aggregate([task.score(d, r) for d, r in zip(docs, replies)])
    for metric in EXPECTED["mme"]:
        assert ours[metric] == pytest.approx(ut.mme_aggregate_results([t[metric] for t in theirs if metric in t]))
    # ScienceQA-IMG
    ut, kw = lmms_eval_utils("scienceqa"), default_kwargs("scienceqa", "scienceqa_img.yaml", "scienceqa_img")
    docs, task = docs_of("scienceqa_img", clones["scienceqa_img"]), TASKS["scienceqa_img"]
    replies = replies_for(docs)
    assert [task.prompt(d) for d in docs] == [ut.sqa_doc_to_text(d, kw) for d in docs]
    theirs = np.mean([ut.sqa_process_results(d, [r])["exact_match"] for d, r in zip(docs, replies)])
    assert task.aggregate([task.score(d, r) for d, r in zip(docs, replies)])["exact_match"] == pytest.approx(theirs)
    # AI2D: its regex filter, then the exact match metric (case and punctuation ignored)
    ut, kw = lmms_eval_utils("ai2d"), default_kwargs("ai2d", "ai2d.yaml", "ai2d")
    from lmms_eval.api.metrics import exact_match_hf_evaluate

    docs, task = docs_of("ai2d", clones["ai2d"]), TASKS["ai2d"]
    replies = replies_for(docs)
    assert [task.prompt(d) for d in docs] == [ut.ai2d_doc_to_text(d, kw) for d in docs]
    filtered = ut.MultiChoiceRegexFilter(regex_pattern=r"([A-Z])\.", group_select=0, ignore_case=True,
                                         ignore_punctuation=True).apply([[r] for r in replies], docs)  # fmt: skip
    targets = [ut.ai2d_doc_to_target(d, "mcq") for d in docs]
    theirs = exact_match_hf_evaluate(filtered, targets, ignore_case=True, ignore_punctuation=True)["exact_match"]
    assert task.aggregate([task.score(d, r) for d, r in zip(docs, replies)])["exact_match"] == pytest.approx(theirs)


def test_benchmarks_during_training(clones, make_train_cfg, tmp_path):
    """stage.benchmarks at each validation: bench/<task>/<metric> in metrics.jsonl, drawn in the curves."""
    from svlm.training.loop import train

    root = next(iter(clones.values())).parent
    cfg = make_train_cfg("stage.benchmarks=[pope,ai2d]", "stage.benchmark_limit=4", f"paths.benchmarks={root}",
                         "stage.eval_every=1", stage="stage1", steps=2, run_dir=tmp_path / "run")  # fmt: skip
    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    bench = [m for m in lines if "bench/pope/pope_accuracy" in m]
    assert [m["step"] for m in bench] == [1, 2] and all("bench/ai2d/exact_match" in m for m in bench)
    assert (tmp_path / "run" / "loss_curves.png").is_file()
    with pytest.raises(ConfigError, match=r"stage.benchmarks=\['pope'\] needs paths.benchmarks=<folder>.*POPE"):
        train(make_train_cfg("stage.benchmarks=[pope]", stage="stage1", steps=1, run_dir=tmp_path / "other"))
    with pytest.raises(ConfigError, match="stage.benchmarks: unknown task 'nope'; the tasks: mmstar"):
        make_train_cfg("stage.benchmarks=[nope]", stage="stage1")
