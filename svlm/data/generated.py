"""Generated data sets (shapes, scenes): written once, in the original SVLM's
jsonl + image-folder format, to a cache folder named by a hash of their
settings, and read back by the loader that reads real data."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from svlm.atomic import new_folder


def settings_key(spec, version: int) -> str:
    """A short hash of the generator's settings and version (the cache folder's name)."""
    blob = json.dumps({"version": version, **asdict(spec)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def conversation(turns: list[tuple[str, str]]) -> list[dict]:
    """[(question, answer), ...] -> the original's `conversations`; <image> opens the first question."""
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"role": "user", "content": ("<image>\n" if i == 0 else "") + q})
        conv.append({"role": "assistant", "content": a})
    return conv


def build_cached(
    name: str, spec, version: int, cache_dir: str | os.PathLike, write: Callable[[Path], dict[str, list[dict]]]
) -> Path:
    """The folder <cache_dir>/<name>-<key>, made once: `write(folder)` draws the
    pictures into folder/images and returns the records of each jsonl file by
    file name; several processes may build the same folder at once."""
    root = Path(cache_dir) / f"{name}-{settings_key(spec, version)}"
    if (root / "DONE").is_file():
        return root
    with new_folder(root, replace=False) as tmp:  # another process may build the same one at once
        (tmp / "images").mkdir()
        for file, records in write(tmp).items():
            with open(tmp / file, "w", encoding="utf-8") as f:
                for rec in records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        (tmp / "spec.json").write_text(json.dumps({"version": version, **asdict(spec)}, indent=2, ensure_ascii=False))
        (tmp / "DONE").write_text("")
    return root
