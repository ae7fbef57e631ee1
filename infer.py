"""Ask a model: `python infer.py image=photo.jpg prompt="..."` (settings: conf/infer.yaml)."""

import sys

from omegaconf import DictConfig

import svlm  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from svlm.cli import command


@command("infer")
def main(cfg: DictConfig) -> None:
    from svlm.config import load_infer_config
    from svlm.inference.ask import ask

    ask(load_infer_config(cfg))


if __name__ == "__main__":
    sys.exit(main())
