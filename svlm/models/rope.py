"""Rotary position embeddings (RoPE), and Llama 3.1's rescaling of their
frequencies for long contexts.

References:
- "RoFormer" (Su et al., 2021): rotary position embeddings.
- Llama 3.1 (Meta, 2024): `rope_type: llama3`, low frequencies slowed by
  `factor`, high ones kept, the band between interpolated; the same
  computation as transformers' `_compute_llama3_parameters`.
"""

from __future__ import annotations

import math

import torch

SCALINGS = ("llama3",)  # what `rope_scaling.rope_type` may be


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """(head_dim // 2,) rotation speeds of the pairs, rescaled when `scaling` says so."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, slowed)


def rope_tables(
    head_dim: int, max_len: int, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, head_dim), laid out for
    apply_rope: cos repeated over both halves, sin negated over the first."""
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inverse_frequencies(head_dim, theta, scaling))
    cos, sin = angles.cos(), angles.sin()  # (max_len, head_dim // 2)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half x1, second half x2) of x's last dimension by
    the angles of cos/sin (rope_tables' layout, broadcast against x):
    (x1 cos - x2 sin, x2 cos + x1 sin), with the halves swapped by one roll
    (four operations a call: a decode step makes one per layer)."""
    half = x.shape[-1] // 2
    xf = x.float()
    return (xf * cos + xf.roll(half, dims=-1) * sin).type_as(x)
