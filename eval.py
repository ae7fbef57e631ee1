"""Score a model: `python eval.py [ckpt=<folder>] [data=<option>] [data.<key>=<value> ...]`
(settings: conf/eval.yaml). Without data=<option> the model is scored on the data it
was trained on, with any data.<key>= set on top of it."""

import sys

from omegaconf import DictConfig

import svlm  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from svlm.cli import command


@command("eval", overlays={"data": "data_overlay"})
def main(cfg: DictConfig) -> None:
    from svlm.config import load_eval_config
    from svlm.evaluation.evaluate import evaluate

    evaluate(load_eval_config(cfg))


if __name__ == "__main__":
    sys.exit(main())
