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
    """cos and sin tables of shape (max_len, head_dim // 2)."""
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inverse_frequencies(head_dim, theta, scaling))
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of x: (B, nh, T, hs); cos/sin: (T, hs/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)
