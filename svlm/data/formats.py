"""Reading conversation records from jsonl or JSON files.

Formats (`data.format`; auto: detected from each record's keys):
- svlm, the original's: {"conversations": [{"role": "user", "content": "..."}, ...], "image": "x.jpg"}
- llava / llava_onevision: {"id": ..., "image": "x.jpg", "conversations": [{"from": "human", "value": "..."}, ...]}
- cauldron (nanoVLM's the_cauldron): {"images": [...], "texts": [{"user": "...", "assistant": "..."}, ...]}
- messages (OpenAI/ShareGPT): {"messages": [{"role": "user", "content": [{"type": "image"},
  {"type": "text", "text": "..."}]}, ...], "images": [...]}

"image" may be a list of file names: several images, the k-th taking the
place of the k-th <image> tag (or image part). In parquet/arrow tables the
images are embedded as bytes instead (svlm/data/hub.py).

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

    def __reduce__(self):  # sent from data-loader workers and between processes
        return DataError, (self.where, self.reason, self.detail)


@dataclass
class Record:
    turns: list[tuple[str, str]]
    images: list  # file names (str) or EmbeddedImage, in the order their <image> tags appear
    where: str  # file:line, or file:row of a table
    meta: dict = field(default_factory=dict)  # other keys of the record (id, lang, type, ...)


@dataclass
class BadSamples:
    """Counts of skipped samples by reason, with the first few examples of each.
    A sample counts once, however often it is drawn (by its file:line or file:row)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seen: dict[str, str] = field(default_factory=dict)  # where -> reason, of every sample counted

    def add(self, err: DataError, keep: int = 5) -> None:
        if err.where in self.seen:
            return
        self.seen[err.where] = err.reason
        self.counts[err.reason] += 1
        ex = self.examples.setdefault(err.reason, [])
        if len(ex) < keep:
            ex.append(str(err))

    def merge(self, other: BadSamples, keep: int = 5) -> None:
        """Add another process's (or worker's) bad samples; one seen by both counts once."""
        for where, reason in other.seen.items():
            if where not in self.seen:
                self.seen[where] = reason
                self.counts[reason] += 1
        for reason, found in other.examples.items():
            ex = self.examples.setdefault(reason, [])
            ex += [e for e in found if e not in ex][: max(0, keep - len(ex))]

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


FORMATS = ("svlm", "llava", "cauldron", "llava_onevision", "messages")
# The column (or key) each format keeps its images in.
IMAGE_COLUMN = {
    "svlm": "image",
    "llava": "image",
    "llava_onevision": "image",
    "cauldron": "images",
    "messages": "images",
}
LAYOUTS = (
    "cauldron ('images' + 'texts' of {user, assistant}), llava_onevision / llava / svlm ('conversations' of "
    "from/value or role/content, optional 'image'), messages ('messages' of role/content parts + 'images')"
)


def detect_format(columns, where: str, strict: bool = True) -> str:
    """The format of a table (or, not `strict`, a record), from its column names (keys)."""
    columns = set(columns)
    if "texts" in columns:
        return "cauldron"
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "llava_onevision"  # the svlm and llava layouts too: one parser reads all three
    if not strict:
        return "svlm"  # a record without its conversation: reported as such below
    raise DataError(where, "missing column", f"found {sorted(columns)}; expected one of: {LAYOUTS}")


def conversation_turns(conv: object, where: str) -> list[tuple[str, str]]:
    """'conversations' of the svlm (role/content) or LLaVA (from/value) layout."""
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
    return turns


def cauldron_turns(texts: object, where: str) -> list[tuple[str, str]]:
    """'texts' of the_cauldron: a list of {user, assistant} exchanges."""
    if not isinstance(texts, list) or not texts:
        raise DataError(where, "missing key", "no non-empty 'texts' list")
    turns = []
    for i, pair in enumerate(texts):
        if not isinstance(pair, dict):
            raise DataError(where, "bad turn", f"texts[{i}] is not an object")
        for role in ("user", "assistant"):
            if not isinstance(pair.get(role), str):
                raise DataError(where, "bad turn", f"texts[{i}] has no {role!r} text")
            turns.append((role, pair[role]))
    return turns


def message_turns(messages: object, where: str) -> list[tuple[str, str]]:
    """OpenAI/ShareGPT-style 'messages': role + content, a string or a list of parts
    {"type": "text", "text": ...} / {"type": "image"} (an image part becomes an
    <image> tag where it stands). A system message's text goes before the next
    user turn's (the chat templates here have no system turn)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(where, "missing key", "no non-empty 'messages' list")
    turns, system = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise DataError(where, "bad turn", f"messages[{i}] needs a 'role' and a 'content'")
        content = msg.get("content")
        if isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    pieces.append("<image>")
                elif kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                else:
                    raise DataError(where, "bad turn", f"messages[{i}].content[{j}] is not a text or image part")
            content = "\n".join(pieces)
        if not isinstance(content, str):
            raise DataError(where, "bad turn", f"messages[{i}] has no text content")
        role = msg["role"].lower()
        if role == "system":
            system.append(content)
            continue
        if role not in ROLE_NAMES:
            raise DataError(where, "unknown role", f"messages[{i}] has role {msg['role']!r}")
        if system and ROLE_NAMES[role] == "user":
            content, system = "\n\n".join([*system, content]), []
        turns.append((ROLE_NAMES[role], content))
    return turns


TURNS = {"cauldron": ("texts", cauldron_turns), "messages": ("messages", message_turns)}


def record_turns(obj: dict, fmt: str, where: str) -> list[tuple[str, str]]:
    """The (role, text) turns of a record of format `fmt` ('auto': from its keys), checked."""
    fmt = detect_format(obj, where, strict=False) if fmt == "auto" else fmt
    key, parse = TURNS.get(fmt, ("conversations", conversation_turns))
    turns = parse(obj.get(key), where)
    for i, (role, text) in enumerate(turns):
        if not text.strip():
            raise DataError(where, "empty turn", f"turn {i} ({role}) has no text")
    if not any(r == "assistant" for r, _ in turns):
        raise DataError(where, "no assistant turn", "nothing to learn from")
    return turns


def parse_record(obj: object, where: str, fmt: str = "auto", images: list | None = None) -> Record:
    """A record of any format. Images are file names from the record's image key,
    or `images` when given (images embedded in a table, read by svlm/data/hub.py)."""
    if not isinstance(obj, dict):
        raise DataError(where, "not an object", f"expected a JSON object, got {type(obj).__name__}")
    fmt = detect_format(obj, where, strict=False) if fmt == "auto" else fmt
    turns = record_turns(obj, fmt, where)
    key = IMAGE_COLUMN[fmt]
    if images is None:
        image = obj.get(key)
        images = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            raise DataError(where, "bad image", f"{key!r} must be a file name or a list of them, got {image!r}")
    skip = {key, TURNS.get(fmt, ("conversations",))[0]}
    meta = {k: v for k, v in obj.items() if k not in skip}
    return Record(turns, images, where, meta)


def read_records(
    path: str | os.PathLike, on_error: str = "raise", bad: BadSamples | None = None, fmt: str = "auto"
) -> Iterator[Record]:
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
                yield parse_record(obj, f"{path}[{i}]", fmt)
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
                yield parse_record(obj, where, fmt)
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

    def __init__(self, path: str | os.PathLike, fmt: str = "auto") -> None:
        self.path, self.fmt = Path(path), fmt
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
        return parse_record(obj, where, self.fmt)

    def __getstate__(self) -> dict:  # picklable for worker processes: no open handle
        return {**self.__dict__, "_handle": None, "_pid": None}


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
