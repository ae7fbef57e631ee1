"""Attention over packed rows (data.packing, svlm/data/packing.py): several
samples a row, each token seeing the earlier tokens of its own sample only.
On the CPU, SDPA with the block-diagonal mask (short rows) or over each
sample's span (long rows); on a GPU, FlashAttention's
variable-length kernel (flash_attn_varlen_func) when flash-attn is
installed, else PyTorch's flex_attention with a block mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPANS_FROM = 1024  # CPU rows longer than this: SDPA a sample's span at a time (below: the mask is cheaper)


def packed_kernel(device: torch.device, row_len: int) -> str:
    """The attention packed rows of `row_len` tokens get: FlashAttention's
    variable-length kernel on a GPU where flash-attn is installed, else
    PyTorch's flex_attention on a GPU. On the CPU, SDPA with the
    block-diagonal mask ("sdpa") for rows up to SPANS_FROM tokens, else causal
    SDPA over each sample's span ("sdpa_spans": the mask's cost grows with
    the row's square, the spans' with the samples'). Measured here: shapes
    rows of 512 train at 33-35 samples/s with the mask against 29-32 with
    spans; rows of 2,048 at 1.75 samples/s with spans against 1.07 with the mask."""
    if device.type != "cuda":
        return "sdpa" if row_len <= SPANS_FROM else "sdpa_spans"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flex"
    return "flash_varlen"


def end_to_end(device: torch.device, row_len: int) -> bool:
    """Whether a micro-batch's packed samples go end to end in one row
    (svlm/data/packing.py, `layout`): so where the kernel for rows of
    `row_len` reads the rows as one flattened sequence (per-sample spans,
    FlashAttention's varlen kernel), for which rows only add padding to
    compute. The mask kernels (SDPA's block-diagonal mask, flex's block mask)
    keep rows of at most row_len, their cost and shapes bounded by it."""
    return packed_kernel(device, row_len) in ("sdpa_spans", "flash_varlen")


@dataclass
class Packing:
    """Rows holding several samples (svlm/data/packing.py): a token sees the
    earlier tokens of its own sample only. Worked out once a forward for every layer."""

    kernel: str  # "sdpa" | "sdpa_spans" | "flex" | "flash_varlen" (packed_kernel)
    mask: torch.Tensor | None = None  # sdpa: (B, 1, T, T) bool, True: visible
    block_mask: object | None = None  # flex: a BlockMask
    cu_seqlens: torch.Tensor | None = None  # flash_varlen, sdpa_spans: (n + 1,) int32 starts in the flattened rows
    max_seqlen: int = 0

    @staticmethod
    def make(segments: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int, kernel: str) -> Packing:
        """segments (B, T): each token's sample number in its row (0: padding)."""
        B, T = segments.shape
        if kernel == "flash_varlen":
            return Packing(kernel, cu_seqlens=cu_seqlens.to(segments.device), max_seqlen=max_seqlen)
        if kernel == "sdpa_spans":
            return Packing(kernel, cu_seqlens=cu_seqlens.cpu(), max_seqlen=max_seqlen)
        if kernel == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            def same_sample(b, h, q, kv):
                return (segments[b, q] == segments[b, kv]) & (q >= kv)

            return Packing(kernel, block_mask=create_block_mask(same_sample, B, None, T, T, device=segments.device))
        same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
        return Packing(kernel, mask=(same & causal)[:, None])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        """(B, nh, T, hs) queries, (B, nkv, T, hs) keys and values -> (B, nh, T, hs)."""
        gqa = k.shape[1] != q.shape[1]
        if self.kernel == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout, enable_gqa=gqa)
        if self.kernel == "flex":
            return compiled_flex()(q, k, v, block_mask=self.block_mask, enable_gqa=gqa)
        B, nh, T, hs = q.shape
        if self.kernel == "sdpa_spans":
            flat = [t.transpose(0, 1).reshape(1, t.shape[1], B * T, hs) for t in (q, k, v)]  # (1, heads, B*T, hs)
            bounds = self.cu_seqlens.tolist()  # on the host already: no device read
            y = torch.cat([F.scaled_dot_product_attention(*(t[:, :, a:b] for t in flat), dropout_p=dropout,
                                                          is_causal=True, enable_gqa=gqa)
                           for a, b in zip(bounds, bounds[1:])], dim=2)  # fmt: skip
            return y.view(nh, B, T, hs).transpose(0, 1)
        from flash_attn import flash_attn_varlen_func

        flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], hs) for t in (q, k, v)]  # (B*T, heads, hs)
        y = flash_attn_varlen_func(*flat, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen,
                                   dropout_p=dropout, causal=True)  # fmt: skip
        return y.view(B, T, nh, hs).transpose(1, 2)


_FLEX = None


def compiled_flex():
    """flex_attention compiled once (eager, it materialises the scores)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention)
    return _FLEX
