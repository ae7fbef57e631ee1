"""Where a data set's files are: the generated shapes set, or the user's files."""

from __future__ import annotations

from pathlib import Path

from svlm.config import ConfigError, DataConfig
from svlm.data.dataset import ChatDataset
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


def load_splits(
    cfg: DataConfig, root: Path, task: str, encoder, processor, max_len: int, bad: BadSamples, seed: int
) -> tuple[ChatDataset, ChatDataset | None]:
    """(train, validation) data sets of a task. Validation is data.val_file, or
    data.val_fraction of the training file held out, or None."""
    images = image_dir(cfg, root, task)
    train = ChatDataset([split_file(cfg, root, "train", task)], images, encoder, processor, max_len, cfg.on_error, bad)
    val_file = split_file(cfg, root, "val", task)
    if val_file is not None:
        return train, ChatDataset([val_file], images, encoder, processor, max_len, cfg.on_error, bad)
    if cfg.val_fraction > 0:
        if len(train) < 2:
            raise ConfigError(f"data.val_fraction={cfg.val_fraction}: the training file has only {len(train)} sample")
        return train.split(cfg.val_fraction, seed)
    return train, None
