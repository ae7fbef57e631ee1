"""What names a cached feature (svlm/data/feature_cache.py): the cache key of an
encoder (its weights, configs and preprocessing) and the content hash of an
image file, remembered by the file's stat so an unchanged file is read once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from svlm.atomic import write_text

FORMAT_VERSION = 1  # bump when the cache's layout, or what a stored row means, changes
DTYPE = np.float16  # how rows are stored
# DINOv2 config entries that do not change what the encoder computes.
CONFIG_NOISE = {"transformers_version", "architectures", "dtype", "torch_dtype", "name_or_path"}


def encoder_key(vision, processor) -> str:
    """The cache key of a VisionEncoder and its ImageProcessor (see the module docstring)."""
    dinov2 = vision.dinov2.config.to_dict()
    settings = {
        "format": FORMAT_VERSION,
        "dtype": np.dtype(DTYPE).name,
        # tiles are not an encoder setting (and the cache is off with them): keys stay what they were
        "vision": {k: v for k, v in dataclasses.asdict(vision.cfg).items() if k not in ("path", "tiles")},
        "dinov2": {k: v for k, v in dinov2.items() if k not in CONFIG_NOISE and not k.startswith("_")},
        "processor": {
            "class": type(processor).__qualname__,
            "size": processor.size,
            "mean": np.asarray(processor.mean).ravel().tolist(),
            "std": np.asarray(processor.std).ravel().tolist(),
        },
    }
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in sorted(vision.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


class FileHashes:
    """Content hashes (sha256) of image files. A file is read once; later its hash
    is reused while its size, modification time, change time and inode are the
    same. Editing a file in place changes its change time (which no tool can set
    back), so an edited image is read and hashed again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.known = json.loads(path.read_text(encoding="utf-8"))
            assert isinstance(self.known, dict)
        except (OSError, ValueError, AssertionError):
            self.known = {}  # none yet, or unreadable: hash again
        self.changed = False

    def digest(self, file: Path) -> str | None:
        """The file's content hash, or None when it is not a readable file."""
        try:
            st = os.stat(file)
        except OSError:
            return None
        name = os.path.abspath(file)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        seen = self.known.get(name)
        if isinstance(seen, list) and seen[:4] == stamp:
            return seen[4]
        h = hashlib.sha256()
        try:
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            return None
        digest = h.hexdigest()[:32]
        self.known[name] = [*stamp, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:  # several runs may save at once: the last one's table wins, none is torn
            write_text(self.path, json.dumps(self.known))
            self.changed = False
