"""The benchmark: its FLOP count against torch's own counter, and a tiny run."""

import json

import pytest
import torch
from conftest import path_overrides, tiny_train_overrides
from torch.utils.flop_counter import FlopCounterMode

from svlm.bench.__main__ import main
from svlm.flops import lm_flops, vision_flops
from svlm.models.language_model import LanguageModel, LMConfig
from svlm.models.vision import VisionConfig, VisionEncoder


@pytest.mark.parametrize("mlp", ["swiglu", "gelu", "moe"])
def test_lm_flops_match_torch_counter(mlp):
    cfg = LMConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, mlp=mlp)
    model = LanguageModel(cfg)
    ids = torch.randint(0, 300, (3, 40))
    with FlopCounterMode(display=False) as counter:
        model(ids)
    counted = counter.get_total_flops()
    if not _counts_cpu_attention():  # torch's counter skips the CPU flash-attention kernel: add its FLOPs
        counted += 2 * 2 * 40 * 40 * cfg.d_model * 3 * cfg.n_layers
    assert lm_flops(cfg, 40, 3) == pytest.approx(counted, rel=0.01)


def _counts_cpu_attention() -> bool:
    q = torch.randn(1, 2, 8, 4)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    return counter.get_total_flops() > 0


def test_vision_flops_match_torch_counter():
    enc = VisionEncoder(VisionConfig(image_size=64, patch_size=8, hidden_size=64, num_layers=2, num_heads=4))
    with FlopCounterMode(display=False) as counter:
        enc(torch.randn(2, 3, 64, 64))
    counted = counter.get_total_flops()
    if not _counts_cpu_attention():
        counted += 2 * 2 * 65 * 65 * 64 * 2 * 2  # 65 tokens (CLS + 64 patches), width 64, batch 2, 2 layers
    assert vision_flops(enc.dinov2.config, enc.num_patches, 2) == pytest.approx(counted, rel=0.01)


def test_bench_runs_and_writes_figures(tmp_path, cache_dir, shapes_root, capsys):
    args = [*tiny_train_overrides("stage2"), *path_overrides(tmp_path, cache_dir), f"paths.run_dir={tmp_path}/bench",
            "bench.steps=1", "bench.rounds=1", "bench.warmup=0", "bench.gen_tokens=8", "bench.data_images=5",
            "bench.threads=[1]", "bench.profile=true", "bench.data_steps=1"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    figures = json.loads((tmp_path / "bench" / "bench.json").read_text())
    for key in ("step_gflop", "generation_tokens_per_s", "data_images_per_s", "padding_share", "peak_rss_gib"):
        assert key in figures
    assert 0 < figures["rounds"]["1"]["mfu"] < 1.5 and "MFU" in out and "KV cache" in out
    shares, data = figures["padding_share"], figures["data_steps"]
    assert 0 <= shares["packed"] <= shares["unpacked"] < 1 and "(data.packing)" in out
    assert (
        data["packed"]["samples"] == data["unpacked"]["samples"] and data["packed"]["rows"] < data["unpacked"]["rows"]
    )
    phases = figures["profile"]["phases"]
    assert phases.keys() == {"forward", "backward", "optimizer"} and sum(phases.values()) == pytest.approx(1)
    profile = (tmp_path / "bench" / "profile.txt").read_text()
    assert "aten::" in profile and (tmp_path / "bench" / "trace.json").stat().st_size > 0
    assert main(["bench.size=huge", *path_overrides(tmp_path, cache_dir)]) == 2


def test_bench_size_is_the_model_the_planner_estimates(tmp_path, cache_dir):
    args = ["bench.size=tiny", "bench.steps=1", "bench.rounds=1", "bench.warmup=0", "bench.gen_tokens=2",
            "bench.data=false", "bench.threads=[1]", *path_overrides(tmp_path, cache_dir),
            f"paths.run_dir={tmp_path}/bench"]  # fmt: skip
    assert main(args) == 0
    figures = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert figures["model"] == "tiny" and figures["estimate_params_m"] == pytest.approx(figures["params_m"])
