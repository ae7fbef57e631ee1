"""Train SVLM: `python train.py [group=option ...] [key=value ...]`, a sweep with
`python train.py -m stage.lr=1e-4,3e-4` (settings: conf/train.yaml)."""

import sys

from omegaconf import DictConfig

import svlm  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from svlm.cli import command


@command("train")
def main(cfg: DictConfig) -> None:
    from svlm.config import load_train_config
    from svlm.training.loop import train

    train(load_train_config(cfg))


if __name__ == "__main__":
    sys.exit(main())
