"""Packing (data.packing=true): a micro-batch's samples share rows of at most
data.max_len tokens, instead of one row each padded to the longest. Where
the attention kernel reads the rows as one flattened sequence anyway
(per-sample spans on the CPU, FlashAttention's varlen kernel), the samples
go end to end in a single row, with no padding at all (`end_to_end`).

Each sample keeps its own positions (from 0) and sees only its own tokens:
the collator gives every row `segments` (which sample each token belongs to,
0 for padding) and `positions`, and the language model's attention turns
them into a block-diagonal causal mask (svlm/models/language_model.py,
`Packing`). A sample's first label is never supervised, so no prediction
crosses from one sample into the next. Images stay with their sample: the
pictures (or cached features) are given in the order their slots appear,
row by row. The sampler, the step's token-mean loss, resuming and sharding
see the same samples as without packing; only the rows differ.

References: nanoVLM packs samples into fixed-length rows; FlashAttention's
variable-length kernel (flash_attn_varlen_func) and PyTorch's flex_attention
run such rows on a GPU without materialising the mask.
"""

from __future__ import annotations

import torch

from svlm.data.chat import IGNORE
from svlm.data.dataset import Collator
from svlm.models.vlm import target_positions


def layout(lengths: list[int], row_len: int, flat: bool) -> list[list[int]]:
    """Sample indices of each row: all in one row, in order, when `flat`
    (each sample still at most row_len tokens), else `pack_rows`."""
    if flat:
        if any(n > row_len for n in lengths):
            raise ValueError(f"a sample of {max(lengths)} tokens is longer than data.max_len={row_len}")
        return [list(range(len(lengths)))]
    return pack_rows(lengths, row_len)


def pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """Sample indices of each row, each row at most row_len tokens, padded to
    the longest row: of first-fit decreasing (within 11/9 of the fewest rows
    possible) and even fillings of as many rows and of one row more (longest
    sample first, each into the emptiest row with room), the one that pads least."""
    if any(n > row_len for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a row of {row_len}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    first_fit: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        r = next((r for r, f in enumerate(fill) if f + lengths[i] <= row_len), None)
        if r is None:
            first_fit.append([])
            fill.append(0)
            r = len(fill) - 1
        first_fit[r].append(i)
        fill[r] += lengths[i]
    candidates = [first_fit] + [rows for k in (len(first_fit), len(first_fit) + 1)
                                if (rows := fill_evenly(order, lengths, row_len, k)) is not None]  # fmt: skip
    best = min(candidates, key=lambda rows: padding_share(lengths, rows))
    return [sorted(r) for r in best if r]


def fill_evenly(order: list[int], lengths: list[int], row_len: int, k: int) -> list[list[int]] | None:
    """`order`'s samples into k rows, each into the emptiest row with room; None when one finds none."""
    rows: list[list[int]] = [[] for _ in range(k)]
    fill = [0] * k
    for i in order:
        room = [r for r in range(k) if fill[r] + lengths[i] <= row_len]
        if not room:
            return None
        r = min(room, key=fill.__getitem__)
        rows[r].append(i)
        fill[r] += lengths[i]
    return [r for r in rows if r]


def row_tokens(lengths: list[int], rows: list[list[int]]) -> int:
    """Tokens of the rows, padding included, each padded to the longest."""
    return max(sum(lengths[i] for i in row) for row in rows) * len(rows)


def padding_share(lengths: list[int], rows: list[list[int]]) -> float:
    """Pad tokens / row tokens when the rows are padded to the longest."""
    return 1 - sum(lengths) / row_tokens(lengths, rows)


class PackingCollator(Collator):
    """Collator of packed rows (`layout`; one row when `flat`): input_ids,
    labels, positions and segments (rows, T), T the longest row; cu_seqlens
    and max_seqlen (each sample and each row's padding as one sequence of
    the flattened rows, for a variable-length kernel); n_samples; the
    pictures in slot order."""

    def __init__(self, pad_id: int, row_len: int, flat: bool = False, object_grid: int | None = None) -> None:
        super().__init__(pad_id, object_grid)
        self.row_len, self.flat = row_len, flat

    def __call__(self, items: list[dict | None]) -> dict[str, torch.Tensor]:
        bad = [(it["bad"], it["fatal"]) for it in items if it is not None and "bad" in it]
        items = [it for it in items if it is not None and "bad" not in it]
        rows = layout([len(it["input_ids"]) for it in items], self.row_len, self.flat) if items else [[]]
        T = max(max(sum(len(items[i]["input_ids"]) for i in row) for row in rows), 1)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), T), dtype=torch.long)
        segments = torch.zeros((len(rows), T), dtype=torch.long)
        spans, ordered = [], []  # sequence lengths of the flattened rows; the samples in slot order
        for r, row in enumerate(rows):
            at = 0
            for s, i in enumerate(row, start=1):
                it, n = items[i], len(items[i]["input_ids"])
                ids[r, at : at + n] = torch.tensor(it["input_ids"])
                labels[r, at + 1 : at + n] = torch.tensor(it["labels"][1:])  # its first token predicts nothing
                positions[r, at : at + n] = torch.arange(n)
                segments[r, at : at + n] = s
                spans.append(n)
                ordered.append(it)
                at += n
            if at < T:
                spans.append(T - at)  # the row's padding, a sequence of its own
                positions[r, at:] = torch.arange(T - at)
        batch = {"input_ids": ids, "labels": labels, "positions": positions, "segments": segments,
                 "target_index": target_positions(labels), "n_samples": len(items),
                 "cu_seqlens": torch.tensor([0, *spans], dtype=torch.int32).cumsum(0, dtype=torch.int32),
                 "max_seqlen": max(spans)}  # fmt: skip
        return self.finish(batch, ordered, bad)  # the pictures in the order of their slots
