"""Projectors: patch features (B, P, Dv) -> visual tokens (B, N, D).

- `mlp`: optional compression of the patch grid (pixel shuffle merges each
  r x r block of patches into one token of width r*r*Dv; avg pooling keeps
  Dv), then (optional LayerNorm), Linear, GELU, Linear.
- `resampler`: the original SVLM's learned queries cross-attending to the
  patches, a residual MLP, and an "align" head LN, Linear, GELU, Linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ProjectorConfig:
    kind: Literal["mlp", "resampler"] = "mlp"
    compress: Literal["none", "pixel_shuffle", "avg_pool"] = "none"  # mlp only
    factor: int = 2  # r: an r x r block of patches becomes one token
    norm: bool = True  # mlp only: LayerNorm on the input features
    hidden: int | None = None  # width of the hidden layer; None: the output width
    # mlp only: a learned embedding of each visual token's place in the grid, added to the token
    # (the token then says where in the picture it is, whatever the encoder kept of that)
    pos_embed: bool = False
    queries: int = 32  # resampler only
    heads: int = 8  # resampler only

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"model.projector.factor must be >= 1, got {self.factor}")
        if self.kind == "resampler" and self.queries < 1:
            raise ValueError(f"model.projector.queries must be >= 1, got {self.queries}")


def count_tokens(cfg: ProjectorConfig, num_patches: int) -> int:
    """How many visual tokens the projector makes from `num_patches` patch features."""
    if cfg.kind == "resampler":
        return cfg.queries
    r = cfg.factor if cfg.compress != "none" else 1
    return num_patches // (r * r)


def compress_grid(x: torch.Tensor, mode: str, r: int) -> torch.Tensor:
    """(B, P, C) patch tokens on a square grid -> (B, P/r^2, C*r^2 or C)."""
    if mode == "none" or r == 1:
        return x
    B, P, C = x.shape
    g = math.isqrt(P)
    if g * g != P or g % r:
        raise ValueError(f"cannot compress a grid of {P} patches by {r}x{r}: need a square grid divisible by {r}")
    if mode == "avg_pool":
        grid = x.transpose(1, 2).reshape(B, C, g, g)  # (B, C, g, g)
        return F.avg_pool2d(grid, r).flatten(2).transpose(1, 2)  # (B, (g/r)^2, C)
    grid = x.reshape(B, g // r, r, g // r, r, C)  # (B, gy, ry, gx, rx, C)
    grid = grid.permute(0, 1, 3, 2, 4, 5)  # (B, gy, gx, ry, rx, C)
    return grid.reshape(B, (g // r) ** 2, r * r * C)  # (B, N, r*r*C)


class MLPProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int, num_patches: int) -> None:
        super().__init__()
        self.cfg = cfg
        r = cfg.factor if cfg.compress != "none" else 1
        feat = in_dim * r * r if cfg.compress == "pixel_shuffle" else in_dim
        self.num_tokens = count_tokens(cfg, num_patches)
        hidden = cfg.hidden or out_dim
        self.norm = nn.LayerNorm(feat) if cfg.norm else nn.Identity()
        self.fc1 = nn.Linear(feat, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.pos = nn.Parameter(torch.randn(self.num_tokens, out_dim) * 0.02) if cfg.pos_embed else None

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = compress_grid(patches, self.cfg.compress, self.cfg.factor)  # (B, N, feat)
        x = self.fc2(F.gelu(self.fc1(self.norm(x))))  # (B, N, out_dim)
        return x if self.pos is None else x + self.pos.to(x.dtype)


class Resampler(nn.Module):
    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim % cfg.heads:
            raise ValueError(f"model.projector.heads ({cfg.heads}) must divide the encoder width ({in_dim})")
        self.num_tokens = cfg.queries
        self.queries = nn.Parameter(torch.randn(cfg.queries, in_dim) * 0.02)
        self.attn_norm = nn.LayerNorm(in_dim)
        self.attn = nn.MultiheadAttention(in_dim, cfg.heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, 4 * in_dim), nn.GELU(), nn.Linear(4 * in_dim, in_dim)
        )
        hidden = cfg.hidden or out_dim
        self.align = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        kv = self.attn_norm(patches)  # (B, P, Dv)
        q = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1)  # (B, Q, Dv)
        x = q + self.attn(q, kv, kv, need_weights=False)[0]  # (B, Q, Dv)
        x = x + self.mlp(x)
        return self.align(x)  # (B, Q, out_dim)


def build_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int, num_patches: int) -> nn.Module:
    if cfg.kind == "resampler":
        return Resampler(cfg, in_dim, out_dim)
    return MLPProjector(cfg, in_dim, out_dim, num_patches)
