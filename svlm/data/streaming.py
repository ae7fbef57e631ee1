"""data.streaming=true: training rows read straight from parquet shards, a
few row groups at a time, never converted or loaded whole (for data sets
larger than the disk's free space or the memory).

Order. Each epoch the row groups of all shards are shuffled (seed, epoch)
and dealt out to the readers: every process's data-loader workers (or the
process itself without workers), reader c taking groups c, c + C, c + 2C, ...
of C readers, so no two readers share a row. A reader reads its groups in
windows of at least data.shuffle_buffer rows, shuffles each window's rows
(seed, epoch, reader, window) and yields them; after its last group it goes
on with the next epoch. A window is the shuffle buffer: rows of several
random row groups mixed, as a shuffle buffer does.

Position. The order is a function of the shards' metadata (row counts) and
the seed alone, so a reader can skip any number of rows without reading
them: whole windows by their counts, then part of one. The training loop
counts the micro-batches it consumed (a DataLoader takes batch b from
worker b % workers; a resumed one starts at the worker whose turn it was),
so a checkpoint's position says how many rows each reader gave, and a resumed run continues exactly where it stopped: no row
seen twice or skipped. That needs the same readers and micro-batch; a resume
with others is refused. (datasets' own IterableDataset.state_dict loses its
shuffle buffer on resume, so rows would be skipped: hence this reader.)

Epochs are per reader: readers hold row groups of different sizes, so one
may start its next epoch a few rows before another. The samples of an epoch
are the parquet metadata's row count, and stage.max_steps or stage.epochs
drive the schedule as without streaming.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from svlm.data.dataset import _Conversations, encode_record
from svlm.data.formats import IMAGE_COLUMN, DataError, detect_format, parse_record
from svlm.data.hub import CellImages, is_list, parquet_files
from svlm.data.images import EmbeddedImage
from svlm.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    path: Path
    images: Path  # where file names in image cells resolve
    fmt: str


@dataclass(frozen=True)
class Group:
    """A row group of a parquet shard: what readers are dealt."""

    shard: int
    index: int
    first_row: int  # its first row's number in the shard
    rows: int


class StreamingChatDataset(IterableDataset, _Conversations):
    """The rows of parquet sources (DataFile list) as a stream of training items
    (see the module docstring). `shard_for` sets the readers before iterating;
    `start_at` the position to resume from."""

    lazy = True

    def load(self, files: list) -> None:
        import pyarrow.parquet as pq

        self.shards: list[Shard] = []
        self.groups: list[Group] = []
        for file in files:
            for path in parquet_files(file.path, file.subset, file.split):
                parquet = pq.ParquetFile(path)
                meta, columns = parquet.metadata, parquet.schema_arrow.names
                fmt = detect_format(columns, str(path)) if file.fmt == "auto" else file.fmt
                first = 0
                for g in range(meta.num_row_groups):
                    rows = meta.row_group(g).num_rows
                    if rows:
                        self.groups.append(Group(len(self.shards), g, first, rows))
                    first += rows
                self.shards.append(Shard(path, file.images, fmt))
        self.rows = sum(g.rows for g in self.groups)
        if not self.rows:
            raise ValueError(f"no row in {[str(s.path) for s in self.shards]}")
        self.seed, self.shuffle, self.buffer = 0, True, 1000
        self.rank, self.world, self.workers, self.micro = 0, 1, 0, 1
        self.skip_batches = 0  # micro-batches this process already consumed (a resume)

    def __len__(self) -> int:
        return self.rows

    def shard_for(self, rank: int, world: int, workers: int, micro: int, seed: int, shuffle: bool, buffer: int) -> None:
        """The readers: `world` processes of `workers` data-loader workers each, batches of `micro`."""
        self.rank, self.world, self.workers, self.micro = rank, world, workers, micro
        self.seed, self.shuffle, self.buffer = seed, shuffle, max(1, buffer)
        if len(self.groups) < self.readers:
            raise ConfigError(
                f"data.streaming: {len(self.groups)} row group(s) in {len(self.shards)} shard(s) for {self.readers} "
                "readers (processes x hardware.num_workers): use fewer workers, or shards with smaller row groups"
            )

    @property
    def readers(self) -> int:
        return self.world * max(1, self.workers)

    def layout(self) -> dict:
        """What a resume must match to continue the same order."""
        return {"readers": self.readers, "micro": self.micro, "seed": self.seed, "rows": self.rows}

    def set_epoch(self, epoch: int) -> None:  # the stream runs on by itself (per-reader epochs)
        pass

    def start_at(self, epoch: int, samples: int) -> None:
        """Resume after `samples` rows drawn by all processes together (the loop's count)."""
        self.skip_batches = samples // (self.micro * self.world)

    # -- the order (metadata only)

    def windows(self, epoch: int, reader: int) -> Iterator[list[Group]]:
        """Reader `reader`'s row groups in epoch `epoch`, cut into shuffle windows."""
        order = np.arange(len(self.groups))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        window, rows = [], 0
        for g in order[reader :: self.readers]:
            window.append(self.groups[g])
            rows += self.groups[g].rows
            if rows >= self.buffer:
                yield window
                window, rows = [], 0
        if window:
            yield window

    def positions(self, reader: int, skip: int) -> Iterator[tuple[int, list[Group], np.ndarray]]:
        """(epoch, window, its rows' order) from `skip` rows on; skipped windows are never read."""
        epoch = 0
        while True:
            for w, window in enumerate(self.windows(epoch, reader)):
                n = sum(g.rows for g in window)
                if skip >= n:
                    skip -= n
                    continue
                order = np.arange(n)
                if self.shuffle:
                    order = np.random.default_rng([self.seed, epoch, reader, w]).permutation(n)
                yield epoch, window, order[skip:]
                skip = 0
            epoch += 1

    # -- reading

    def records(self, reader: int, skip: int):
        """(Record, epoch) of reader `reader`, from `skip` rows on, without end."""
        import pyarrow.parquet as pq

        files: dict[int, pq.ParquetFile] = {}
        for epoch, window, order in self.positions(reader, skip):
            tables, starts = [], np.cumsum([0] + [g.rows for g in window])
            for g in window:
                if g.shard not in files:
                    files[g.shard] = pq.ParquetFile(self.shards[g.shard].path)
                tables.append(files[g.shard].read_row_group(g.index))
            for j in order:
                k = int(np.searchsorted(starts, j, side="right")) - 1
                yield self.record(window[k], tables[k], int(j - starts[k])), epoch

    def record(self, group: Group, table, row: int):
        """Row `row` of a row group read as `table`: a Record, or the DataError that it is bad."""
        shard = self.shards[group.shard]
        where = f"{shard.path}:{group.first_row + row}"
        column = IMAGE_COLUMN[shard.fmt]
        obj = table.slice(row, 1).select([c for c in table.column_names if c != column]).to_pylist()[0]
        images = []
        if column in table.column_names:
            cell = table.column(column)[row]
            cells = (cell.values.to_pylist() if cell.is_valid else []) if is_list(cell) else [cell.as_py()]
            cells = cells if is_list(cell) or cells[0] is not None else []  # an empty single-image cell: no image
            holder = CellImages(cells, shard.images)
            images = [EmbeddedImage(holder, row, column, k, f"{where}#{k}") for k in range(len(cells))]
        try:
            return parse_record(obj, where, shard.fmt, images)
        except DataError as e:
            return e

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(1, self.workers):
            raise RuntimeError(f"streaming: set up for {self.workers} workers, read by {workers}")
        # Batch b of a run came from worker b % workers. A resumed loader starts again with its worker 0, so
        # its worker w reads as the worker of the run's next batch: (w + batches already consumed) % workers.
        role = (worker + self.skip_batches) % workers
        reader = self.rank * workers + role
        mine = len(range(role, self.skip_batches, workers))  # the batches that reader gave before
        for rec, _epoch in self.records(reader, mine * self.micro):
            self.fetched += 1
            try:
                if isinstance(rec, DataError):
                    raise rec
                example, cut = encode_record(rec, self.encoder, self.image_dir, self.max_len, self.max_images)
                if cut and len(self.truncated) < 1000:
                    self.truncated.append(example.where)
                yield self.item(example)
            except DataError as e:
                yield self.skip(e)  # drawn all the same: every micro-batch is `micro` rows of the stream


class DeviceLoader:
    """A stream's DataLoader with its batches moved to `device` (accelerate does
    not prepare it: the stream shards itself across processes)."""

    def __init__(self, loader: DataLoader, device) -> None:
        self.loader, self.device = loader, device

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for batch in self.loader:
            yield send_to_device(batch, self.device)
