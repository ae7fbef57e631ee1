"""Where a data set's files are (the generated shapes set, or the user's files and
tables), and the data sets that read them."""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from svlm.config import ConfigError, DataConfig, SourceConfig
from svlm.data.dataset import ChatDataset, LazyChatDataset, MixedDataset, TableChatDataset
from svlm.data.embedded import build_embedded
from svlm.data.formats import BadSamples, DataError, Record, read_records
from svlm.data.hub import Table, is_table, parquet_files, parquet_text_records
from svlm.data.streaming import StreamingChatDataset


def data_root(cfg: DataConfig, cache: str) -> Path:
    """The folder holding the data files (generating the embedded set if needed)."""
    if cfg.kind != "files" and cfg.root is None:
        return build_embedded(cfg.kind, dataclasses.asdict(cfg), Path(cache) / "data")
    if cfg.root is None:
        raise ConfigError(f"data.root is required for data={cfg.name}: the folder holding your data files")
    root = Path(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"data.root={cfg.root!r}: no such folder")
    return root


def image_dir(cfg: DataConfig, root: Path, task: str) -> Path:
    return root / cfg.image_dir.replace("{task}", task)


@dataclass(frozen=True)
class DataFile:
    """One source a stage reads: a jsonl/JSON file, or a table (svlm/data/hub.py),
    with how to read it and where its image files are."""

    path: Path
    images: Path  # image file names resolve here
    fmt: str = "auto"
    subset: str | None = None
    split: str = "train"
    weight: float = 1.0

    @property
    def is_table(self) -> bool:
        return is_table(self.path)

    def exists(self) -> bool:
        return self.path.exists() or (glob.has_magic(str(self.path)) and bool(glob.glob(str(self.path))))

    def table(self) -> Table:
        return Table(self.path, self.images, self.fmt, self.subset, self.split)

    def text_records(self, on_error: str = "skip", bad: BadSamples | None = None) -> Iterator[Record]:
        """Every record's turns (what the tokenizer learns from), bad ones skipped
        (counted in `bad`) or raised. A table's images are not read: its records
        come without them (parquet is read a row group at a time, text columns only)."""
        if not self.is_table:
            yield from read_records(self.path, on_error, bad, self.fmt)
            return
        try:
            found = parquet_text_records(parquet_files(self.path, self.subset, self.split), self.fmt, self.images)
        except ConfigError:  # not parquet (arrow, a save_to_disk folder): its memory-mapped rows
            found = self.table_records(self.table())
        for rec in found:
            if isinstance(rec, DataError):
                if on_error == "raise":
                    raise rec
                if bad is not None:
                    bad.add(rec)
                continue
            yield rec

    @staticmethod
    def table_records(table: Table) -> Iterator[Record | DataError]:
        for i in range(len(table)):
            try:
                yield table.record(i)
            except DataError as e:
                yield e

    def stamp(self) -> str:
        """What changes when the data does (sizes and times of its files)."""
        files = sorted(glob.glob(str(self.path))) if glob.has_magic(str(self.path)) else [self.path]
        stats = [(str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
        return f"{stats}:{self.subset}:{self.split}:{self.fmt}"


def data_file(cfg: DataConfig, root: Path, task: str, role: str, src: SourceConfig | None = None) -> DataFile:
    """The DataFile of data.<role>_file (role: train, val, test), or of a data.sources entry."""
    if src is None:
        name = {"train": cfg.train_file, "val": cfg.val_file, "test": cfg.test_file}[role]
        return DataFile(root / name.replace("{task}", task), image_dir(cfg, root, task), cfg.format, cfg.subset,
                        cfg.splits[role])  # fmt: skip
    images = root / src.image_dir.replace("{task}", task) if src.image_dir else image_dir(cfg, root, task)
    return DataFile(root / src.file.replace("{task}", task), images, src.format or cfg.format,
                    src.subset or cfg.subset, src.split, src.weight)  # fmt: skip


def split_file(cfg: DataConfig, root: Path, split: str, task: str) -> DataFile | None:
    """The source of a split ('train', 'val', 'test') for a task, or None if the config has none."""
    if {"train": cfg.train_file, "val": cfg.val_file, "test": cfg.test_file}[split] is None:
        return None
    found = data_file(cfg, root, task, split)
    if not found.exists():
        raise ConfigError(f"data.{split}_file: {found.path} does not exist")
    return found


def train_files(cfg: DataConfig, root: Path, task: str) -> list[DataFile]:
    """The sources training reads: data.sources, or data.train_file."""
    if cfg.sources:
        files = [data_file(cfg, root, task, "train", src) for src in cfg.sources]
        for f in files:
            if not f.exists():
                raise ConfigError(f"data.sources: {f.path} does not exist")
        return files
    return [split_file(cfg, root, "train", task)]


LAZY_BYTES = 100 * 2**20  # data.lazy=auto: files larger than this are read lazily


def open_dataset(
    cfg: DataConfig, file: DataFile, encoder, processor, max_len: int, bad: BadSamples
) -> ChatDataset | LazyChatDataset:
    """One source: a table (always read lazily), or a jsonl/JSON file encoded up
    front or read lazily when large (data.lazy)."""
    args = (encoder, processor, max_len, cfg.on_error, bad, cfg.max_images, file.fmt)
    if file.is_table:
        return TableChatDataset(file.table(), file.images, *args)
    path = file.path
    lazy = cfg.lazy == "always" or (cfg.lazy == "auto" and path.stat().st_size > LAZY_BYTES)
    if lazy and path.suffix != ".jsonl":
        if cfg.lazy == "always":
            raise ConfigError(f"data.lazy=always reads .jsonl files one line at a time; {path} is not one")
        lazy = False  # a JSON list has to be parsed whole
    cls = LazyChatDataset if lazy else ChatDataset
    return cls(path if lazy else [path], file.images, *args)


def load_splits(
    cfg: DataConfig, root: Path, task: str, encoder, processor, max_len: int, bad: BadSamples, seed: int
) -> tuple[Dataset, Dataset | None]:
    """(train, validation) data sets of a task. Training reads data.train_file, or
    the data.sources mixed by weight. Validation is data.val_file, or
    data.val_fraction of the training data held out, or None."""
    files = train_files(cfg, root, task)
    if cfg.streaming:  # one stream over every source's shards (the loop shards it: StreamingChatDataset.shard_for)
        stream = StreamingChatDataset(files, files[0].images, encoder, processor, max_len, cfg.on_error, bad,
                                      cfg.max_images, cfg.format)  # fmt: skip
        val_file = split_file(cfg, root, "val", task)
        return stream, open_dataset(cfg, val_file, encoder, processor, max_len, bad) if val_file else None
    parts = [open_dataset(cfg, f, encoder, processor, max_len, bad) for f in files]
    weights = [f.weight for f in files]
    val_file = split_file(cfg, root, "val", task)
    val = None
    if val_file is not None:
        val = open_dataset(cfg, val_file, encoder, processor, max_len, bad)
    elif cfg.val_fraction > 0:
        if sum(len(p) for p in parts) < 2:
            raise ConfigError(f"data.val_fraction={cfg.val_fraction}: the training data has only one sample")
        pairs = [p.split(cfg.val_fraction, seed) for p in parts]
        parts = [rest for rest, _ in pairs]
        held = [out for _, out in pairs]
        val = held[0] if len(held) == 1 else MixedDataset(held, weights)
    train = parts[0] if len(parts) == 1 and not cfg.sources else MixedDataset(parts, weights)
    return train, val
