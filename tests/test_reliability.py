"""Reliability: exact resume, atomic checkpoints, graceful stop, numerical guards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DATA_OVERRIDES, REPO, path_overrides, tiny_train_overrides

from svlm.data.formats import DataError
from svlm.errors import ConfigError
from svlm.model_folder import load_model, save_model
from svlm.models.vlm import VLM, VLMOutput
from svlm.training import loop
from svlm.training.checkpoint import TRAINER_STATE, checkpoints, load_trainer_state
from svlm.training.loop import train
from svlm.training.signals import TrainingStopped


def losses(run_dir: Path, stage: str) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}


class StopAfter(loop.StopRequested):
    """A signal that 'arrives' during the n-th step (deterministic, no real signal)."""

    n = 3

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    @property
    def signal(self):
        self.reads += 1
        return "SIGTERM" if self.reads >= self.n else None

    @signal.setter
    def signal(self, value):
        pass


def test_resume_gives_the_same_losses(make_train_cfg, tmp_path, monkeypatch):
    extra = ["stage.stage1.log_every=1", "stage.stage2.log_every=1", "stage.stage1.eval_every=2"]
    full = make_train_cfg(*extra, steps=6, run_dir=tmp_path / "outputs" / "full")
    train(full)

    cut = make_train_cfg(*extra, steps=6, run_dir=tmp_path / "outputs" / "cut")
    monkeypatch.setattr(loop, "StopRequested", StopAfter)
    with pytest.raises(TrainingStopped) as stopped:
        train(cut)
    assert stopped.value.exit_code == 0 and "resume with: python train.py resume=" in str(stopped.value)
    (ckpt,) = checkpoints(Path(cut.paths.run_dir) / "stage1")
    assert ckpt.name == "step-0000003" and load_trainer_state(ckpt)["position"]["step"] == 3
    monkeypatch.undo()

    resumed = make_train_cfg(*extra, f"resume={cut.paths.run_dir}", steps=6)
    results = train(resumed)
    assert results == [Path(cut.paths.run_dir) / "stage1" / "model", Path(cut.paths.run_dir) / "stage2" / "model"]
    for stage in ("stage1", "stage2"):
        a, b = losses(Path(full.paths.run_dir), stage), losses(Path(cut.paths.run_dir), stage)
        assert sorted(a) == sorted(b) == list(range(1, 7))
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5), (stage, step)
    one, _, _ = load_model(Path(full.paths.run_dir) / "stage2" / "model")
    two, _, _ = load_model(Path(cut.paths.run_dir) / "stage2" / "model")
    for (name, p), q in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_errors(make_train_cfg, tmp_path):
    with pytest.raises(ConfigError, match="resume="):
        train(make_train_cfg(f"resume={tmp_path}/nowhere"))
    with pytest.raises(ConfigError, match="resume=latest"):
        train(make_train_cfg("resume=latest"))


def test_cut_short_checkpoint_leaves_the_previous_one(trained_model, tmp_path, monkeypatch):
    model, tokenizer = trained_model
    stage_dir = tmp_path / "stage1"
    first = save_model(stage_dir / "checkpoints" / "step-0000001", model, tokenizer, {}, {TRAINER_STATE: {"a": 1}})

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(stage_dir / "checkpoints" / "step-0000002", model, tokenizer, {}, {TRAINER_STATE: {"a": 2}})
    with pytest.raises(OSError, match="disk full"):  # overwriting in place must not lose the old one either
        save_model(first, model, tokenizer, {}, {TRAINER_STATE: {"a": 3}})
    assert checkpoints(stage_dir) == [first]
    assert load_trainer_state(first) == {"a": 1}
    load_model(first)


@pytest.fixture
def trained_model(tokenizer):
    from svlm.models.language_model import LMConfig
    from svlm.models.projector import ProjectorConfig
    from svlm.models.vision import VisionConfig
    from svlm.models.vlm import VLMConfig

    cfg = VLMConfig(
        VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2),
        ProjectorConfig(compress="pixel_shuffle", factor=2),
        LMConfig(vocab_size=len(tokenizer), d_model=32, n_layers=1, n_heads=2, max_seq_len=128),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return VLM(cfg), tokenizer


def nan_forward(bad_calls: set[int]):
    """VLM.forward whose loss is NaN on the given call numbers (1-based) of
    training forwards (the memory planner's probe models are not counted)."""
    real = VLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if out.loss is None or not self.training or _in_planner():
            return out
        calls["n"] += 1
        if calls["n"] in bad_calls:
            nan = out.loss * float("nan")
            return VLMOutput(out.logits, nan, nan, out.n_tokens, out.target_index, out.targets)
        return out

    return forward


def _in_planner() -> bool:
    import inspect

    return any(f.filename.endswith("svlm/memory/__init__.py") for f in inspect.stack(0)[2:6])


def test_nan_step_is_skipped(make_train_cfg, monkeypatch):
    cfg = make_train_cfg("stage.log_every=1", stage="stage1", steps=5)
    monkeypatch.setattr(VLM, "forward", nan_forward({2}))
    train(cfg)
    lines = [json.loads(x) for x in (Path(cfg.paths.run_dir) / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "skipped": "non-finite loss"} in lines
    assert all(m["train/loss"] == m["train/loss"] for m in lines if "train/loss" in m)  # no NaN logged
    model, _, _ = load_model(Path(cfg.paths.run_dir) / "stage1" / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_bad_steps_stop_the_run(make_train_cfg, monkeypatch):
    cfg = make_train_cfg("stage.max_bad_steps=2", "stage.save_every=1", stage="stage1", steps=6)
    monkeypatch.setattr(VLM, "forward", nan_forward({3, 4, 5, 6}))
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg)
    assert stopped.value.exit_code == 1
    assert "2 steps in a row" in str(stopped.value) and "step-0000002" in str(stopped.value)
    assert not (Path(cfg.paths.run_dir) / "stage1" / "model").exists()


def test_too_many_bad_samples_stop_the_run(make_train_cfg, tmp_path, shapes_root):
    root = tmp_path / "data"
    root.mkdir()
    (root / "images").symlink_to(shapes_root / "images")
    lines = (shapes_root / "pretrain_train.jsonl").read_text().splitlines()
    lines[5] = "{not json"
    (root / "pretrain_train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = make_train_cfg(f"data.root={root}", "data.kind=files", "data.val_file=null", stage="stage1")
    with pytest.raises(DataError, match=r"(?s)too many bad samples.*pretrain_train.jsonl:6"):
        train(cfg)
    train(make_train_cfg(f"data.root={root}", "data.kind=files", "data.val_file=null", "data.max_bad_fraction=0.05",
                         stage="stage1"))  # fmt: skip


def _train_cmd(tmp_path: Path, cache: Path, *extra: str) -> list[str]:
    overrides = [*tiny_train_overrides("stage1", steps=60), *path_overrides(tmp_path, cache)[1:]]
    overrides = [o for o in overrides if not o.startswith("stage.max_steps")]
    overrides += ["stage.max_steps=60", "stage.epochs=1", "stage.steps_per_epoch=60"]
    return [sys.executable, "train.py", *overrides, "stage.log_every=1", f"hydra.run.dir={tmp_path}/outputs/run",
            *extra]  # fmt: skip


def test_sigterm_saves_and_resume_continues(tmp_path, cache_dir, shapes_root):
    env = {**os.environ, "SVLM_CACHE": str(cache_dir)}
    proc = subprocess.Popen(_train_cmd(tmp_path, cache_dir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = tmp_path / "outputs" / "run" / "stage1" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "resume with: python train.py resume=" in out
    (ckpt,) = checkpoints(tmp_path / "outputs" / "run" / "stage1")
    stopped_at = load_trainer_state(ckpt)["position"]["step"]
    assert 3 <= stopped_at < 60

    again = subprocess.run(
        [sys.executable, "train.py", f"resume={tmp_path}/outputs/run", f"paths.outputs={tmp_path}/outputs",
         f"hydra.run.dir={tmp_path}/outputs/resume"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if "train/loss" in x]
    assert steps == list(range(1, 61))  # every step once: nothing lost, nothing twice
    assert (tmp_path / "outputs" / "run" / "stage1" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, cache_dir, shapes_root):
    env = {**os.environ, "SVLM_CACHE": str(cache_dir)}
    cmd = _train_cmd(tmp_path, cache_dir, "stage.save_every=5")
    full = subprocess.run([*cmd, f"hydra.run.dir={tmp_path}/outputs/full"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "outputs" / "run" / "stage1" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 23):
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no chance to save
    proc.wait()
    again = subprocess.run([sys.executable, "train.py", "resume=latest", f"paths.outputs={tmp_path}/outputs",
                            f"hydra.run.dir={tmp_path}/outputs/resume"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr
    a, b = losses(tmp_path / "outputs" / "full", "stage1"), losses(tmp_path / "outputs" / "run", "stage1")
    assert sorted(a) == sorted(b) == list(range(1, 61))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_data_overrides_are_small():
    assert "data.n_train=64" in DATA_OVERRIDES  # the subprocess tests rely on the tiny data set


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"optimizer": _Evil()}, tmp_path / TRAINER_STATE)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        load_trainer_state(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_training_steps_do_not_read_device_values(make_train_cfg, monkeypatch):
    """Between logging points a step reads no tensor value on the host (on a GPU
    each read would wait for the device): losses, gradient norms and the
    non-finite flags are read together at the next log, validation or checkpoint."""
    import sys

    reads = []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            where = caller.f_code.co_filename
            watched = ("training/loop.py", "training/step.py", "training/metrics.py", "vlm.py", "language_model.py",
                       "projector.py")  # fmt: skip
            if where.endswith(watched):
                reads.append((Path(where).name, caller.f_code.co_name, name))
            return real(self, *args, **kwargs)

        return read

    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    cfg = make_train_cfg("stage.log_every=100", "stage.eval_every=0", "stage.sample_grid=0", stage="stage1", steps=6)
    train(cfg)
    # (the sampler's index lists and the CPU checks of image slots and targets are host tensors)
    in_steps = [r for r in reads if r[1] not in ("read", "check_slots", "check_targets", "_grouped", "__iter__")]
    # the only reads: the one log record at the last step (its MoE balancing loss)
    assert in_steps == [("metrics.py", "log_window", "__float__")], in_steps
    assert [r for r in reads if r[1] == "read"] == [("metrics.py", "read", "tolist")]  # Figures.read: one sync
