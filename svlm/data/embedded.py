"""The embedded data sets, generated here: `shapes` (svlm/data/shapes/) and
`scenes` (svlm/data/scenes/). data.kind names the generator; the data keys of
the same names as its spec's fields say what it makes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from svlm.data.scenes import ScenesSpec, build_scenes
from svlm.data.shapes import ShapesSpec, build_shapes

GENERATORS = {"shapes": (ShapesSpec, build_shapes), "scenes": (ScenesSpec, build_scenes)}


def embedded_spec(kind: str, data: dict) -> ShapesSpec | ScenesSpec:
    """The spec of generator `kind` from the data settings `data` (its fields' keys); checked."""
    spec = GENERATORS[kind][0]
    return spec(**{f.name: data[f.name] for f in dataclasses.fields(spec)})


def build_embedded(kind: str, data: dict, cache_dir: str | os.PathLike) -> Path:
    """The folder of the generated set (written once under cache_dir)."""
    return GENERATORS[kind][1](embedded_spec(kind, data), cache_dir)
