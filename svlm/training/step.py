"""One optimizer step, as training runs it and the benchmark times it.

The loss is the mean over every supervised token of the optimizer step, across
gradient accumulation and processes, whatever the micro-batch split: so 2
processes x b samples train exactly like 1 process x 2b. Nothing here waits
for the device: the step's loss, gradient norm and non-finite flags come back
as one tensor, read later (a fused AdamW skips a bad update on the device).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from svlm.hardware import to_device
from svlm.models.packed_attention import Packing, packed_kernel


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer` (torch's fused AdamW or OffloadAdamW; accelerate's
    wrapper or not) can skip a bad step on the device, given `found_inf`."""
    from svlm.training.optim import OffloadAdamW

    inner = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
    return isinstance(inner, OffloadAdamW) or bool(getattr(inner, "defaults", {}).get("fused", False))


def packed_inputs(batch: dict, device: torch.device) -> dict:
    """A packed batch's positions and Packing (svlm/data/packing.py), for the
    model's forward; nothing for a batch of one sample a row."""
    if "segments" not in batch:
        return {}
    kernel = packed_kernel(device, batch["segments"].shape[1])
    packing = Packing.make(batch["segments"], batch["cu_seqlens"], batch["max_seqlen"], kernel)
    return {"positions": batch["positions"], "packing": packing}


def train_step(
    accelerator: Accelerator,
    model,
    optimizer,
    micro_batches: list[dict],
    trainable: list[torch.nn.Parameter],
    grad_clip: float,
    skip_on_device: bool,
    deepspeed: bool = False,
    phase: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
) -> tuple[torch.Tensor, object]:
    """Forward and backward of each micro-batch (gradients accumulated), clipping,
    then the optimizer, which skips a step whose loss or gradient is not finite
    (on the device when `skip_on_device`, else after reading the flags). Returns
    ([loss, grad norm, bad loss, bad gradient] as one tensor, the last output)."""
    world, accum = accelerator.num_processes, len(micro_batches)
    local_tokens = sum(len(b["target_index"]) for b in micro_batches)  # a shape: found by the collator
    step_tokens = max(1, local_tokens)
    if world > 1:  # every process's count: a small all-reduce, queued like the rest
        step_tokens = accelerator.reduce(to_device(float(local_tokens), accelerator.device), "sum").clamp(min=1)
    ce_sum = torch.zeros((), device=accelerator.device)
    for micro_step, batch in enumerate(micro_batches):
        sync = micro_step == accum - 1
        with accelerator.no_sync(model) if not sync else nullcontext():
            with phase("forward"), accelerator.autocast():
                out = model(batch["input_ids"], batch["pixel_values"], batch["labels"],
                            vision_features=batch.get("vision_features"), target_index=batch["target_index"],
                            object_targets=batch.get("object_targets"), **packed_inputs(batch, accelerator.device))  # fmt: skip
            # DDP averages gradients over processes: scale by `world` to get the global token mean.
            loss = out.ce_loss * out.n_tokens * (world / step_tokens) + (out.loss - out.ce_loss) / accum
            with phase("backward"):
                accelerator.backward(loss * accum if deepspeed else loss)  # DeepSpeed divides by accum itself
        ce_sum += out.ce_loss.detach() * out.n_tokens
    with phase("optimizer"):
        step_loss = accelerator.reduce(ce_sum, "sum") / step_tokens
        grad_norm = accelerator.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
        if grad_norm is None:  # DeepSpeed clips in its engine
            grad_norm = torch.zeros((), device=accelerator.device)
        bad_loss, bad_grad = ~torch.isfinite(step_loss), ~torch.isfinite(grad_norm)
        figures = torch.stack([step_loss.float(), grad_norm.float(), bad_loss.float(), bad_grad.float()])
        if skip_on_device:
            inner = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
            inner.found_inf = (bad_loss | bad_grad).float()  # a bad step changes nothing
            optimizer.step()
        elif not bool(bad_loss | bad_grad):  # the engine's optimizer cannot skip by itself: look now
            optimizer.step()
    return figures, out
