"""What trains in a stage, the optimizer's parameter groups, the schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from svlm.config import StageConfig
from svlm.models.lora import add_lora, has_lora, is_adapter
from svlm.models.vlm import VLM


def set_trainable(model: VLM, stage: StageConfig, fresh: bool = False) -> list[str]:
    """Freeze and unfreeze parts as the stage says (with stage.lora, adding the
    adapters to the LM blocks that train, whose own weights then stay frozen,
    as do the final norm and the head); returns notes about parts left frozen
    (at random init when the model is `fresh`)."""
    model.requires_grad_(False)
    model.vision.requires_grad_(stage.train_vision)
    dinov2 = model.vision.dinov2
    dinov2.embeddings.mask_token.requires_grad_(False)  # only for masked pixels: never used here
    k = model.cfg.vision.feature_layer
    if k is not None:  # features read at layer k (before the final LayerNorm): what comes after is unused
        dinov2.layernorm.requires_grad_(False)
        n = len(dinov2.encoder.layer)
        for layer in dinov2.encoder.layer[(k % (n + 1)) :]:
            layer.requires_grad_(False)
    model.freeze_vision = not stage.train_vision
    model.projector.requires_grad_(stage.train_projector)
    model.object_weight = stage.object_loss
    if model.object_head is not None:
        model.object_head.requires_grad_(stage.object_loss > 0)
    lm = model.lm
    n_layers = len(lm.layers)
    top = n_layers if stage.unfreeze_lm_top_layers == -1 else min(stage.unfreeze_lm_top_layers, n_layers)
    lora = stage.lora.r > 0
    if lora and not has_lora(lm):
        add_lora(lm, stage.lora, list(range(n_layers - top, n_layers)))
    for block in lm.layers[n_layers - top :]:
        for name, p in block.named_parameters():
            p.requires_grad_(not lora or is_adapter(name))
    if top and not lora:
        lm.norm.requires_grad_(True)
        lm.lm_head.requires_grad_(True)
    if stage.train_text_embed or (top == n_layers and not lora):  # a model trained whole
        lm.embed_tokens.requires_grad_(True)
        for part in (lm.pos_embed, lm.reducer):
            if part is not None:
                part.requires_grad_(True)
    if stage.train_text_embed and lm.lm_head.weight is lm.embed_tokens.weight:
        lm.lm_head.requires_grad_(True)
    notes = []
    init = " at their random init" if fresh else ""
    if lora:
        notes.append(f"the top {top} LM blocks train through rank-{stage.lora.r} LoRA adapters in {stage.name}")
    if top < n_layers:
        notes.append(f"the lowest {n_layers - top} of {n_layers} LM blocks stay frozen{init} in {stage.name}")
    if fresh and not stage.train_vision and model.cfg.vision.path is None:
        notes.append(f"the vision encoder stays frozen{init} (no model.vision.path) in {stage.name}")
    if fresh and not stage.train_projector:
        notes.append(f"the projector stays frozen{init} in {stage.name}")
    if fresh and not stage.train_text_embed and top < n_layers:
        notes.append(f"the token embeddings stay frozen{init} in {stage.name}")
    return notes


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Norms, biases, embeddings and learned queries/positions get no weight decay."""
    ids = set()
    for module in model.modules():
        direct = list(module.parameters(recurse=False))
        if (
            isinstance(module, (nn.Embedding, nn.LayerNorm))
            or "Norm" in type(module).__name__
            or "Embeddings" in type(module).__name__
        ):
            ids.update(id(p) for p in direct)
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.endswith(("queries", "projector.pos")):
            ids.add(id(p))
    return ids


def param_groups(model: VLM, stage: StageConfig) -> list[dict]:
    lrs = {
        "vision": stage.lr_vision or stage.lr,
        "projector": stage.lr_projector or stage.lr,
        "lm": stage.lr,
    }
    no_decay = _no_decay_ids(model)
    groups: dict[tuple[str, bool], list] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        first = "projector" if name.startswith("object_head.") else name.split(".")[0]  # the head reads its tokens
        part = first if first in lrs else "lm"
        groups.setdefault((part, id(p) in no_decay), []).append(p)
    return [
        {
            "params": ps,
            "lr": lrs[part],
            "weight_decay": 0.0 if nd else stage.weight_decay,
            "name": f"{part}{'/no_decay' if nd else ''}",
        }
        for (part, nd), ps in sorted(groups.items())
    ]


def make_optimizer(model: VLM, stage: StageConfig, kind: str = "adamw", pin: bool = False) -> torch.optim.Optimizer:
    """AdamW over the stage's parameter groups. kind="adamw": torch's AdamW, fused
    (one kernel for all tensors) where the device supports it, else foreach.
    kind="adamw_offload": OffloadAdamW (fp32 master weights and states in CPU memory,
    `pin`ned when the model goes to a GPU)."""
    groups = param_groups(model, stage)
    if not groups:
        raise ValueError(f"{stage.name} has nothing to train: every parameter is frozen")
    if kind == "adamw_offload":
        return OffloadAdamW(groups, lr=stage.lr, betas=tuple(stage.betas), pin=pin)
    return torch.optim.AdamW(groups, lr=stage.lr, betas=tuple(stage.betas), **_fastest(groups))


def _fastest(groups: list[dict]) -> dict:
    """fused=True where every parameter sits on a device with a fused AdamW kernel."""
    devices = {p.device.type for g in groups for p in g["params"]}
    dtypes = {p.dtype for g in groups for p in g["params"]}
    if devices <= {"cuda", "cpu"} and dtypes <= {torch.float32, torch.float16, torch.bfloat16}:
        return {"fused": True}
    return {"foreach": True}


class OffloadAdamW(torch.optim.AdamW):
    """AdamW that keeps the fp32 master weights and both moment estimates in CPU
    memory, so the GPU holds only bf16 weights and bf16 gradients of what trains:
    4 bytes a trained parameter instead of 16 (fp32 weight, gradient, two moments).

    Each step: the gradients go to the CPU (into pinned buffers), torch's fused
    AdamW updates the fp32 masters there, and the new weights come back in bf16.
    The price is two copies of the trained weights over PCIe a step and the CPU's
    AdamW speed (a few tenths of a second per billion parameters on 16 cores),
    paid once per optimizer step, not per micro-batch. Gradients accumulate in
    bf16 over the micro-batches of a step.

    The masters are the truth: `master_state_dict` gives the model's weights with
    the trained ones in fp32, for saving; a model loaded from such a file and
    wrapped again resumes exactly (the moments are in `state_dict` as usual).
    """

    def __init__(
        self, groups: list[dict], lr: float, betas: tuple[float, float], pin: bool = False, dtype=torch.bfloat16
    ) -> None:
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []  # (the model's parameter, its CPU master)
        master_groups = []
        for group in groups:
            masters = []
            for p in group["params"]:
                pin = pin or p.device.type == "cuda"  # pinned: copies to and from the GPU run asynchronously
                master = p.detach().to("cpu", torch.float32, copy=True)
                master = nn.Parameter(master.pin_memory() if pin else master)
                master.grad = torch.zeros(master.shape, pin_memory=pin)
                p.data = p.data.to(dtype)  # the working copy on the device
                self.pairs.append((p, master))
                masters.append(master)
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, lr=lr, betas=betas, fused=True)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        if closure is not None:
            raise ValueError("OffloadAdamW.step takes no closure")
        found_inf = self.__dict__.pop("found_inf", None)  # set by the training loop: skip a bad step
        for p, master in self.pairs:
            if p.grad is None:
                master.grad.zero_()
            else:
                master.grad.copy_(p.grad, non_blocking=True)
        if any(p.device.type == "cuda" for p, _ in self.pairs):
            torch.cuda.synchronize()  # the gradients have landed
        if found_inf is not None and bool(found_inf):
            return None
        super().step()
        for p, master in self.pairs:
            p.copy_(master, non_blocking=True)  # fp32 -> the working dtype, on the device

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, _ in self.pairs:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def master_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with every trained weight as its fp32 master."""
        masters = {id(p): m for p, m in self.pairs}
        out = {}
        for name, t in model.state_dict(keep_vars=True).items():
            out[name] = masters[id(t)].detach().clone() if id(t) in masters else t.detach()
        return out


def lr_factor(step: int, total: int, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over the first warmup*total steps, then cosine down to min_ratio."""
    w = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, total - w)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
