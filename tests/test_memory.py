"""The memory planner (svlm/memory/) and the memory-lean optimizer (OffloadAdamW)."""

import copy
import dataclasses
import json

import pytest
import torch
from conftest import compose, path_overrides
from torch import nn

from svlm.config import ConfigError, load_train_config
from svlm.memory import estimate_memory, saved_bytes
from svlm.memory.__main__ import main
from svlm.models.lora import LoraConfig
from svlm.training.optim import OffloadAdamW, make_optimizer, set_trainable


def _cfg(tmp_path, cache_dir, *extra):
    return load_train_config(compose("train", [*path_overrides(tmp_path, cache_dir), *extra]))


def test_offload_adamw_matches_adamw():
    """fp32 masters updated by AdamW: the same weights as torch's AdamW given the same gradients."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))
    lean = copy.deepcopy(ref)
    groups = lambda m: [{"params": list(m.parameters()), "weight_decay": 0.1}]  # noqa: E731
    opt_ref = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95))
    opt = OffloadAdamW(groups(lean), lr=1e-2, betas=(0.9, 0.95))
    assert all(p.dtype == torch.bfloat16 for p in lean.parameters())
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ref.parameters()]
        for p, g in zip(ref.parameters(), grads):
            p.grad = g.clone()
        for p, g in zip(lean.parameters(), grads):
            p.grad = g.to(torch.bfloat16)
        opt_ref.step()
        opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in lean.parameters())
    masters = opt.master_state_dict(lean)
    for name, p in ref.state_dict().items():
        assert masters[name].dtype == torch.float32
        # the only difference: gradients rounded to bf16 on their way in
        torch.testing.assert_close(masters[name], p, atol=2e-3, rtol=0)
        torch.testing.assert_close(lean.state_dict()[name].float(), p, atol=2e-2, rtol=0)


def test_offload_needs_bf16_and_ddp(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="hardware.precision=bf16"):
        _cfg(tmp_path, cache_dir, "hardware=cpu", "hardware.optimizer=adamw_offload")
    with pytest.raises(ConfigError, match="hardware.distributed=ddp"):
        _cfg(tmp_path, cache_dir, "hardware=fsdp", "hardware.optimizer=adamw_offload")
    with pytest.raises(ConfigError, match="hardware.optimizer"):
        _cfg(tmp_path, cache_dir, "hardware.optimizer=sgd")


def test_adamw_is_fused(tiny_cfg, tokenizer):
    from svlm.training.prepare import build_model

    model = build_model(tiny_cfg, tokenizer)
    stage = tiny_cfg.stages()[-1]
    set_trainable(model, stage)
    opt = make_optimizer(model, stage)
    assert all(g["fused"] for g in opt.param_groups)


def test_saved_bytes_counts_what_autograd_keeps(tiny_cfg, tokenizer):
    """Activations scale with the batch; weights are not counted; a frozen encoder keeps nothing."""
    from svlm.training.prepare import build_model

    model = build_model(tiny_cfg, tokenizer)
    stage = tiny_cfg.stages()[-1]
    set_trainable(model, stage)
    one, two = saved_bytes(model, 1, 40, "fp32"), saved_bytes(model, 2, 40, "fp32")
    assert one > 0 and two == pytest.approx(2 * one, rel=0.05)
    frozen = tiny_cfg.stages()[0]
    frozen.train_vision = False
    set_trainable(model, frozen)
    assert saved_bytes(model, 1, 40, "fp32") < one


def test_estimate_terms(tmp_path, cache_dir):
    cfg = _cfg(tmp_path, cache_dir, "stage=stage2", "hardware=cpu", "data.max_len=128")
    stage = cfg.stages()[0]
    est = estimate_memory(cfg, stage, micro_batch=4)
    hidden = cfg.model.vision.hidden_size
    assert est.trained == est.params - hidden  # all of the tiny model but DINOv2's mask token
    assert est.weights == 4 * est.params  # fp32, tied weights once
    assert est.grads == 4 * est.trained and est.optimizer_states == 2 * est.grads and not est.cpu_states
    bigger = estimate_memory(cfg, stage, micro_batch=8)
    assert bigger.activations == pytest.approx(2 * est.activations, rel=0.05)
    ckpt = estimate_memory(load_train_config(compose("train", [*path_overrides(tmp_path, cache_dir), "stage=stage2",
                                                               "hardware=cpu", "data.max_len=128",
                                                               "hardware.grad_checkpointing=true"])),
                           stage, micro_batch=4)  # fmt: skip
    assert ckpt.activations < est.activations
    lean = estimate_memory(cfg, stage, optimizer="adamw_offload", micro_batch=4)
    assert lean.optimizer_states == 0 and lean.cpu_states == 16 * est.trained
    assert lean.weights == pytest.approx(est.weights / 2, rel=0.01)


def test_memory_command(tmp_path, cache_dir, capsys):
    args = ["model=tiny", "stage=stage2", "hardware=8gb", *path_overrides(tmp_path, cache_dir)[1:]]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "optimizer states" in out and "fits hardware.memory_budget_gb=8" in out
    assert main([*args, "hardware.memory_budget_gb=0.001"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main([*args, "model.lm.n_layers=x"]) == 2


def test_training_with_offload_saves_fp32_masters(make_train_cfg, tmp_path):
    """hardware.optimizer=adamw_offload trains (bf16 autocast on the CPU here) and
    saves fp32 weights; the start of each stage prints the estimate."""
    from accelerate.state import AcceleratorState
    from safetensors import safe_open

    from svlm.training.loop import train

    cfg = make_train_cfg("hardware.precision=bf16", "hardware.optimizer=adamw_offload", stage="stage1", steps=2)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        [out] = train(cfg)
    finally:  # let the next tests choose theirs
        AcceleratorState._reset_state(reset_partial_state=True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    metrics = [json.loads(line) for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in m for m in metrics)


def test_offload_with_a_frozen_encoder_plans_and_trains(make_train_cfg):
    """A frozen fp32 encoder feeds the bf16 projector adamw_offload trains: the
    planner's probe and a real CPU step both run (they stopped on mixed dtypes)."""
    from accelerate.state import AcceleratorState

    from svlm.training.loop import train

    cfg = make_train_cfg(
        "hardware.precision=bf16",
        "hardware.optimizer=adamw_offload",
        "stage.train_vision=false",
        "data.feature_cache=false",
        stage="stage1",
        steps=1,
    )  # fmt: skip (the shared cache stays as it was)
    est = estimate_memory(cfg, cfg.stages()[0])
    assert est.activations > 0 and est.cpu_states > 0
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        [out] = train(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "override, named", [("hardware.bogus=1", "hardware.bogus"), ("model=nosuch", "model/nosuch"), ("stage.lr=", "")]
)
def test_tools_name_a_bad_override_in_one_line(override, named, capsys):
    """python -m svlm.memory and svlm.bench: an unknown key or option is one line naming it, status 2."""
    from svlm.bench.__main__ import main as bench_main
    from svlm.memory.__main__ import main as memory_main

    for tool_main in (memory_main, bench_main):
        assert tool_main([override]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and "Traceback" not in err and err.count("\n") == 1


def test_the_estimate_counts_lora_adapters(tmp_path, cache_dir, tokenizer):
    """With stage.lora the trained parameters are the adapters (and what else the stage trains), and
    the weights include them; the measured activations also hold the adapters' own."""
    from svlm.training.prepare import build_model

    cfg = _cfg(tmp_path, cache_dir, "stage=stage2", "hardware=cpu", "data.max_len=128", "stage.train_vision=false",
               "stage.train_text_embed=false", "stage.lora.r=8", "stage.lora.dropout=0.1")  # fmt: skip
    stage = cfg.stages()[0]
    est = estimate_memory(cfg, stage, micro_batch=4, vocab=len(tokenizer))
    model = build_model(cfg, tokenizer)
    set_trainable(model, stage)
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    d, L = cfg.model.lm.d_model, cfg.model.lm.n_layers
    lm = cfg.model.lm
    qkvo = 2 * (d + lm.n_heads * lm.head_dim) + 2 * (d + lm.n_kv_heads * lm.head_dim)
    assert adapters == 8 * L * (qkvo + 3 * (d + lm.d_ff))  # r x (in + out) for each of the seven projections
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.trained == trained == adapters + sum(p.numel() for p in model.projector.parameters())
    assert est.params == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert est.grads == 4 * est.trained and est.optimizer_states == 8 * est.trained
    whole = estimate_memory(cfg, dataclasses.replace(stage, lora=LoraConfig()), micro_batch=4,
                            vocab=len(tokenizer))  # fmt: skip
    assert whole.trained > 5 * est.trained and est.activations > whole.activations  # dropout masks, A x
