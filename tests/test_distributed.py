"""Two CPU processes over gloo train exactly like one process with twice the
micro-batch, through `accelerate launch` and `torchrun`; a run stopped with 2
processes resumes with 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, path_overrides, tiny_train_overrides
from test_streaming import shards  # noqa: F401  (the parquet shards fixture)

from svlm.model_folder import load_model
from svlm.training.checkpoint import checkpoints, load_trainer_state

STEPS = 6


def _overrides(tmp_path: Path, cache: Path, run: str, micro: int, *extra: str) -> list[str]:
    overrides = [o for o in tiny_train_overrides("stage1", steps=STEPS) if not o.startswith("stage.batch_size")]
    return [*overrides, *path_overrides(tmp_path, cache)[1:], "stage.batch_size=8", f"hardware.micro_batch_size={micro}",
            "stage.log_every=1", "stage.epochs=1", "stage.steps_per_epoch=6", f"hydra.run.dir={tmp_path}/outputs/{run}",
            *extra]  # fmt: skip


def _run(cmd: list[str], cache: Path) -> None:
    env = {**os.environ, "SVLM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "stage1" / "metrics.jsonl").read_text().splitlines()]
    return [m["train/loss"] for m in lines if "train/loss" in m]


def _assert_same(run_a: Path, run_b: Path) -> None:
    assert _losses(run_a) == pytest.approx(_losses(run_b), rel=1e-5)
    a, _, _ = load_model(run_a / "stage1" / "model")
    b, _, _ = load_model(run_b / "stage1" / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir, shapes_root):
    base = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "train.py", *_overrides(base, cache_dir, "one", 8)], cache_dir)
    return base


def test_two_processes_with_accelerate_equal_one(one_process, cache_dir):
    base = one_process
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", "29517", "train.py"]  # fmt: skip
    _run([*launch, *_overrides(base, cache_dir, "accelerate", 4)], cache_dir)
    _assert_same(base / "outputs" / "one", base / "outputs" / "accelerate")


def test_two_processes_with_torchrun_then_resume_with_one(one_process, cache_dir):
    base = one_process
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
                "train.py"]  # fmt: skip
    _run([*torchrun, *_overrides(base, cache_dir, "torchrun", 4, "stage.save_every=3")], cache_dir)
    run = base / "outputs" / "torchrun"
    _assert_same(base / "outputs" / "one", run)
    (ckpt,) = checkpoints(run / "stage1")  # step 3, written by 2 processes
    state = load_trainer_state(ckpt)
    assert state["world"] == 2 and state["position"]["samples_in_epoch"] == 24
    # resume that checkpoint with ONE process and micro-batch 8: the same samples, the same result
    _run([sys.executable, "train.py", f"resume={ckpt}", f"paths.outputs={base}/outputs", "hardware.micro_batch_size=8",
          f"hydra.run.dir={base}/outputs/resumed"], cache_dir)  # fmt: skip
    _assert_same(base / "outputs" / "one", run)


def test_eval_with_two_processes_gathers_the_same_results(one_process, cache_dir):
    base = one_process
    model = base / "outputs" / "one" / "stage1" / "model"
    common = [f"ckpt={model}", f"paths.outputs={base}/outputs", "data=shapes", "data.n_train=64", "data.n_val=16",
              "data.n_test=16", "data.image_size=32", "batch_size=5"]  # fmt: skip
    _run([sys.executable, "eval.py", *common, f"hydra.run.dir={base}/eval-one"], cache_dir)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    _run([*torchrun, "eval.py", *common, f"hydra.run.dir={base}/eval-two"], cache_dir)
    one = json.loads((base / "eval-one" / "results.json").read_text())
    two = json.loads((base / "eval-two" / "results.json").read_text())
    assert one["accuracy_by"]["n"] == two["accuracy_by"]["n"] == 16 * 4  # every question once
    assert two["accuracy"] == one["accuracy"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    lines = (base / "eval-two" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 64 and len({json.loads(x)["where"] for x in lines}) == 64


def test_two_processes_stream_and_resume_exactly(shards, tmp_path, cache_dir):  # noqa: F811
    """data.streaming=true over 2 processes: each reads its own row groups; the
    step-3 checkpoint resumed (2 processes again) gives the uninterrupted losses."""
    from test_streaming import streaming_data

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29520",
                "train.py"]  # fmt: skip
    data = [*streaming_data(shards), "stage.sample_grid=0", "stage.save_every=3", "stage.keep_last=0"]
    _run([*torchrun, *_overrides(tmp_path, cache_dir, "full", 4, *data)], cache_dir)
    run = tmp_path / "outputs" / "full"
    uninterrupted = _losses(run)
    ckpt = checkpoints(run / "stage1")[0]
    assert ckpt.name == "step-0000003" and load_trainer_state(ckpt)["stream"]["readers"] == 2
    _run([*torchrun, f"resume={ckpt}", f"paths.outputs={tmp_path}/outputs",
          f"hydra.run.dir={tmp_path}/outputs/resumed"], cache_dir)  # fmt: skip
    assert len(uninterrupted) == STEPS and _losses(run) == pytest.approx(uninterrupted, rel=1e-5)
