"""The KV cache of incremental decoding: preallocated, one row per sequence,
rows at their own positions (ragged batches), rows joining and leaving
between steps (svlm/inference/generation.py, svlm/serve/engine.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class KVCache:
    """Keys and values of every layer seen so far, for incremental decoding.

    Preallocated: each layer holds (slots, n_kv, capacity, hs), grown by
    `chunk` positions at a time, so a new token is written in place instead
    of copying the cache. Row r holds its first `lengths[r]` positions; rows
    may hold different lengths (a ragged batch: each row's queries sit at
    their own positions and see only their own keys). `absorb` appends rows
    prefilled in another cache, `drop` retires one: a continuously batching
    server (svlm/serve/engine.py) grows and shrinks its batch that way. The
    first `rows` of the slots are in use; a dropped row's slot is kept for
    the next row to join, so joining copies that row only, not the cache.
    What a slot holds past its row's length is never seen (each query sees
    its own row's keys up to its own position). A forward is planned once
    (`begin`: where it writes, which keys each query sees), and each block
    gets its layer's share (`layer`: a LayerCache).
    """

    def __init__(self, chunk: int = 256) -> None:
        self.keys: list[torch.Tensor] = []  # per layer (slots, nkv, capacity, hs)
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

    @property
    def allocated(self) -> bool:
        """Whether the storage exists (else the next `begin` needs a layout)."""
        return bool(self.keys)

    def begin(
        self, B: int, T: int, device: torch.device, valid: list[int] | None = None, layout: Layout | None = None
    ) -> StepPlan:
        """Plan a forward of T new tokens in each of the B rows; row r's tokens
        after its first valid[r] are padding (written, then overwritten later).
        A new cache allocates its storage here, as `layout` says."""
        if not self.lengths:  # a new cache, or every row retired
            self.lengths = [0] * B
        if B != self.rows:
            raise ValueError(f"the cache holds {self.rows} rows; this input has {B}")
        if self.length + T > self.capacity or (self.allocated and B > self.keys[0].shape[0]):
            self._reserve(self.length + T, B)
        if not self.allocated:
            if layout is None:
                raise ValueError("a new KV cache needs the layout of its storage (begin's `layout`)")
            shape = (B, layout.kv_heads, self.capacity, layout.head_dim)
            self.keys = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.layers)]
            self.values = [torch.zeros(shape, dtype=layout.dtype, device=device) for _ in range(layout.layers)]
        self.plan = StepPlan.make(self.lengths, T, device)
        added = [T] * B if valid is None else valid
        self.lengths = [n + a for n, a in zip(self.lengths, added)]
        return self.plan

    def layer(self, i: int) -> LayerCache:
        """Layer i's share of the forward planned by `begin`: its rows in use."""
        keys, values = self.keys[i], self.values[i]
        if self.rows < keys.shape[0]:
            keys, values = keys.narrow(0, 0, self.rows), values.narrow(0, 0, self.rows)
        return LayerCache(keys, values, self.plan)

    def reserve(self, positions: int) -> None:
        """Before the first forward: room for `positions` positions a row, not
        rounded up to a chunk (a prefill that knows its rows' budgets
        allocates no more); later, as growing does."""
        if self.keys:
            self._reserve(positions)
        else:
            self.capacity = max(self.capacity, positions)

    def _reserve(self, need: int, slots: int = 0) -> None:
        """Room for `need` positions and `slots` rows."""
        grown = self.capacity if need <= self.capacity else self.chunk * math.ceil(need / self.chunk)
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                more_slots, more = max(slots - t.shape[0], 0), grown - t.shape[2]
                if more:  # once a chunk, not once a token
                    t = torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], more, t.shape[3])], dim=2)
                if more_slots:  # at least doubled: rows joining one by one copy the cache rarely
                    t = torch.cat([t, t.new_zeros(max(more_slots, t.shape[0]), *t.shape[1:])])
                store[i] = t  # (slots, nkv, grown, hs)
        self.capacity = grown

    def absorb(self, other: KVCache) -> None:
        """Append the rows of `other` (prefilled apart) after this cache's rows."""
        if not self.lengths:
            self.keys, self.values, self.lengths = other.keys, other.values, list(other.lengths)
            self.capacity = other.capacity
            return
        self._reserve(max(self.length, other.length), self.rows + other.rows)
        at, n = self.rows, other.length
        for store, more in ((self.keys, other.keys), (self.values, other.values)):
            for t, m in zip(store, more):
                t[at : at + m.shape[0], :, :n] = m[:, :, :n]  # (new rows, nkv, n, hs) into free slots
        self.lengths += other.lengths

    def drop(self, row: int) -> None:
        """Retire one row: the last row takes its place (the caller's order
        of rows changes the same way); its slot stays for a row to come."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            for store in (self.keys, self.values):
                for t in store:
                    t[row, :, :n] = t[last, :, :n]
        self.lengths[row] = self.lengths[last]
        self.lengths.pop()


@dataclass
class Layout:
    """What a cache's storage holds a layer (the language model knows it)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


@dataclass
class LayerCache:
    """One layer's keys and values, (B, nkv, capacity, hs) for the B rows in
    use, during one forward. A block gets this, not the cache and a layer
    number: compiled (hardware.compile), one graph serves every layer."""

    keys: torch.Tensor
    values: torch.Tensor
    plan: StepPlan

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's (B, nkv, T, hs) keys and values; return every
        key and value the queries may see, (B, nkv, limit, hs)."""
        plan = self.plan
        for store, new in ((self.keys, k), (self.values, v)):
            if plan.start is not None:  # every row at the same place: a slice
                store.narrow(2, plan.start, new.shape[2]).copy_(new)
            else:  # (B, T) positions, one per row and token
                index = plan.positions[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[3])
                store.scatter_(2, index, new)
        return self.keys.narrow(2, 0, plan.limit), self.values.narrow(2, 0, plan.limit)


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
