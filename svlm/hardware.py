"""Device, precision and accelerator policy: the one home of what a
`hardware` option (conf/hardware/, svlm.config.HardwareConfig) means.

- `pick_device`: the device to run on (and torch's CPU threads), for eval,
  infer and the server; `planned_device`: the same without touching torch's
  state, for the memory planner.
- `resolve_precision`: `precision=auto` settled (bf16 on a GPU, fp16 where it
  has no bf16, fp32 on the CPU); `autocast_for`: the matching autocast.
- `make_accelerator` / `accelerator_kwargs`: accelerate's Accelerator for
  training, with the engine (DDP, FSDP2 or DeepSpeed) used when launched with
  several processes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin

from svlm.config import HardwareConfig
from svlm.errors import ConfigError

NO_CUDA = "hardware.device=cuda but no CUDA GPU is available (use hardware=cpu or hardware=auto)"
FSDP_WRAP = ["Block", "Dinov2Layer"]  # FSDP units: one per LM block and per DINOv2 layer


def planned_device(hw: HardwareConfig) -> str:
    """The device a run would use: hardware.device, auto meaning a GPU when there
    is one (cuda is planned for even on a machine without one: the memory planner)."""
    if hw.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return hw.device


def available_device(hw: HardwareConfig) -> str:
    """planned_device, refused when it is a GPU this machine does not have."""
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(NO_CUDA)
    return planned_device(hw)


def pick_device(hw: HardwareConfig) -> torch.device:
    """The device to run on; sets torch's CPU threads when hardware.threads says."""
    if hw.threads:
        torch.set_num_threads(hw.threads)
    return torch.device(available_device(hw))


def resolve_precision(hw: HardwareConfig, device: str) -> str:
    """hardware.precision with `auto` settled: bf16 on a GPU (fp16 where it has no bf16), fp32 on the CPU."""
    if hw.precision != "auto":
        return hw.precision
    if device == "cuda":
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_for(hw: HardwareConfig, device: torch.device) -> AbstractContextManager:
    """The autocast for the precision hardware asks for (bf16/fp16 on a GPU; none in fp32 or on the CPU)."""
    precision = resolve_precision(hw, device.type)
    if precision == "fp32" or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def accelerator_kwargs(hw: HardwareConfig, find_unused_parameters: bool = False) -> dict:
    """What `Accelerator(...)` gets for a hardware config: device, precision, and
    the engine (DDP, FSDP or DeepSpeed) used when launched with several processes.
    find_unused_parameters: for DDP when some parameters may get no gradient in a
    step (mixture-of-experts experts no token was routed to)."""
    device = available_device(hw)
    precision = resolve_precision(hw, device)
    kwargs: dict = {
        "cpu": device != "cuda",
        "mixed_precision": {"fp32": "no"}.get(precision, precision),
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    }
    if hw.distributed == "fsdp":
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=True,  # full sharding: parameters, gradients and optimizer states
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=FSDP_WRAP,
            state_dict_type="FULL_STATE_DICT",
            cpu_ram_efficient_loading=False,
        )
    elif hw.distributed == "deepspeed":
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            zero_stage=hw.zero_stage,
            offload_optimizer_device="cpu" if hw.offload else "none",
            offload_param_device="cpu" if hw.offload and hw.zero_stage == 3 else "none",
            zero3_save_16bit_model=False,
        )
    return kwargs


def make_accelerator(hw: HardwareConfig, find_unused_parameters: bool = False) -> Accelerator:
    if hw.threads:
        torch.set_num_threads(hw.threads)
    return Accelerator(**accelerator_kwargs(hw, find_unused_parameters))


def to_device(value: float, device: torch.device) -> torch.Tensor:
    """A number as a tensor on `device`, copied without waiting for the device's queue."""
    t = torch.tensor(value)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
