"""Frozen-encoder feature cache: the vision encoder's outputs computed once,
kept on disk in half precision, and read back in every later epoch, stage and run.

A frozen encoder (stage.train_vision=false) gives an image the same features
every time it sees it, and nothing in SVLM augments images, so running it at
every step repeats work. With the cache a stage starts by computing the
features of the images its steps will read and the cache lacks (batched,
under no_grad, with a progress bar and an estimate of the time it takes): a
3-step run of batch 8 on 4,000 pictures encodes the 32 it draws (one batch to
spare), not all 4,000. The training data set then yields `vision_features`
(P, Dv) instead of `pixel_values`, and the model goes straight to the
projector. A stop request (Ctrl-C, SIGTERM) ends the fill after the batch
being encoded; what was encoded stays cached. The sample grid, evaluation and
inference still read pixels.

    <paths.cache>/features/
        image_hashes.json       image file -> content hash, reused while the file's stat is unchanged
        <cache key>/
            meta.json           what the key stands for (encoder config, preprocessing, row shape)
            features.f16        one row of (P, Dv) float16 features per distinct image, appended
            index.json          image key -> [row, CRC32 of the row], written after its rows
            lock                held (flock) while features are added

Keys. The cache key hashes (sha256) everything that decides an encoder's
output: the bytes of every weight, the DINOv2 config, the VisionConfig (image
size, CLS token, feature layer, ...), the ImageProcessor settings, the stored
dtype and FORMAT_VERSION. The image key is the sha256 of the image file's
bytes. Change a weight, a setting or a pixel, and the key changes: a stale
feature is never read. The same weights loaded from another folder, or saved
with a stage-1 model, give the same key, so stage 2 and later runs reuse it.

Safety. Rows are written and flushed to disk before the index that points to
them is atomically replaced: a crash leaves rows nobody points to, never an
entry without its row. Adding features holds a file lock, so runs sharing a
cache take turns, and the second finds the first one's rows; reading takes no
lock, because rows are only ever appended. Each run checks the rows it will
read against their CRC32 first (one sequential read, less than an epoch
reads): damaged rows are dropped and computed again; an index that does not
parse, or a features file shorter than its index says, is rebuilt from
nothing (new files: a run still reading the old ones keeps its own copy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from svlm.atomic import write_text
from svlm.data.feature_keys import DTYPE, FORMAT_VERSION, FileHashes, encoder_key
from svlm.data.formats import DataError
from svlm.data.images import EmbeddedImage, open_image
from svlm.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no file lock; one run at a time per cache
    fcntl = None

FILL_BATCH = 32  # images per encoder forward when filling the cache
COMMIT_EVERY = 1024  # rows between index writes (or an eighth of the rows, if more): what a crash can lose
FEATURES, INDEX, META, LOCK, HASHES = "features.f16", "index.json", "meta.json", "lock", "image_hashes.json"


def cache_applies(setting: bool | str, train_vision: bool, stage: str, unsupported: str | None = None) -> bool:
    """data.feature_cache: auto = on when the stage keeps the encoder frozen (and
    nothing `unsupported` names is on: data.streaming, whose images are not known
    ahead, or model.vision.tiles, whose views are not image files); true = on (a
    ConfigError when the encoder trains or something is unsupported); false =
    off. Images are never augmented in SVLM; an augmentation, if one is added,
    must turn the cache off here."""
    if unsupported:
        if setting is True:
            raise ConfigError(
                f"data.feature_cache=true caches one view of each image file known ahead, which {unsupported} "
                "does not give: set data.feature_cache=auto or false"
            )
        return False
    if setting is True and train_vision:
        raise ConfigError(
            f"data.feature_cache=true needs a frozen vision encoder, but stage.train_vision=true in {stage}: "
            "set data.feature_cache=auto (cache only where the encoder is frozen) or false"
        )
    return not train_vision if setting == "auto" else bool(setting)


# ------------------------------------------------------------------------ store


@torch.no_grad()
def encode(vision, pixels: torch.Tensor) -> np.ndarray:
    """pixel_values (B, 3, S, S) -> features (B, P, Dv) as stored: float16, on the CPU.
    fp32 weights, no autocast: the cached features are the encoder's exact output, rounded once."""
    device = next(vision.parameters()).device
    feats = vision(pixels.to(device)).float().cpu().numpy()  # (B, P, Dv)
    stored = feats.astype(DTYPE)
    if not np.isfinite(stored).all():
        raise ValueError(
            f"vision features out of float16 range (largest magnitude {np.abs(feats).max():.3g}): "
            "they cannot be cached; set data.feature_cache=false"
        )
    return stored


class FeatureCache:
    """The features of one encoder + preprocessing, under `root`/<cache key>/."""

    def __init__(self, root: str | os.PathLike, vision, processor, log: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.key = encoder_key(vision, processor)
        self.folder = self.root / self.key
        self.processor = processor
        self.shape = (vision.num_patches + int(vision.cfg.use_cls), vision.hidden_size)  # (P, Dv) of a row
        self.row_bytes = int(np.prod(self.shape)) * np.dtype(DTYPE).itemsize
        self.log = log
        self.meta = {
            "format": FORMAT_VERSION,
            "dtype": np.dtype(DTYPE).name,
            "row_shape": list(self.shape),
            "vision": dataclasses.asdict(vision.cfg),
            "processor": {"size": processor.size},
        }

    def image_keys(self, files: Iterable[Path | EmbeddedImage]) -> dict[Path | EmbeddedImage, str]:
        """image -> image key (content hash); images that cannot be read are left out.
        A file's hash is remembered by its stat; an embedded image's bytes are hashed each time."""
        self.root.mkdir(parents=True, exist_ok=True)
        hashes = FileHashes(self.root / HASHES)
        keys = {}
        for file in files:
            if isinstance(file, EmbeddedImage):
                try:
                    digest = hashlib.sha256(file.read()).hexdigest()[:32]
                except DataError:
                    digest = None  # reported with its sample
            else:
                digest = hashes.digest(file)
            if digest is not None:
                keys[file] = digest
        hashes.save()
        return keys

    # -- writing (one process at a time, under the lock)

    @contextmanager
    def _locked(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK, "a") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)  # waits while another run adds features
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def _empty(self) -> dict:
        return {"format": FORMAT_VERSION, "row_bytes": self.row_bytes, "rows": 0, "entries": {}}

    def _rebuild(self, why: str) -> dict:
        self.log(f"feature cache {self.folder}: {why}; rebuilding it")
        for name in (INDEX, FEATURES):  # unlinked, not truncated: readers keep their old files
            (self.folder / name).unlink(missing_ok=True)
        return self._empty()

    def _load_index(self, check: Iterable[str]) -> dict:
        """The index, with the rows of the image keys in `check` verified by CRC32."""
        try:
            index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
            rows, entries = int(index["rows"]), index["entries"]
            if index["format"] != FORMAT_VERSION or index["row_bytes"] != self.row_bytes:
                return self._rebuild("written in another format")
            if not isinstance(entries, dict) or any(not 0 <= e[0] < rows for e in entries.values()):
                raise ValueError("bad entries")
        except FileNotFoundError:
            return self._empty()  # new (a features file without an index holds rows nobody points to)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return self._rebuild("its index is damaged")
        size = (self.folder / FEATURES).stat().st_size if (self.folder / FEATURES).is_file() else 0
        if size < rows * self.row_bytes:
            return self._rebuild(f"{FEATURES} is truncated ({size} bytes, {rows} rows expected)")
        if rows:
            array = np.memmap(self.folder / FEATURES, DTYPE, "r", shape=(rows, *self.shape))
            damaged = [k for k in check if k in entries and zlib.crc32(array[entries[k][0]]) != entries[k][1]]
            del array
            for k in damaged:
                del entries[k]
            if damaged:
                self.log(f"feature cache {self.folder}: {len(damaged)} damaged row(s), computed again")
        return index

    def _commit(self, index: dict, out) -> None:
        out.flush()
        os.fsync(out.fileno())  # the rows are on disk before the index that points to them
        write_text(self.folder / INDEX, json.dumps(index))

    def fill(
        self,
        keys: dict[Path | EmbeddedImage, str],
        vision,
        show_progress: bool = True,
        stop: Callable[[], bool] = lambda: False,
    ) -> int:
        """Compute and store the features of every image in `keys` (image -> image
        key) that the cache lacks, with `vision` (a VisionEncoder, on any device).
        Returns how many were computed. `stop()` true between two batches ends the
        fill early, keeping what was computed. Images that cannot be decoded are
        left out: their samples are reported as bad when read, as without the cache."""
        wanted: dict[str, Path | EmbeddedImage] = {}  # image key -> one image with that content
        for file, key in keys.items():
            wanted.setdefault(key, file)
        with self._locked():
            index = self._load_index(wanted)
            missing = [(k, f) for k, f in wanted.items() if k not in index["entries"]]
            if not missing:
                return 0
            if not (self.folder / META).is_file():
                write_text(self.folder / META, json.dumps(self.meta, indent=2, default=str))
            was_training = vision.training
            vision.eval()
            path = self.folder / FEATURES
            done = since_commit = 0
            started = time.perf_counter()
            with open(path, "r+b" if path.is_file() else "w+b") as out, tqdm(
                total=len(missing), desc="feature cache", unit="img", disable=not show_progress, dynamic_ncols=True
            ) as bar:  # fmt: skip
                for start in range(0, len(missing), FILL_BATCH):
                    if stop():
                        self.log(f"feature cache: stopped after {done} of {len(missing)} images (kept)")
                        break
                    chunk, pixels = [], []
                    for key, file in missing[start : start + FILL_BATCH]:
                        try:
                            pixels.append(self.processor(open_image(file)))
                            chunk.append(key)
                        except DataError:
                            continue  # reported with its samples
                    if chunk:
                        feats = encode(vision, torch.stack(pixels))  # (n, P, Dv) float16
                        if feats.shape[1:] != self.shape:
                            raise RuntimeError(f"encoder gave features {feats.shape[1:]}, expected {self.shape}")
                        out.seek(index["rows"] * self.row_bytes)
                        for key, row in zip(chunk, feats):
                            out.write(row.tobytes())
                            index["entries"][key] = [index["rows"], zlib.crc32(row)]
                            index["rows"] += 1
                    done, since_commit = done + len(chunk), since_commit + len(chunk)
                    bar.update(min(FILL_BATCH, len(missing) - start))
                    if start == 0 and len(missing) > FILL_BATCH:
                        self.log(fill_estimate(len(missing), min(FILL_BATCH, len(missing)), started))
                    if since_commit >= max(COMMIT_EVERY, index["rows"] // 8):  # the index is rewritten whole
                        self._commit(index, out)
                        since_commit = 0
                self._commit(index, out)
            vision.train(was_training)
            return done

    # -- reading (any process)

    def view(self, keys: dict[Path | EmbeddedImage, str]) -> FeatureView:
        """What a data set reads: image -> its features, for the images in `keys`
        that the cache holds (the index as it is now; rows are never rewritten)."""
        try:
            index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        except FileNotFoundError:
            index = self._empty()
        rows = {str(file): index["entries"][k][0] for file, k in keys.items() if k in index["entries"]}
        return FeatureView(self.folder / FEATURES, rows, index["rows"], self.shape)


class FeatureView:
    """Image file -> its cached features, a (P, Dv) float16 tensor, read from the
    memory-mapped rows. Picklable for data-loader workers: a worker maps the
    file again, after checking it is still the same file (not rebuilt since)."""

    def __init__(self, path: Path, rows: dict[str, int], n_rows: int, shape: tuple[int, int]) -> None:
        self.path, self.rows, self.shape = path, rows, (n_rows, *shape)
        self._array = None
        self.identity = None
        if n_rows:
            st = os.stat(path)
            self.identity = (st.st_dev, st.st_ino)
            self._array = np.memmap(path, DTYPE, "r", shape=self.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def array(self) -> np.ndarray:
        if self._array is None:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) != self.identity:
                raise RuntimeError(f"the feature cache {self.path.parent} was rebuilt by another run: start again")
            self._array = np.memmap(self.path, DTYPE, "r", shape=self.shape)
        return self._array

    def get(self, file: Path | EmbeddedImage, where: str) -> torch.Tensor:
        """The features of `file`; a DataError (as without the cache) when it has none."""
        row = self.rows.get(str(file))
        if row is None:
            open_image(file, where)  # an unreadable image raises the usual error
            raise DataError(where, "missing features", f"{file} is not in the feature cache {self.path.parent}")
        return torch.from_numpy(np.array(self.array()[row]))  # (P, Dv), a copy out of the map

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def fill_estimate(total: int, done: int, started: float) -> str:
    """The line that says how long a fill will take, from its first `done` images."""
    rate = done / max(time.perf_counter() - started, 1e-9)
    left = (total - done) / rate
    when = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.1f} min" if left >= 60 else f"{left:.0f} s"
    return (
        f"feature cache: encoding {total} images at {rate:.1f} images/s, about {when} more "
        "(Ctrl-C stops the fill and keeps what is encoded; data.feature_cache=false skips it)"
    )


# --------------------------------------------------------------------- training


def attach(
    dataset,
    vision,
    processor,
    root: str | os.PathLike,
    indices: Iterable[int] | None = None,
    is_main: bool = True,
    wait: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = print,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[FeatureView, int]:
    """Fill the cache with the features of the images of the samples `indices`
    (None: every image `dataset` may load; the main process computes them on
    `vision`'s device, the others `wait`; `stop()` ends the fill early), then
    make the data set yield `vision_features`. Returns the view and how many
    features were computed (0: all were cached)."""
    start = time.perf_counter()
    cache = FeatureCache(root, vision, processor, log)
    files = sorted(dataset.image_files(indices), key=str)  # Path or EmbeddedImage
    computed = cache.fill(cache.image_keys(files), vision, stop=stop) if is_main else 0
    wait()
    view = cache.view(cache.image_keys(files))  # files unchanged since: their hashes are remembered
    dataset.use_features(view)
    whole = "" if indices is None else f" (the ones this run reads, of {len(dataset)} samples)"
    log(
        f"feature cache: {len(view)} of {len(files)} images cached{whole}, {computed} computed now "
        f"({time.perf_counter() - start:.1f}s; {cache.folder}); data.feature_cache=false turns it off"
    )
    return view, computed
