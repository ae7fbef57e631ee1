"""Score a model: `python eval.py [ckpt=<folder>] [data=...]` (see conf/eval.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

import svlm  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from svlm.cli import run_eval

    run_eval(cfg)


if __name__ == "__main__":
    from svlm.cli import quote_free_text

    sys.argv = quote_free_text(sys.argv)  # prompt=这张图里有什么？ etc. need Hydra quoting
    main()
