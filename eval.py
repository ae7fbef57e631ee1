"""Score a model: `python eval.py [ckpt=<folder>] [data=...]` (see conf/eval.yaml)."""

import hydra
from omegaconf import DictConfig

import svlm  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from svlm.cli import run_eval

    run_eval(cfg)


if __name__ == "__main__":
    main()
