"""End-to-end smoke tests: tiny trainings (3 steps a stage), checkpoints,
evaluation, inference, generation, and the entry scripts as subprocesses."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DATA_OVERRIDES, REPO, compose, path_overrides, tiny_train_overrides

import svlm
from svlm.config import ConfigError, load_eval_config, load_infer_config, load_train_config
from svlm.data.chat import ChatEncoder
from svlm.evaluation.evaluate import evaluate
from svlm.inference.ask import ask
from svlm.inference.generation import generate
from svlm.model_folder import load_model, resolve_model, save_model
from svlm.models.kv_cache import KVCache
from svlm.models.vision import ImageProcessor
from svlm.training.loop import train
from svlm.training.prepare import build_model

MODEL_FILES = ["model.safetensors", "config.json", "vision_config.json", "svlm.json", "tokenizer.json"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir, shapes_root):
    """One stage=both run of the tiny config, shared by the tests below."""
    base = tmp_path_factory.mktemp("trained")
    cfg = load_train_config(compose("train", [*tiny_train_overrides("both"), *path_overrides(base, cache_dir)]))
    return cfg, train(cfg)


def test_train_both_stages(trained):
    cfg, results = trained
    run = Path(cfg.paths.run_dir)
    assert results == [run / "stage1" / "model", run / "stage2" / "model"]
    assert (run / "config.yaml").is_file()
    assert (run / "loss_curves.png").stat().st_size > 10_000  # train and validation loss, both stages
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["lm"]["d_model"] == 64
    keys = set()
    for stage, folder in zip(("stage1", "stage2"), results):
        for name in MODEL_FILES:
            assert (folder / name).is_file(), f"{folder}/{name}"
        meta = json.loads((folder / "svlm.json").read_text())
        assert meta["stage"] == stage and meta["step"] == 3 and meta["finished"] is True
        keys.add(meta["model_key"])
        metrics = read_jsonl(run / stage / "metrics.jsonl")
        train_lines = [m for m in metrics if "train/loss" in m]
        assert [m["step"] for m in train_lines][-1] == 3
        assert all(math.isfinite(m["train/loss"]) and m["train/loss"] > 0 for m in train_lines)
        val_lines = [m for m in metrics if "val/loss" in m]
        assert val_lines and val_lines[-1]["step"] == 3 and math.isfinite(val_lines[-1]["val/loss"])
        assert json.loads((run / stage / "bad_samples.json").read_text())["total"] == 0
    assert len(keys) == 1  # both stages trained the same model config


def test_stage2_continues_stage1(trained):
    _, (stage1, stage2) = trained
    m1, tok1, _ = load_model(stage1)
    m2, tok2, _ = load_model(stage2)
    assert tok1.get_vocab() == tok2.get_vocab()
    fresh = build_model(trained[0], tok1)
    # stage 2 moved on from stage 1's weights, which moved on from a fresh start
    w = "lm.layers.0.attn.q_proj.weight"
    s1, s2, s0 = m1.state_dict()[w], m2.state_dict()[w], fresh.state_dict()[w]
    assert not torch.equal(s1, s2)
    # 3 small steps from stage 1 stay far closer to it than a new random init would be
    assert (s2 - s1).norm() < 0.5 * (s0 - s1).norm()


def test_stage2_without_stage1_fails(make_train_cfg, tmp_path):
    cfg = make_train_cfg(stage="stage2")
    with pytest.raises(ConfigError, match=r"stage=stage2 needs a stage-1 model") as e:
        train(cfg)
    assert str(tmp_path / "outputs") in str(e.value) and "init_from" in str(e.value)


def test_stage2_starts_from_newest_matching_stage1(make_train_cfg, tmp_path, capsys):
    out = tmp_path / "outputs"
    (old,) = train(make_train_cfg(stage="stage1", steps=1, run_dir=out / "a"))
    (new,) = train(make_train_cfg(stage="stage1", steps=1, run_dir=out / "b"))
    # newest of all, but another model config: not a valid start
    (other,) = train(make_train_cfg("model.lm.n_layers=1", stage="stage1", steps=1, run_dir=out / "c"))
    capsys.readouterr()
    (result,) = train(make_train_cfg(stage="stage2", steps=1, run_dir=out / "d"))
    log = capsys.readouterr().out
    assert f"[stage2] starting from {new}" in log
    assert (
        f"[stage2] CPU: {torch.get_num_threads()} threads (OMP_NUM_THREADS), waiting {svlm.WAIT_POLICY}" in log
    )  # the policy named
    meta = json.loads((result / "svlm.json").read_text())
    assert meta["stage"] == "stage2"
    assert meta["model_key"] == json.loads((new / "svlm.json").read_text())["model_key"]
    assert meta["model_key"] != json.loads((other / "svlm.json").read_text())["model_key"]
    # init_from picks a start explicitly (a run folder: its newest model) ...
    train(make_train_cfg(f"init_from={out / 'a'}", stage="stage2", steps=1, run_dir=out / "e"))
    assert f"[stage2] starting from {old}" in capsys.readouterr().out
    # ... and refuses one of another model config
    with pytest.raises(ConfigError, match="same model config"):
        train(make_train_cfg(f"init_from={other}", stage="stage2", steps=1, run_dir=out / "f"))


def test_unfinished_checkpoints_are_not_a_start(make_train_cfg, tmp_path, capsys):
    """Periodic checkpoints (stage.save_every) of a run that never finished are
    not "finished stage-1 models": stage 2, eval and infer skip them."""
    out = tmp_path / "outputs"
    (done,) = train(make_train_cfg(stage="stage1", steps=1, run_dir=out / "a"))
    (crashed,) = train(make_train_cfg("stage.save_every=1", stage="stage1", steps=2, run_dir=out / "b"))
    checkpoint = crashed.parent / "checkpoints" / "step-0000001"
    assert json.loads((checkpoint / "svlm.json").read_text())["finished"] is False
    shutil.rmtree(crashed)  # as if run b had stopped after its checkpoint
    assert resolve_model(None, out) == done
    assert resolve_model(None, out, stage="stage1") == done
    assert resolve_model(checkpoint, out) == checkpoint  # named explicitly, it is used
    capsys.readouterr()
    train(make_train_cfg(stage="stage2", steps=1, run_dir=out / "c"))
    assert f"[stage2] starting from {done}" in capsys.readouterr().out


def _batch(model, tokenizer, shapes_root, n=2):
    enc = ChatEncoder(tokenizer, model.num_image_tokens)
    ids = torch.tensor([enc.prompt("What colour is the shape?")] * n)
    proc = ImageProcessor(model.cfg.vision)
    from PIL import Image

    images = sorted((shapes_root / "images").glob("test-*.png"))[:n]
    pixels = torch.stack([proc(Image.open(p)) for p in images])
    return enc, ids, pixels


def test_checkpoint_round_trip(tiny_cfg, tokenizer, shapes_root, tmp_path):
    model = build_model(tiny_cfg, tokenizer).eval()
    with torch.no_grad():  # make sure no weight is at its init value by chance of the seed
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    folder = save_model(tmp_path / "m", model, tokenizer, {"stage": "stage1", "note": "hi"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left behind
    loaded, tok, meta = load_model(folder)
    assert meta["note"] == "hi" and meta["finished_at"] > 0
    assert tok.get_vocab() == tokenizer.get_vocab() and tok.chat_template == tokenizer.chat_template
    assert loaded.cfg == model.cfg
    _, ids, pixels = _batch(model, tokenizer, shapes_root)
    with torch.no_grad():
        a, b = model(ids, pixels).logits, loaded(ids, pixels).logits
    assert torch.equal(a, b)
    # saving again over it replaces it
    save_model(folder, loaded, tok, {"stage": "stage2"})
    assert load_model(folder)[2]["stage"] == "stage2"


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_model(tmp_path)


def test_generation_with_and_without_cache(trained, shapes_root):
    _, (_, stage2) = trained
    model, tokenizer, _ = load_model(stage2)
    enc, ids, pixels = _batch(model, tokenizer, shapes_root)
    kw = dict(stop_ids=-1, max_new_tokens=12)  # never stops early: compare 12 tokens
    with_cache = generate(model, ids, pixels, use_cache=True, **kw)
    without = generate(model, ids, pixels, use_cache=False, **kw)
    assert with_cache == without
    assert [len(r) for r in with_cache] == [12, 12]
    # stopping at <|end|> returns what comes before it
    want = [r[: r.index(enc.end_id)] if enc.end_id in r else r for r in with_cache]
    assert generate(model, ids, pixels, stop_ids=enc.end_id, max_new_tokens=12) == want


def test_generation_with_and_without_cache_varied(make_train_cfg, tokenizer, shapes_root):
    """The trained tiny model mostly says <|end|>; an untied random model says
    varied things, so a cache that fed the wrong token or position would show."""
    model = build_model(make_train_cfg("model.lm.tie_embeddings=false"), tokenizer).eval()
    _, ids, pixels = _batch(model, tokenizer, shapes_root)
    with_cache = generate(model, ids, pixels, stop_ids=-1, max_new_tokens=12, use_cache=True)
    without = generate(model, ids, pixels, stop_ids=-1, max_new_tokens=12, use_cache=False)
    assert with_cache == without
    assert len(set(with_cache[0])) >= 4 and with_cache[0] != with_cache[1]  # a meaningful comparison
    k = next(i for i, t in enumerate(with_cache[0]) if i > 0 and t not in with_cache[0][:i])
    stopped = generate(model, ids[:1], pixels[:1], stop_ids=with_cache[0][k], max_new_tokens=12)
    assert stopped == [with_cache[0][:k]]


def test_vlm_cache_logits_equal_full_forward(trained, shapes_root):
    """Decoding step by step after an image prompt gives the logits of one full pass."""
    _, (_, stage2) = trained
    model, tokenizer, _ = load_model(stage2)
    _, ids, pixels = _batch(model, tokenizer, shapes_root)
    follow = torch.tensor([[40, 41, 42, 43, 44], [50, 51, 52, 53, 54]])
    with torch.no_grad():
        full = model(torch.cat([ids, follow], dim=1), pixels).logits
        cache = KVCache()
        parts = [model(ids, pixels, cache=cache).logits]
        parts += [model(follow[:, t : t + 1], cache=cache).logits for t in range(follow.shape[1])]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_evaluate(trained, tmp_path, cache_dir, capsys):
    _, (_, stage2) = trained
    overrides = [
        f"ckpt={stage2}",
        "data=shapes",
        *DATA_OVERRIDES,
        *path_overrides(tmp_path, cache_dir),
        "max_test=8",
        "max_new_tokens=6",
        "hardware=cpu",
    ]
    results = evaluate(load_eval_config(compose("eval", overrides)))
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())
    assert metrics["model"] == str(stage2)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and math.isfinite(metrics["val_loss"])
    assert metrics["accuracy_by"]["n"] == 8
    assert metrics["accuracy"] == results["accuracy"]
    predictions = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert len(predictions) == 8 and all(isinstance(p["answer"], str) for p in predictions)
    assert sum(p["correct"] for p in predictions) / 8 == metrics["accuracy"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"accuracy={metrics['accuracy']:.4f}")


def test_evaluate_on_the_training_data_by_default(trained, tmp_path, cache_dir):
    """Without data=, eval scores the model on the data set its svlm.json names."""
    _, (_, stage2) = trained
    common = [f"ckpt={stage2}", "max_test=4", "max_new_tokens=4", "hardware=cpu"]
    default = evaluate(load_eval_config(compose("eval", [*common, *path_overrides(tmp_path / "a", cache_dir)])))
    explicit = evaluate(
        load_eval_config(
            compose("eval", [*common, "data=shapes", *DATA_OVERRIDES, *path_overrides(tmp_path / "b", cache_dir)])
        )
    )
    assert default["val_loss"] == explicit["val_loss"] and default["accuracy_by"] == explicit["accuracy_by"]
    # another data set gives another validation loss
    other = evaluate(
        load_eval_config(
            compose(
                "eval",
                [*common, "data=shapes", *DATA_OVERRIDES, "data.seed=5", *path_overrides(tmp_path / "c", cache_dir)],
            )
        )
    )
    assert other["val_loss"] != default["val_loss"]


def test_ask(trained, tmp_path, cache_dir, shapes_root, capsys):
    _, (_, stage2) = trained
    image = sorted((shapes_root / "images").glob("test-*.png"))[0]
    overrides = [f"ckpt={stage2}", f"image={image}", "max_new_tokens=5", *path_overrides(tmp_path, cache_dir)]
    answer = ask(load_infer_config(compose("infer", [*overrides, "hardware=cpu"])))
    assert isinstance(answer, str)
    saved = json.loads((tmp_path / "run" / "answer.json").read_text())
    assert saved["answer"] == answer and saved["image"] == str(image) and saved["model"] == str(stage2)
    assert capsys.readouterr().out.strip().endswith(answer.strip())
    # a missing picture is a clear error
    with pytest.raises(FileNotFoundError, match="image="):
        ask(load_infer_config(compose("infer", [*overrides[:1], "image=nope.png", *overrides[2:]])))


# ----------------------------------------------------------- entry scripts


def run_script(*args: str, cache_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SVLM_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False
    )


def test_scripts_train_then_infer(tmp_path, cache_dir, shapes_root):
    out = tmp_path / "outputs"
    r = run_script("train.py", *tiny_train_overrides("both"), f"paths.outputs={out}", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = (out / "train").iterdir()  # Hydra's run folder
    assert (run / "stage2" / "model" / "model.safetensors").is_file()
    assert (run / ".hydra" / "overrides.yaml").is_file()
    image = sorted((shapes_root / "images").glob("test-*.png"))[0]
    r = run_script("infer.py", f"paths.outputs={out}", f"image={image}", "max_new_tokens=4", cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    (answer,) = (out / "infer").glob("*/answer.json")
    assert json.loads(answer.read_text())["model"] == str(run / "stage2" / "model")


def test_script_error_is_one_line(tmp_path, cache_dir, shapes_root):
    r = run_script(
        "train.py", *tiny_train_overrides("stage2"), f"paths.outputs={tmp_path / 'empty'}", cache_dir=cache_dir
    )
    assert r.returncode == 2
    assert "error: stage=stage2 needs a stage-1 model" in r.stderr
    assert "Traceback" not in r.stderr


def test_multirun(tmp_path, cache_dir, shapes_root):
    out = tmp_path / "outputs"
    overrides = [*tiny_train_overrides("stage1", steps=2), "stage.lr=1e-4,3e-4", f"paths.outputs={out}"]
    r = run_script("train.py", "-m", *overrides, cache_dir=cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (out / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        assert (job / "stage1" / "model" / "model.safetensors").is_file()
        lrs.append(yaml.safe_load((job / "config.yaml").read_text())["stage"]["lr"])
    assert lrs == [1e-4, 3e-4]
    # the sweep ends with its report: a table of the jobs and their loss curves
    assert "| 0 | stage.lr=0.0001 |" in r.stdout and "| 1 | stage.lr=0.0003 |" in r.stdout
    rows = json.loads((sweep / "report.json").read_text())
    assert [row["overrides"] for row in rows] == ["stage.lr=0.0001", "stage.lr=0.0003"]
    assert all(row["stage1/steps"] == 2 and row["stage1/finished"] for row in rows)
    assert (sweep / "loss_curves.png").stat().st_size > 10_000 and "report.md" in {p.name for p in sweep.iterdir()}


def test_report_command_errors(tmp_path):
    from svlm.report.__main__ import main as report_main

    outputs = f"paths.outputs={tmp_path / 'outputs'}"
    assert report_main([str(tmp_path / "nowhere"), outputs]) == 2
    assert report_main([str(tmp_path), outputs]) == 2  # no job folders
