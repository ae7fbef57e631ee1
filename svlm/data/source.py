"""Where a data set's files are: the generated shapes set, or the user's files."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from svlm.config import ConfigError, DataConfig
from svlm.data.dataset import ChatDataset, LazyChatDataset, MixedDataset
from svlm.data.formats import BadSamples
from svlm.data.shapes import ShapesSpec, build_shapes


def data_root(cfg: DataConfig, cache: str) -> Path:
    """The folder holding the data files (generating the shapes set if needed)."""
    if cfg.kind == "shapes" and cfg.root is None:
        spec = ShapesSpec(
            n_train=cfg.n_train,
            n_val=cfg.n_val,
            n_test=cfg.n_test,
            image_size=cfg.image_size,
            max_shapes=cfg.max_shapes,
            languages=tuple(cfg.languages),
            seed=cfg.seed,
        )
        return build_shapes(spec, Path(cache) / "data")
    if cfg.root is None:
        raise ConfigError(f"data.root is required for data={cfg.name}: the folder holding your data files")
    root = Path(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"data.root={cfg.root!r}: no such folder")
    return root


def image_dir(cfg: DataConfig, root: Path, task: str) -> Path:
    return root / cfg.image_dir.replace("{task}", task)


def split_file(cfg: DataConfig, root: Path, split: str, task: str) -> Path | None:
    """The file of a split ('train', 'val', 'test') for a task, or None if the config has none."""
    name = {"train": cfg.train_file, "val": cfg.val_file, "test": cfg.test_file}[split]
    if name is None:
        return None
    path = root / name.replace("{task}", task)
    if not path.is_file():
        raise ConfigError(f"data.{split}_file: {path} does not exist")
    return path


def train_files(cfg: DataConfig, root: Path, task: str) -> list[Path]:
    """The files training reads: the sources, or train_file."""
    if cfg.sources:
        return [root / src.file.replace("{task}", task) for src in cfg.sources]
    return [split_file(cfg, root, "train", task)]


LAZY_BYTES = 100 * 2**20  # data.lazy=auto: files larger than this are read lazily


def open_dataset(
    cfg: DataConfig, path: Path, images: Path, encoder, processor, max_len: int, bad: BadSamples
) -> ChatDataset | LazyChatDataset:
    """One data file: encoded up front, or read lazily when large (data.lazy)."""
    lazy = cfg.lazy == "always" or (cfg.lazy == "auto" and path.stat().st_size > LAZY_BYTES)
    if lazy and path.suffix != ".jsonl":
        if cfg.lazy == "always":
            raise ConfigError(f"data.lazy=always reads .jsonl files one line at a time; {path} is not one")
        lazy = False  # a JSON list has to be parsed whole
    cls = LazyChatDataset if lazy else ChatDataset
    return cls(path if lazy else [path], images, encoder, processor, max_len, cfg.on_error, bad, cfg.max_images)


def load_splits(
    cfg: DataConfig, root: Path, task: str, encoder, processor, max_len: int, bad: BadSamples, seed: int
) -> tuple[Dataset, Dataset | None]:
    """(train, validation) data sets of a task. Training reads data.train_file, or
    the data.sources mixed by weight. Validation is data.val_file, or
    data.val_fraction of the training data held out, or None."""
    images = image_dir(cfg, root, task)
    if cfg.sources:
        parts, weights = [], []
        for src in cfg.sources:
            path = root / src.file.replace("{task}", task)
            if not path.is_file():
                raise ConfigError(f"data.sources: {path} does not exist")
            src_images = root / src.image_dir.replace("{task}", task) if src.image_dir else images
            parts.append(open_dataset(cfg, path, src_images, encoder, processor, max_len, bad))
            weights.append(src.weight)
    else:
        parts = [open_dataset(cfg, split_file(cfg, root, "train", task), images, encoder, processor, max_len, bad)]
        weights = [1.0]
    val_file = split_file(cfg, root, "val", task)
    val = None
    if val_file is not None:
        val = open_dataset(cfg, val_file, images, encoder, processor, max_len, bad)
    elif cfg.val_fraction > 0:
        if sum(len(p) for p in parts) < 2:
            raise ConfigError(f"data.val_fraction={cfg.val_fraction}: the training data has only one sample")
        pairs = [p.split(cfg.val_fraction, seed) for p in parts]
        parts = [rest for rest, _ in pairs]
        held = [out for _, out in pairs]
        val = held[0] if len(held) == 1 else MixedDataset(held, weights)
    train = parts[0] if len(parts) == 1 and not cfg.sources else MixedDataset(parts, weights)
    return train, val
