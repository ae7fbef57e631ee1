"""Reading conversation records from jsonl or JSON files.

Two formats, detected per record:
- the original SVLM's: {"conversations": [{"role": "user", "content": "..."}, ...], "image": "x.jpg"}
- LLaVA's: {"id": ..., "image": "x.jpg", "conversations": [{"from": "human", "value": "..."}, ...]}

In either, "image" may be a list of file names: several images, the k-th
taking the place of the k-th <image> tag.

Every record comes out as a `Record` with turns of ("user" | "assistant", text)
and the place it came from (file:line), so every problem can be reported
precisely. A bad record raises `DataError` naming file and line; with
on_error="skip" it is counted and skipped instead.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from svlm.atomic import new_file

ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class DataError(ValueError):
    """A bad sample: `where` is file:line, `reason` a short category for counting."""

    def __init__(self, where: str, reason: str, detail: str) -> None:
        super().__init__(f"{where}: {reason}: {detail}")
        self.where, self.reason, self.detail = where, reason, detail


@dataclass
class Record:
    turns: list[tuple[str, str]]
    images: list[str]  # file names, in the order their <image> tags appear
    where: str  # file:line
    meta: dict = field(default_factory=dict)  # other keys of the record (id, lang, type, ...)


@dataclass
class BadSamples:
    """Counts of skipped samples by reason, with the first few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, err: DataError, keep: int = 5) -> None:
        self.counts[err.reason] += 1
        ex = self.examples.setdefault(err.reason, [])
        if len(ex) < keep:
            ex.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no bad samples"
        lines = [f"{self.total} bad sample(s) skipped:"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {reason}: {n}, e.g. {self.examples[reason][0]}")
        return "\n".join(lines)


def parse_record(obj: object, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(where, "not an object", f"expected a JSON object, got {type(obj).__name__}")
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(where, "missing key", "no non-empty 'conversations' list")
    turns = []
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict):
            raise DataError(where, "bad turn", f"conversations[{i}] is not an object")
        role = msg.get("role", msg.get("from"))
        text = msg.get("content", msg.get("value"))
        if not isinstance(role, str) or not isinstance(text, str):
            raise DataError(
                where, "bad turn", f"conversations[{i}] needs 'role'+'content' (SVLM) or 'from'+'value' (LLaVA)"
            )
        if role.lower() not in ROLE_NAMES:
            raise DataError(where, "unknown role", f"conversations[{i}] has role {role!r}")
        turns.append((ROLE_NAMES[role.lower()], text))
    if not any(r == "assistant" for r, _ in turns):
        raise DataError(where, "no assistant turn", "nothing to learn from")
    image = obj.get("image")
    images = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise DataError(where, "bad image", f"'image' must be a file name or a list of them, got {image!r}")
    meta = {k: v for k, v in obj.items() if k not in ("conversations", "image")}
    return Record(turns, images, where, meta)


def read_records(path: str | os.PathLike, on_error: str = "raise", bad: BadSamples | None = None) -> Iterator[Record]:
    """Records of a .jsonl file (one object a line) or a .json file (a list of objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")

    def handle(err: DataError) -> None:
        if on_error == "raise":
            raise err
        if bad is not None:
            bad.add(err)

    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(str(path), "malformed JSON", str(e)) from e
        if not isinstance(items, list):
            raise DataError(str(path), "malformed JSON", "a .json data file must hold a list of records")
        for i, obj in enumerate(items):
            try:
                yield parse_record(obj, f"{path}[{i}]")
            except DataError as e:
                handle(e)
        return
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                handle(DataError(where, "malformed JSON", str(e)))
                continue
            try:
                yield parse_record(obj, where)
            except DataError as e:
                handle(e)


# ------------------------------------------------------------- large jsonl files


def line_index(path: str | os.PathLike) -> np.ndarray:
    """(N, 2) int64 array of [byte offset, line number] of the non-empty lines of a
    jsonl file, so records can be read one at a time. Built once and cached beside
    the file (`.<name>.svlm-index.npz`); rebuilt when the file's size or time changes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    st = path.stat()
    key = np.array([st.st_size, st.st_mtime_ns], dtype=np.int64)
    cache = path.with_name(f".{path.name}.svlm-index.npz")
    if cache.is_file():
        try:
            with np.load(cache) as z:
                if np.array_equal(z["key"], key):
                    return z["index"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it
    rows = []
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                rows.append((offset, lineno))
            offset += len(line)
    index = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    try:
        with new_file(cache) as tmp:
            np.savez(tmp, key=key, index=index)
    except OSError:  # a read-only data folder: keep the index in memory only
        pass
    return index


class RecordReader:
    """Reads single records of a jsonl file by byte offset (one file handle per process)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handle = None
        self._pid = None

    def read(self, offset: int, lineno: int) -> Record:
        if self._handle is None or self._pid != os.getpid():  # data-loader workers reopen
            self._handle, self._pid = open(self.path, "rb"), os.getpid()
        self._handle.seek(int(offset))
        where = f"{self.path}:{int(lineno)}"
        try:
            obj = json.loads(self._handle.readline().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(where, "malformed JSON", str(e)) from e
        return parse_record(obj, where)

    def __getstate__(self) -> dict:  # picklable for worker processes: no open handle
        return {"path": self.path, "_handle": None, "_pid": None}


def check_bad_fraction(bad: BadSamples, good: int, limit: float) -> None:
    """Stop when more than `limit` of the samples are bad: the data, not a few lines, is wrong."""
    total = good + bad.total
    if bad.total and bad.total > limit * total:
        raise DataError(
            "data",
            "too many bad samples",
            f"{bad.total} of {total} samples are bad ({bad.total / total:.1%} > data.max_bad_fraction={limit}):\n"
            f"{bad.summary()}",
        )
