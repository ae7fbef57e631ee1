"""What trains in a stage, the optimizer's parameter groups, the schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from svlm.config import StageConfig
from svlm.models.vlm import VLM


def set_trainable(model: VLM, stage: StageConfig, fresh: bool = False) -> list[str]:
    """Freeze and unfreeze parts as the stage says; returns notes about parts
    left frozen (at random init when the model is `fresh`)."""
    model.requires_grad_(False)
    model.vision.requires_grad_(stage.train_vision)
    model.vision.dinov2.embeddings.mask_token.requires_grad_(False)  # only for masked pixels: never used here
    model.freeze_vision = not stage.train_vision
    model.projector.requires_grad_(stage.train_projector)
    lm = model.lm
    n_layers = len(lm.layers)
    top = n_layers if stage.unfreeze_lm_top_layers == -1 else min(stage.unfreeze_lm_top_layers, n_layers)
    for block in lm.layers[n_layers - top :]:
        block.requires_grad_(True)
    if top:
        lm.norm.requires_grad_(True)
        lm.lm_head.requires_grad_(True)
    if stage.train_text_embed or top == n_layers:
        lm.embed_tokens.requires_grad_(True)
        for part in (lm.pos_embed, lm.reducer):
            if part is not None:
                part.requires_grad_(True)
    if stage.train_text_embed and lm.lm_head.weight is lm.embed_tokens.weight:
        lm.lm_head.requires_grad_(True)
    notes = []
    init = " at their random init" if fresh else ""
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
        if p.ndim < 2 or name.endswith("queries"):
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
        part = name.split(".")[0] if name.split(".")[0] in lrs else "lm"
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


def make_optimizer(model: VLM, stage: StageConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, stage)
    if not groups:
        raise ValueError(f"{stage.name} has nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=stage.lr, betas=tuple(stage.betas))


def lr_factor(step: int, total: int, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over the first warmup*total steps, then cosine down to min_ratio."""
    w = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, total - w)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
