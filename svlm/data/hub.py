"""Data sets as the hub ships them: parquet or Arrow tables with the images
embedded as bytes, read through the `datasets` library.

A source (data.train_file, a data.sources entry, ...) is a table when it is
- a .parquet or .arrow file, or a glob of them ("data/train-*.parquet");
- a folder written by `Dataset.save_to_disk` (a DatasetDict too: `split` picks one);
- any other folder `datasets.load_dataset` reads: a local copy of a hub data
  set repository (`git clone https://huggingface.co/datasets/HuggingFaceM4/the_cauldron`),
  with `subset` naming its configuration (the_cauldron's "ai2d") and `split` the split.

Parquet is converted once into memory-mapped Arrow files (the `datasets` cache,
kept in `.svlm/datasets` beside the data, or datasets' own cache when that
folder is read-only) and never loaded whole: a row's text is read when its
sample is, and its images' bytes only when a batch decodes them. Each parquet
file is opened on its own, so a bad row is reported as `file:row` (rows count
from 0, as in the hub's data viewer); a save_to_disk or load_dataset folder's
rows are numbered across the folder.

The format (svlm/data/formats.py) is detected from the columns. An image cell
may be a `datasets.Image` struct ({bytes, path}), raw bytes, or a file name
under the data set's image folder; a list of them for several images.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from svlm.data.formats import IMAGE_COLUMN, DataError, Record, detect_format, parse_record
from svlm.data.images import EmbeddedImage
from svlm.errors import ConfigError

TABLE_SUFFIXES = (".parquet", ".arrow")


def is_table(path: str | os.PathLike) -> bool:
    """Whether a data source is read as a table (see the module docstring), not as jsonl/JSON."""
    text = str(path)
    if glob.has_magic(text):
        return True
    path = Path(path)
    return path.suffix in TABLE_SUFFIXES or path.is_dir()


def arrow_cache(path: Path) -> str | None:
    """Where `datasets` keeps the Arrow copy of parquet files: beside the data, or its own cache."""
    folder = path.parent / ".svlm" / "datasets"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder) if os.access(folder, os.W_OK) else None
    except OSError:
        return None


def saved_folder(path: Path) -> bool:
    """Whether `path` is a folder written by save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def source_files(path: Path, subset: str | None, split: str) -> list[Path]:
    """The files of a table source that is not a save_to_disk folder: a glob's
    matches, the file itself, or the files of a hub repository's split."""
    import datasets

    text = str(path)
    if glob.has_magic(text):
        files = sorted(Path(f) for f in glob.glob(text, recursive=True))
        if not files:
            raise ConfigError(f"data: no file matches {text}")
        return files
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"data: {path} does not exist")
    try:
        builder = datasets.load_dataset_builder(text, subset, cache_dir=arrow_cache(path / "x"))
    except ValueError as e:  # an unknown configuration: datasets lists the known ones
        raise ConfigError(f"data: {path}: {e}") from None
    data_files = builder.config.data_files or {}
    if split not in data_files:
        raise ConfigError(f"{path} (subset {subset}) has splits {sorted(map(str, data_files))}, not {split!r}")
    return [Path(f) for f in data_files[split]]


def open_parts(path: Path, subset: str | None, split: str) -> list[tuple[str, object]]:
    """(name used in file:row, datasets.Dataset) for each part of a table source:
    each parquet or Arrow file on its own (exact file:row); a save_to_disk
    folder, or a repository in another file format (json, csv...), whole."""
    import datasets

    if saved_folder(path):
        found = datasets.load_from_disk(str(path))
        if isinstance(found, datasets.DatasetDict):
            if split not in found:
                raise ConfigError(f"{path} has splits {sorted(found)}, not {split!r}")
            found = found[split]
        return [(str(path), found)]
    files = source_files(path, subset, split)
    if all(f.suffix in TABLE_SUFFIXES for f in files):
        return [(str(f), open_file(f)) for f in files]
    if not path.is_dir():
        others = [f.name for f in files if f.suffix not in TABLE_SUFFIXES]
        raise ConfigError(f"data: {path} matches files that are neither parquet nor arrow: {others[:3]}")
    whole = datasets.load_dataset(str(path), subset, split=split, cache_dir=arrow_cache(path / "x"))
    return [(str(path), whole)]


def open_file(file: Path):
    """One parquet or Arrow file as a memory-mapped datasets.Dataset."""
    import datasets

    if file.suffix == ".arrow":
        return datasets.Dataset.from_file(str(file))
    return datasets.load_dataset("parquet", data_files=[str(file)], split="train", cache_dir=arrow_cache(file))


def is_list(cell: pa.Scalar) -> bool:
    return pa.types.is_list(cell.type) or pa.types.is_large_list(cell.type)


class Table:
    """The rows of a table source as Records, one at a time (picklable: the
    parts are memory-mapped datasets, sent to workers by file name)."""

    def __init__(
        self,
        path: str | os.PathLike,
        image_dir: Path,
        fmt: str = "auto",
        subset: str | None = None,
        split: str = "train",
    ) -> None:
        self.path, self.image_dir = Path(path), Path(image_dir)
        self.parts = open_parts(self.path, subset, split)
        self.sizes = np.cumsum([0] + [len(ds) for _, ds in self.parts])
        columns = self.parts[0][1].column_names
        self.fmt = detect_format(columns, str(self.path)) if fmt == "auto" else fmt
        self.image_column = IMAGE_COLUMN[self.fmt]
        for name, ds in self.parts:
            needed = {"cauldron": "texts", "messages": "messages"}.get(self.fmt, "conversations")
            if needed not in ds.column_names:
                raise ConfigError(
                    f"data: {name} has no {needed!r} column for format {self.fmt} (columns: {ds.column_names})"
                )
        self.text_columns = [c for c in columns if c != self.image_column]

    def __len__(self) -> int:
        return int(self.sizes[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Row i of the table -> (its part, its row there)."""
        k = int(np.searchsorted(self.sizes, i, side="right")) - 1
        return k, i - int(self.sizes[k])

    def record(self, i: int) -> Record:
        """Row i: its turns, and its images as references (nothing decoded)."""
        k, row = self.locate(i)
        name, ds = self.parts[k]
        where = f"{name}:{row}"
        arrow = ds.data.table
        obj = arrow.slice(row, 1).select(self.text_columns).to_pylist()[0]
        images = []
        if self.image_column in arrow.column_names:
            cell = arrow.column(self.image_column)[row]
            count = (len(cell) if cell.is_valid else 0) if is_list(cell) else int(cell.is_valid)
            images = [EmbeddedImage(self, i, self.image_column, j, f"{where}#{j}") for j in range(count)]
        return parse_record(obj, where, self.fmt, images)

    def image_bytes(self, ref: EmbeddedImage) -> bytes:
        """The encoded bytes of an image a record refers to: embedded, or a file it names."""
        k, row = self.locate(ref.row)
        cell = self.parts[k][1].data.table.column(ref.column)[row]
        return cell_bytes((cell.values[ref.k] if is_list(cell) else cell).as_py(), self.image_dir, ref.name)


class CellImages:
    """Image cells already read (a streamed row group's, a benchmark row's), for EmbeddedImage."""

    def __init__(self, cells: list, images: Path) -> None:
        self.cells, self.images = cells, images

    def image_bytes(self, ref: EmbeddedImage) -> bytes:
        return cell_bytes(self.cells[ref.k], self.images, ref.name)


def cell_bytes(value: object, image_dir: Path, name: str) -> bytes:
    """An image cell's encoded bytes: a datasets.Image struct ({bytes, path}), raw
    bytes, or a file name under `image_dir`; a DataError naming the image when there are none."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes) and value:
        return value
    if isinstance(value, str) and value:
        file = Path(value) if os.path.isabs(value) else image_dir / value
        try:
            return file.read_bytes()
        except OSError as e:
            raise DataError(name, "missing image", f"{file}: {e.strerror}") from None
    raise DataError(name, "missing image", "the image cell is empty")


def parquet_files(path: Path, subset: str | None, split: str) -> list[Path]:
    """The parquet files of a source, for streaming and text reading: a file, a glob, or a hub repository's split."""
    files = [] if saved_folder(path) else source_files(path, subset, split)
    if not files or any(f.suffix != ".parquet" for f in files):
        raise ConfigError(f"data.streaming reads parquet shards; {path} gives {[f.name for f in files][:4] or 'none'}")
    return files


def parquet_text_records(files: list[Path], fmt: str, image_dir: Path) -> Iterator[Record | DataError]:
    """The records of parquet files read a row group at a time, their image
    columns left unread (what training a tokenizer needs: text, not GBs of
    pictures). Each record has no images; a bad row comes as its DataError."""
    import pyarrow.parquet as pq

    for path in files:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
        layout = detect_format(columns, str(path)) if fmt == "auto" else fmt
        text = [c for c in columns if c != IMAGE_COLUMN[layout]]
        first = 0
        for g in range(parquet.metadata.num_row_groups):
            for row, obj in enumerate(parquet.read_row_group(g, columns=text).to_pylist()):
                try:
                    yield parse_record(obj, f"{path}:{first + row}", layout, images=[])
                except DataError as e:
                    yield e
            first += parquet.metadata.row_group(g).num_rows
