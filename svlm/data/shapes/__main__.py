"""`python -m svlm.data.shapes <picture.png> [seed=N] [max_shapes=K] [size=S]`: draw
one picture of the shapes data and print its English and Chinese captions (handy
for trying infer.py). Settings: conf/shapes.yaml; the data set: svlm/data/shapes/__init__.py."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

from omegaconf import DictConfig

from svlm.cli import command
from svlm.config import PathsConfig
from svlm.errors import ConfigError
from svlm.typed import build, to_plain


@dataclass
class PictureConfig:
    out: str | None = None  # the PNG file to write
    seed: int | None = None  # None: a random picture
    max_shapes: int = 1
    size: int = 64  # picture size in pixels
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if self.out is None:
            raise ConfigError("out=<picture.png> is required: the file to write")
        if not 1 <= self.max_shapes <= 4:
            raise ConfigError(f"max_shapes={self.max_shapes}: 1 to 4 (one shape a quadrant)")


@command("shapes", free_text=("out",), positional="out")
def main(cfg: DictConfig) -> None:
    from svlm.data.shapes import caption, draw, sample_shapes

    settings = build(PictureConfig, to_plain(cfg))
    rng = random.Random(settings.seed)
    shapes = sample_shapes(settings.max_shapes, rng)
    image, _ = draw(shapes, settings.size, rng)
    image.save(settings.out)
    print(f"{settings.out}: {caption(shapes, 'en')} / {caption(shapes, 'zh')}")


if __name__ == "__main__":
    sys.exit(main())
