"""The order a stage reads its training samples in: a fresh shuffle each epoch,
mixed sources by weight, optional grouping by length, resuming mid-epoch, and
which samples a run of so many draws will read (what the feature cache encodes)."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """A fresh order of the data each epoch, from (seed, epoch); file order without
    shuffle. With `sizes` and `weights` (a MixedDataset), each source gives its
    share of the epoch: weight / sum(weights) of all samples, repeating a small
    source or taking part of a large one. With `lengths` and `group` (the
    optimizer batch), samples of similar length are batched together: the
    shuffled order is cut into windows of `window` batches, each window is
    sorted by length and cut into batches, and the batches are shuffled; little
    padding, still a random mix. With window=1 each optimizer batch keeps its
    random samples, sorted so that its micro-batches have similar lengths.
    `start_at(epoch, skip)` resumes in the middle of an epoch."""

    def __init__(
        self, n: int, seed: int, shuffle: bool = True, sizes=None, weights=None, lengths=None, group=0, window=64
    ):
        self.n, self.seed, self.epoch, self.shuffle = n, seed, 0, shuffle
        self.sizes, self.weights = sizes, weights
        self.lengths = torch.as_tensor(lengths) if lengths is not None else None
        self.group = group
        self.window = window  # batches sorted together: more, less padding; fewer, more random batches
        self.resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, epoch: int, skip: int) -> None:
        self.resume = (epoch, skip)

    def ahead(self, epoch: int, draws: int, micro: int, drop_last: bool) -> set[int]:
        """The distinct samples the next `draws` draws take, from `epoch` (and its
        `start_at` point) on, in micro-batches of `micro` (a short last one dropped
        with `drop_last`, as the loader does): what a run that many samples long
        reads. The sampler itself is left as it was."""
        saved, taken = (self.epoch, self.resume), set()
        try:
            self.epoch = epoch
            while draws > 0 and len(taken) < self.n:
                order = list(iter(self))
                order = order[: len(order) // micro * micro] if drop_last else order
                if not order:
                    break
                taken.update(order[:draws])
                draws -= len(order[:draws])
                self.epoch += 1
        finally:
            self.epoch, self.resume = saved
        return taken

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.sizes is None:
            return torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        parts, start = [], 0
        for size, weight in zip(self.sizes, self.weights):
            take = round(self.n * weight / sum(self.weights))
            cycles = [torch.randperm(size, generator=g) for _ in range(-(-take // size))]
            parts.append(torch.cat(cycles)[:take] + start)
            start += size
        order = torch.cat(parts)
        return order[torch.randperm(len(order), generator=g)] if self.shuffle else order

    def _grouped(self, order: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Batches of similar length, in random order (see the class docstring)."""
        window = self.group * self.window
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += list(chunk.split(self.group))
        full = [b for b in batches if len(b) == self.group]  # a short batch goes last
        rest = [b for b in batches if len(b) != self.group]
        full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        return torch.cat(full + rest) if full or rest else order

    def __iter__(self):
        order = self._order()
        if self.lengths is not None and self.group > 1 and self.shuffle:
            order = self._grouped(order, torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 1))
        order = order.tolist()
        if self.resume is not None and self.resume[0] == self.epoch:
            order = order[self.resume[1] :]
            self.resume = None
        return iter(order)

    def __len__(self) -> int:
        if self.sizes is None:
            return self.n
        return sum(round(self.n * w / sum(self.weights)) for w in self.weights)
