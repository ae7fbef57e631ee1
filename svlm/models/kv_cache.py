"""The KV cache of incremental decoding: preallocated, one row per sequence,
rows at their own positions (ragged batches), rows joining and leaving
between steps (svlm/inference/generation.py, svlm/serve/engine.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class KVCache:
    """Keys and values of every layer seen so far, for incremental decoding.

    Preallocated: each layer holds (rows, n_kv, capacity, hs), grown by
    `chunk` positions at a time, so a new token is written in place instead
    of copying the cache. Row r holds its first `lengths[r]` positions; rows
    may hold different lengths (a ragged batch: each row's queries sit at
    their own positions and see only their own keys). `absorb` appends rows
    prefilled in another cache, `drop` retires one: a continuously batching
    server (svlm/serve/engine.py) grows and shrinks its batch that way.
    """

    def __init__(self, chunk: int = 256) -> None:
        self.keys: list[torch.Tensor] = []  # per layer (rows, nkv, capacity, hs)
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # per row, kept on the host: no device read to plan a step
        self.chunk = chunk
        self.capacity = 0
        self.plan: StepPlan | None = None  # the forward in progress

    @property
    def length(self) -> int:
        """The longest row."""
        return max(self.lengths, default=0)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def begin(self, B: int, T: int, device: torch.device, valid: list[int] | None = None) -> StepPlan:
        """Plan a forward of T new tokens in each of the B rows; row r's tokens
        after its first valid[r] are padding (written, then overwritten later)."""
        if not self.lengths:
            self.lengths = [0] * B
        if B != self.rows:
            raise ValueError(f"the cache holds {self.rows} rows; this input has {B}")
        self._reserve(self.length + T)
        self.plan = StepPlan.make(self.lengths, T, device)
        added = [T] * B if valid is None else valid
        self.lengths = [n + a for n, a in zip(self.lengths, added)]
        return self.plan

    def _reserve(self, need: int) -> None:
        if need <= self.capacity:
            return
        grown = self.chunk * math.ceil(need / self.chunk)
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                extra = t.new_zeros(t.shape[0], t.shape[1], grown - t.shape[2], t.shape[3])
                store[i] = torch.cat([t, extra], dim=2)  # (rows, nkv, grown, hs): once a chunk, not once a token
        self.capacity = grown

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's (B, nkv, T, hs) keys and values; return every
        key and value the queries may see, (B, nkv, limit, hs)."""
        if layer == len(self.keys):  # first call for this layer: allocate
            B, nkv, _, hs = k.shape
            self.keys.append(k.new_zeros(B, nkv, self.capacity, hs))
            self.values.append(v.new_zeros(B, nkv, self.capacity, hs))
        plan = self.plan
        for store, new in ((self.keys[layer], k), (self.values[layer], v)):
            if plan.start is not None:  # every row at the same place: a slice
                store.narrow(2, plan.start, new.shape[2]).copy_(new)
            else:  # (B, T) positions, one per row and token
                index = plan.positions[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[3])
                store.scatter_(2, index, new)
        return self.keys[layer].narrow(2, 0, plan.limit), self.values[layer].narrow(2, 0, plan.limit)

    def absorb(self, other: KVCache) -> None:
        """Append the rows of `other` (prefilled apart) after this cache's rows."""
        if not self.lengths:
            self.keys, self.values, self.lengths = other.keys, other.values, list(other.lengths)
            self.capacity = other.capacity
            return
        self._reserve(max(self.length, other.length))
        n = other.length
        for store, more in ((self.keys, other.keys), (self.values, other.values)):
            for i, t in enumerate(store):
                rows = t.new_zeros(more[i].shape[0], t.shape[1], t.shape[2], t.shape[3])
                rows[:, :, :n] = more[i][:, :, :n]
                store[i] = torch.cat([t, rows])  # (rows + new rows, nkv, capacity, hs)
        self.lengths += other.lengths

    def drop(self, row: int) -> None:
        """Retire one row: the last row takes its place (the caller's order
        of rows changes the same way)."""
        last = self.rows - 1
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if row != last:
                    t[row, :, : self.lengths[last]] = t[last, :, : self.lengths[last]]
                store[i] = t[:last]
        self.lengths[row] = self.lengths[last]
        self.lengths.pop()


@dataclass
class StepPlan:
    """Where one forward's queries sit and which keys each sees, worked out
    once for every layer: positions, the keys' span, and the mask."""

    positions: torch.Tensor | None  # (B, T) for ragged rows; None: every row at start..start+T-1
    start: int | None  # the rows' common length before this forward; None: ragged
    limit: int  # keys 0..limit-1 exist for some row
    mask: torch.Tensor | None  # (T, limit) or (B, 1, T, limit) bool, True: visible; None: see `causal`
    causal: bool  # no mask: SDPA's is_causal (a square prefill), else every key visible

    @staticmethod
    def make(lengths: list[int], T: int, device: torch.device) -> StepPlan:
        limit = max(lengths) + T
        if len(set(lengths)) == 1:  # one start for all rows (batch of one, or equal prompts)
            start = lengths[0]
            mask = None
            if start and T > 1:  # query i (position start + i) sees keys 0..start+i
                mask = torch.ones(T, limit, dtype=torch.bool, device=device).tril(diagonal=start)
            return StepPlan(None, start, limit, mask, causal=start == 0 and T > 1)
        positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
        mask = torch.arange(limit, device=device) <= positions[:, :, None]  # (B, T, limit): own keys only
        return StepPlan(positions, None, limit, mask[:, None], causal=False)
