"""Train SVLM: `python train.py [group=option ...] [key=value ...]` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

import svlm  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from svlm.cli import run_train

    run_train(cfg)


if __name__ == "__main__":
    main()
