"""Score a model: `python eval.py [ckpt=<folder>] [data=...]` (settings: conf/eval.yaml)."""

import sys

from omegaconf import DictConfig

import svlm  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from svlm.cli import command


@command("eval")
def main(cfg: DictConfig) -> None:
    from svlm.config import load_eval_config
    from svlm.evaluation.evaluate import evaluate

    evaluate(load_eval_config(cfg))


if __name__ == "__main__":
    sys.exit(main())
