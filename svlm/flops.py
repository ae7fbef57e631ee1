"""The model's FLOPs, counted analytically (the memory planner's companion in
svlm/memory/; the benchmark's MFU divides by these).

A step's forward counts every part: the vision encoder, the projector and the
language model, attention scores included. Its backward follows autograd:
weight gradients only for the parts that train, input gradients wherever a
part, or something below it, trains (no pixel gradient at the patch
embedding), and the head only at the positions the loss needs logits at.
Checked against torch's FlopCounterMode in tests/test_loss.py.
"""

from __future__ import annotations

import torch

from svlm.models.lora import has_lora
from svlm.models.vlm import VLM


def lm_parts(cfg, tokens: int) -> dict[str, float]:
    """Forward FLOPs a token of the language model at this length: one block's
    weight matmuls, one block's attention scores, the head and the input reducer."""
    d, hd = cfg.d_model, cfg.head_dim
    q_o, k_v = 2 * d * (cfg.n_heads * hd), 2 * d * (cfg.n_kv_heads * hd)
    if cfg.mlp == "swiglu":
        mlp = 2 * 3 * d * cfg.d_ff
    elif cfg.mlp == "gelu":
        mlp = 2 * 2 * d * cfg.d_ff
    else:  # routed top-k + shared experts, GELU MLPs, and the router
        mlp = 2 * 2 * d * cfg.d_ff * (cfg.moe_top_k + cfg.moe_shared_experts) + 2 * d * cfg.moe_experts
    return {
        "block": 2 * q_o + 2 * k_v + mlp,
        "scores": 2 * 2 * tokens * cfg.n_heads * hd,  # QK^T and AV (full, not causal-halved)
        "head": 2 * d * cfg.vocab_size,
        "reducer": 2 * (cfg.d_in * cfg.rank + cfg.rank * d) if cfg.d_in is not None else 0,
    }


def lm_flops(cfg, tokens: int, batch: int, head_tokens: int | None = None) -> float:
    """Forward FLOPs of the language model for `batch` sequences of `tokens`, with
    the head applied at `head_tokens` of them (None: all, as generation does; the
    training loss needs it only where a supervised token follows)."""
    f = lm_parts(cfg, tokens)
    head_tokens = tokens if head_tokens is None else head_tokens
    return (tokens * (cfg.n_layers * (f["block"] + f["scores"]) + f["reducer"]) + head_tokens * f["head"]) * batch


def vision_flops(dinov2_cfg, patches: int, batch: int) -> float:
    d, inner = dinov2_cfg.hidden_size, int(dinov2_cfg.hidden_size * dinov2_cfg.mlp_ratio)
    tokens = patches + 1
    per_layer = tokens * (2 * 4 * d * d + 2 * 2 * d * inner) + 2 * 2 * tokens * tokens * d
    embed = patches * 2 * 3 * dinov2_cfg.patch_size**2 * d
    return (dinov2_cfg.num_hidden_layers * per_layer + embed) * batch


def projector_flops(model: VLM, batch: int) -> float:
    """2 x the multiply-adds of the projector's linear layers (and the resampler's attention)."""
    n = model.num_image_tokens
    total = 0
    for m in model.projector.modules():
        if isinstance(m, torch.nn.Linear):
            total += 2 * m.in_features * m.out_features * n
        if isinstance(m, torch.nn.MultiheadAttention):
            p = model.vision.num_patches
            total += 2 * 4 * m.embed_dim**2 * max(n, p) + 2 * 2 * n * p * m.embed_dim
    return total * batch


def _linear(m: torch.nn.Module) -> float:
    """Forward FLOPs a token of a linear layer (of the one a LoRA layer wraps)."""
    base = getattr(m, "base_layer", m)
    return 2 * base.in_features * base.out_features


def _adapter(m: torch.nn.Module) -> tuple[float, float]:
    """Forward FLOPs a token of a LoRA layer's A and B (0, 0: none)."""
    if not hasattr(m, "lora_A"):
        return 0.0, 0.0
    a, b = m.lora_A["default"], m.lora_B["default"]
    return 2 * a.in_features * a.out_features, 2 * b.in_features * b.out_features


def _adapted_block(layer: torch.nn.Module, f: dict[str, float], below: bool) -> tuple[float, bool]:
    """FLOPs a token of a block whose own weights are frozen and some of whose
    linears carry LoRA adapters (svlm/models/lora.py), and whether its output
    needs a gradient. In forward order, a base matmul gets an input gradient
    once something before it trains; each adapter gets its weight gradients,
    B its input gradient, and A one where its input needs it."""
    attn, mlp = layer.attn, layer.mlp
    groups = [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj],
              [m for m in (getattr(mlp, "gate_proj", None), mlp.up_proj) if m is not None], [mlp.down_proj]]  # fmt: skip
    total, grad = 0.0, below  # grad: what enters the group needs a gradient
    for i, group in enumerate(groups):
        if i == 1:  # the attention scores, between q/k/v and o
            total += f["scores"] * (1 + 2 * grad)
        for m in group:
            a, b = _adapter(m)
            total += _linear(m) * (1 + grad) + 2 * (a + b) + b + a * grad
        grad = grad or any(hasattr(m, "lora_A") for m in group)
    return total, grad


def _trains(module: torch.nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def step_flops(model: VLM, batch: int, tokens: int, head_tokens: int | None = None, views: int = 1) -> float:
    """Training FLOPs of one step as autograd runs it with the model's present
    requires_grad flags: each part's forward; in the backward, a weight gradient
    (1 x its matmuls) where the part trains, and an input gradient (1 x its
    matmuls, 2 x the attention scores) where it or something below it trains.
    So a frozen encoder counts once, frozen blocks under the trained ones
    cost no backward, and a block trained through LoRA adapters only its
    adapters' weight gradients. `head_tokens`: the positions of a sequence followed by a
    supervised token, where the loss makes logits (None: all); `views`: encoder views a
    sample (its images' tiles and thumbnails, svlm/models/tiles.py)."""
    lm = model.lm
    f = lm_parts(model.cfg.lm, tokens)
    head_tokens = tokens if head_tokens is None else head_tokens
    vis = vision_flops(model.vision.dinov2.config, model.vision.num_patches, views)
    proj = projector_flops(model, views)
    vision_trains, projector_trains = _trains(model.vision), _trains(model.projector)
    dv = model.vision.dinov2.config
    patch_embed = views * model.vision.num_patches * 2 * 3 * dv.patch_size**2 * dv.hidden_size  # no pixel gradient
    total = vis + (2 * vis - patch_embed if vision_trains else 0)
    total += proj * (1 + projector_trains + (vision_trains or projector_trains))  # (its first layer's: slightly over)
    below = vision_trains or projector_trains or _trains(lm.embed_tokens)  # a gradient reaches the LM's input
    if lm.reducer is not None:
        total += tokens * f["reducer"] * (1 + _trains(lm.reducer) + below)
        below = below or _trains(lm.reducer)
    for layer in lm.layers:
        if has_lora(layer):
            flops, below = _adapted_block(layer, f, below)
            total += tokens * flops
            continue
        trains = _trains(layer)
        # A trained block's norms need the input gradients of every matmul in it, as does anything below.
        total += tokens * (f["block"] * (1 + trains + (below or trains)) + f["scores"] * (1 + 2 * (below or trains)))
        below = below or trains
    total += head_tokens * f["head"] * (1 + lm.lm_head.weight.requires_grad + below)
    return total * batch
