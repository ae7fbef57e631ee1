"""The real harness: lmms-eval's own command line scores a model trained here,
through our OpenAI-compatible server (`--model openai`), on a task written
here (json questions, images by path, generate_until, exact match), and gets
the accuracy eval.py gets on the same questions.

lmms-eval needs a venv of its own (README, "Benchmark scores"): set
SVLM_LMMS_EVAL_PYTHON to its python to run this (slow tier)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, compose, path_overrides

LMMS_PYTHON = os.environ.get("SVLM_LMMS_EVAL_PYTHON")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not LMMS_PYTHON,
        reason="set SVLM_LMMS_EVAL_PYTHON to a python with lmms-eval (python -m venv .venv-eval && "
        ".venv-eval/bin/pip install lmms-eval==0.7.3 torch==2.13.0)",
    ),
]

TASK_YAML = """task: svlm_shapes
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = """import re

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def normalize(text):  # eval.py's: lower case, no surrounding space or final punctuation
    return re.sub(r"[\\s.\u3002!\uff01?\uff1f,\uff0c]+$", "", text.strip().lower())


def process_results(doc, results):
    return {"exact_match": float(normalize(results[0]) == normalize(doc["answer"]))}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# model=tiny in the shape transformers' LLaVA takes (README, Export): no norm, no merging, a layer's output
LLAVA_SHAPE = ["model.projector.norm=false", "model.projector.compress=none", "model.vision.feature_layer=-1",
               "model.vision.patch_size=8"]  # fmt: skip


@pytest.fixture(scope="module")
def scored(tmp_path_factory, cache_dir):
    """A model trained here (the default recipe shortened, as tests/test_learning.py: it answers some
    questions right), 24 shapes test questions as lmms-eval's json task and as an SVLM test file, and
    eval.py's predictions on them."""
    from svlm.config import load_eval_config, load_train_config
    from svlm.data.source import data_root
    from svlm.evaluation.evaluate import evaluate
    from svlm.training.loop import train

    tmp = tmp_path_factory.mktemp("lmms")
    overrides = ["hardware=cpu", "stage.stage1.max_steps=200", "stage.stage2.max_steps=200", "stage.sample_grid=0",
                 *LLAVA_SHAPE, *path_overrides(tmp, cache_dir, tmp / "run")]  # fmt: skip
    cfg = load_train_config(compose("train", overrides))
    _, model = train(cfg)
    root = data_root(cfg.data, cfg.paths.cache)
    rows = [json.loads(x) for x in (root / "sft_test.jsonl").read_text().splitlines()][:24]
    questions, records = tmp / "questions.jsonl", tmp / "data" / "sft_test.jsonl"
    records.parent.mkdir()
    with open(questions, "w") as q, open(records, "w") as r:
        for row in rows:
            user, answer = row["conversations"][0]["content"], row["conversations"][1]["content"]
            text = user.replace("<image>", "").strip()
            q.write(
                json.dumps({"question": text, "answer": answer, "image": str(root / "images" / row["image"])}) + "\n"
            )
            r.write(json.dumps({"image": row["image"], "conversations": [{"role": "user", "content": text},
                                                                         {"role": "assistant", "content": answer}]})
                    + "\n")  # fmt: skip
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "svlm_shapes.yaml").write_text(TASK_YAML.format(questions=questions, max_new_tokens=8))
    (tasks / "utils.py").write_text(TASK_UTILS)
    data = ["data=shapes", "data.kind=files", f"data.root={records.parent}", f"data.image_dir={root / 'images'}",
            "data.train_file=sft_test.jsonl", "data.val_file=sft_test.jsonl", "data.test_file=sft_test.jsonl"]  # fmt: skip
    ours = evaluate(load_eval_config(compose("eval", [f"ckpt={model}", "hardware=cpu", "max_new_tokens=8",
                                                      *data, *path_overrides(tmp / "eval", cache_dir)])))  # fmt: skip
    predictions = [json.loads(x) for x in (tmp / "eval" / "run" / "predictions.jsonl").read_text().splitlines()]
    assert ours["accuracy_by"]["n"] == len(rows) == len(predictions) and ours["accuracy"] > 0, ours
    return {"model": model, "tasks": tasks, "accuracy": ours["accuracy"], "predictions": predictions, "tmp": tmp}


def lmms_eval(scored: dict, out: Path, *model: str) -> None:
    """lmms-eval's command line on the task, its replies checked against eval.py's, one by one."""
    cmd = [LMMS_PYTHON, "-m", "lmms_eval", *model, "--tasks", "svlm_shapes", "--include_path", str(scored["tasks"]),
           "--batch_size", "1", "--output_path", str(out), "--log_samples"]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": "unused", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=1800)
    found = list(out.rglob("*results*.json"))  # lmms-eval exits 0 after an error too: its results say
    assert done.returncode == 0 and len(found) == 1, done.stdout[-4000:] + done.stderr[-4000:]
    scores = json.loads(found[0].read_text())["results"]["svlm_shapes"]
    theirs = next(v for k, v in scores.items() if k.startswith("exact_match") and "stderr" not in k)
    (samples,) = out.rglob("*samples_svlm_shapes*.jsonl")
    replies = {s["doc_id"]: s["filtered_resps"] for s in map(json.loads, samples.read_text().splitlines())}
    assert len(replies) == len(scored["predictions"])
    for p in scored["predictions"]:  # the same reply to every question (doc k is line k of both files)
        assert replies[p["index"]].strip() == p["answer"].strip(), (replies[p["index"]], p)
    assert theirs == pytest.approx(scored["accuracy"])


def test_lmms_eval_through_our_server_equals_eval_py(scored):
    port = free_port()
    tmp = scored["tmp"]
    server = subprocess.Popen([sys.executable, "-m", "svlm.serve", f"ckpt={scored['model']}", f"port={port}",
                               "hardware=cpu", f"hydra.run.dir={tmp / 'serve'}"], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        lmms_eval(scored, tmp / "openai", "--model", "openai", "--model_args",
                  f"model_version=svlm,base_url=http://127.0.0.1:{port}/v1,num_concurrent=8,timeout=600")  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)


def test_lmms_eval_on_the_llava_export_equals_eval_py(scored):
    export = scored["tmp"] / "export"
    subprocess.run([sys.executable, "-m", "svlm.export", f"ckpt={scored['model']}", f"out={export}",
                    f"hydra.run.dir={scored['tmp'] / 'export-run'}"], cwd=REPO, check=True)  # fmt: skip
    assert json.loads((export / "config.json").read_text())["model_type"] == "llava"
    lmms_eval(
        scored,
        scored["tmp"] / "llava_hf",
        "--model",
        "llava_hf",
        "--model_args",
        f"pretrained={export},device=cpu,device_map=cpu,dtype=float32",
    )
