"""Shared fixtures: a tiny shapes data set, a tokenizer trained on it, Hydra
composition with every path under a temporary folder, and a tiny TrainConfig."""

import os

# Before torch (or anything importing it) loads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
# A fixed thread count (svlm/hardware.py's governor otherwise follows the
# host's load): runs repeat bit for bit whatever else the machine does.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402

from svlm.data.shapes import ShapesSpec, build_shapes  # noqa: E402
from svlm.tokenizer import texts_of, train_bpe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# The tiny data every test shares: 32 px pictures, 64/16/16 of them.
N_TRAIN, N_VAL, N_TEST, IMAGE_SIZE = 64, 16, 16, 32
DATA_OVERRIDES = [
    f"data.n_train={N_TRAIN}",
    f"data.n_val={N_VAL}",
    f"data.n_test={N_TEST}",
    f"data.image_size={IMAGE_SIZE}",
]
# A model a few hundred times smaller than model=tiny.
MODEL_OVERRIDES = [
    "model.lm.d_model=64",
    "model.lm.n_layers=2",
    "model.lm.max_seq_len=256",
    "model.vision.hidden_size=32",
    "model.vision.num_layers=1",
    "model.vision.num_heads=2",
    f"model.vision.image_size={IMAGE_SIZE}",
    "model.vision.patch_size=8",  # a 4x4 grid of patches
    "model.projector.factor=2",  # merged 2x2: 4 visual tokens
]
TOKENIZER_OVERRIDES = ["tokenizer.vocab_size=400"]


def stage_overrides(stage: str = "both", steps: int = 3, batch: int = 8) -> list[str]:
    """Small batches and a few steps, for stage=stage1, stage2 or both."""
    common = [f"stage.max_steps={steps}"]
    if stage in ("both", "llava", "llava_lora"):  # the options holding both stages
        return [
            f"stage={stage}",
            *common,
            f"stage.stage1.batch_size={batch}",
            f"stage.stage2.batch_size={batch}",
            "stage.stage1.val_batches=1",
            "stage.stage2.val_batches=1",
        ]
    return [f"stage={stage}", *common, f"stage.batch_size={batch}", "stage.val_batches=1"]


def tiny_train_overrides(stage: str = "both", steps: int = 3) -> list[str]:
    return [*DATA_OVERRIDES, *MODEL_OVERRIDES, *TOKENIZER_OVERRIDES, *stage_overrides(stage, steps), "hardware=cpu"]


def path_overrides(base: Path, cache: Path, run_dir: Path | None = None) -> list[str]:
    """The configs take paths.run_dir from Hydra's runtime, which compose() does not set."""
    return [
        f"paths.run_dir={run_dir or base / 'run'}",
        f"paths.outputs={base / 'outputs'}",
        f"paths.cache={cache}",
    ]


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()):
    """The config Hydra would build for `python <config_name>.py <overrides>`."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """paths.cache shared by every test: the data set and its tokenizer are built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def shapes_root(cache_dir) -> Path:
    """The tiny shapes data set, where data=shapes with DATA_OVERRIDES finds it."""
    spec = ShapesSpec(n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, image_size=IMAGE_SIZE)
    return build_shapes(spec, cache_dir / "data")


@pytest.fixture(scope="session")
def tokenizer(shapes_root):
    files = [shapes_root / "pretrain_train.jsonl", shapes_root / "sft_train.jsonl"]
    return train_bpe(texts_of(files), 400)


@pytest.fixture
def make_train_cfg(tmp_path, cache_dir, shapes_root):
    """make_train_cfg(*extra, stage="both", base=tmp_path, run_dir=None) -> TrainConfig."""
    from svlm.config import load_train_config

    def make(*extra: str, stage: str = "both", steps: int = 3, base: Path | None = None, run_dir: Path | None = None):
        base = base or tmp_path
        overrides = [*tiny_train_overrides(stage, steps), *path_overrides(base, cache_dir, run_dir), *extra]
        return load_train_config(compose("train", overrides))

    return make


@pytest.fixture
def tiny_cfg(make_train_cfg):
    """The tiny TrainConfig: stage=both, 3 steps a stage, batches of 8."""
    return make_train_cfg()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
