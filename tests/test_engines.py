"""The multi-process engines as hardware options: each composes and hands
accelerate the intended plugin settings. (DDP runs for real in
test_distributed.py; FSDP and DeepSpeed need GPUs, which CI does not have.)"""

import pytest
from conftest import compose, path_overrides, tiny_train_overrides

from svlm.config import load_train_config
from svlm.errors import ConfigError
from svlm.hardware import FSDP_WRAP, accelerator_kwargs
from svlm.training.prepare import build_model


@pytest.fixture
def paths(tmp_path, cache_dir):
    return path_overrides(tmp_path, cache_dir)


def hardware(option: str, paths):
    # device=auto so that the settings can be built on a machine without a GPU
    return load_train_config(compose("train", [f"hardware={option}", "hardware.device=auto", *paths])).hardware


def test_multi_gpu_is_ddp(paths):
    kwargs = accelerator_kwargs(hardware("multi_gpu", paths))
    assert "fsdp_plugin" not in kwargs and "deepspeed_plugin" not in kwargs
    assert kwargs["mixed_precision"] == "bf16"
    (ddp,) = kwargs["kwargs_handlers"]
    assert ddp.find_unused_parameters is False
    assert accelerator_kwargs(hardware("multi_gpu", paths), find_unused_parameters=True)["kwargs_handlers"][
        0
    ].find_unused_parameters


def test_fsdp_plugin(paths, tokenizer):
    hw = hardware("fsdp", paths)
    plugin = accelerator_kwargs(hw)["fsdp_plugin"]
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full sharding
    assert plugin.transformer_cls_names_to_wrap == ["Block", "Dinov2Layer"] == FSDP_WRAP
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert hw.grad_checkpointing and hw.precision == "bf16"
    # the wrapped classes are really the model's blocks: one unit per LM block and per DINOv2 layer
    cfg = load_train_config(compose("train", [*tiny_train_overrides(), *paths]))
    model = build_model(cfg, tokenizer)
    names = [type(m).__name__ for m in model.modules()]
    assert names.count("Block") == cfg.model.lm.n_layers
    assert names.count("Dinov2Layer") == cfg.model.vision.num_layers


@pytest.mark.parametrize(("option", "stage", "optimizer", "params"), [
    ("zero2", 2, "none", "none"),
    ("zero3_offload", 3, "cpu", "cpu"),
])  # fmt: skip
def test_deepspeed_plugins(option, stage, optimizer, params, paths):
    plugin = accelerator_kwargs(hardware(option, paths))["deepspeed_plugin"]
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == optimizer
    assert zero["offload_param"]["device"] == params


def test_engine_settings_are_checked(paths):
    with pytest.raises(ConfigError, match="hardware.offload"):
        load_train_config(compose("train", ["hardware=multi_gpu", "hardware.offload=true", *paths]))
    with pytest.raises(ConfigError, match="hardware.zero_stage"):
        load_train_config(compose("train", ["hardware=zero2", "hardware.zero_stage=4", *paths]))
