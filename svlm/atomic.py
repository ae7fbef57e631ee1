"""Files and folders written whole or not at all: everything goes into a
temporary sibling (same folder, so the rename stays on one file system), which
is renamed into place at the end. A crash or an error leaves the previous
version, or nothing, never half of one.

    with new_file(path) as tmp:            # a file a library writes (PNG, .npz, JSON)
        image.save(tmp, format="PNG")
    write_text(path, text)                 # the same for text
    with new_folder(folder) as tmp:        # a folder: a model, an export, a data set
        ...                                # replace=True: what is there is replaced
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def new_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` (with its suffix) to write; flushed to disk
    and renamed over `path` when the block ends, removed if it raises."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with new_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def new_folder(folder: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """An empty temporary sibling of `folder` to fill; when the block ends it
    becomes `folder`. replace=True: what is there is replaced (moved aside first,
    so one of the two always exists). replace=False: when `folder` appeared
    meanwhile (another process built the same thing first), theirs is kept.
    Removed if the block raises."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replace:
        replace_folder(tmp, folder)
        return
    try:
        tmp.rename(folder)
    except OSError:  # it exists now: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(tmp: Path, folder: Path) -> Path:
    """Move a finished `tmp` folder to `folder`, replacing what is there: the old
    one is moved aside first, so one of them always exists."""
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)
    return folder
