"""One home for every default (conf/): the option a group selects by default
holds every key of the group, equal to its dataclass's defaults; every other
option file states only what it changes from its base (no key restated with
the value the base already has); and what Hydra composes for every option of
every group, the experiment's stages included, is its base with those changes."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import CONF, compose
from omegaconf import OmegaConf

from svlm.config import (
    DataConfig,
    EvalConfig,
    HardwareConfig,
    InferConfig,
    LoggerConfig,
    ModelConfig,
    PathsConfig,
    StageConfig,
    TrainConfig,
)
from svlm.serve.config import ServeConfig
from svlm.typed import build

NOT_COMPOSED = ["paths.run_dir=unused"]  # Hydra's runtime folder: only a real run has one
DEFAULTS = {  # group -> (its default option, the dataclass that holds the same defaults)
    "model": ("tiny", ModelConfig),
    "data": ("shapes", DataConfig),
    "stage": ("stage1", StageConfig),
    "hardware": ("auto", HardwareConfig),
    "logger": ("none", LoggerConfig),
    "paths": ("default", PathsConfig),
}
# Experiment stages are merged on top of the stage group's option of the same stage.
STAGE_FILES = ("experiment/stage/svlm_{}.yaml", "recipe/stage/tiny_scenes_{}.yaml")  # each builds on stage/<stage>.yaml
CHOOSES = {"experiment": "experiment=svlm", "recipe": "data=scenes"}  # what selects a folder's stage files
IMPLICIT_BASE = {f.format(s): f"stage/{s}.yaml" for f in STAGE_FILES for s in ("stage1", "stage2")}


def own(path: Path) -> dict:
    """The keys a file states itself (its defaults list aside)."""
    data = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in data.items() if k != "defaults"}


def bases(path: Path, implicit: bool = True) -> list[Path]:
    """The files a config file builds on: an implicit base, then its defaults list
    (files of the same folder, merged at its own package: `name` or `name@_here_`)."""
    data = yaml.safe_load(path.read_text()) or {}
    entries = [e.removesuffix("@_here_") for e in data.get("defaults", []) if isinstance(e, str) and e != "_self_"]
    found = [path.parent / f"{e}.yaml" for e in entries if "@" not in e]  # name@child: a child, not a base
    base = IMPLICIT_BASE.get(name(path)) if implicit else None
    return ([CONF / base] if base else []) + found


def base_values(path: Path, implicit: bool = True) -> dict:
    """What a file's bases give before its own keys are merged on top."""
    merged = OmegaConf.create({})
    for i, base in enumerate(bases(path, implicit)):
        first_is_implicit = implicit and i == 0 and name(path) in IMPLICIT_BASE
        merged = OmegaConf.merge(merged, effective(base, implicit=first_is_implicit))
    return OmegaConf.to_container(merged)


def children(path: Path) -> dict:
    """What a file's `name@child` defaults put under `child` (stage/both.yaml's stage1 and stage2)."""
    data = yaml.safe_load(path.read_text()) or {}
    pairs = [e.split("@") for e in data.get("defaults", []) if isinstance(e, str) and "@" in e]
    return {child: effective(path.parent / f"{e}.yaml") for e, child in pairs if child != "_here_"}


def effective(path: Path, implicit: bool = True) -> dict:
    """A file's keys after its bases (what Hydra gives it, as this test reads the files)."""
    return OmegaConf.to_container(OmegaConf.merge(base_values(path, implicit), children(path), own(path)))


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c": {}} -> {"a.b": 1, "c": {}} (an empty map stays a key: a map of names, open to entries)"""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def known(key: str, base: dict) -> bool:
    """A key the base has, or an entry of a map of names the base leaves empty (data.test_sets)."""
    parts = key.split(".")
    return key in base or any(base.get(".".join(parts[:i])) == {} for i in range(1, len(parts)))


def option_files() -> list[Path]:
    files = [p for group in DEFAULTS for p in sorted((CONF / group).glob("*.yaml"))]
    return files + [CONF / f for f in IMPLICIT_BASE]


def name(path: Path) -> str:
    return str(path.relative_to(CONF))


def plain(cfg) -> dict:
    return dataclasses.asdict(cfg)


@pytest.mark.parametrize("group", DEFAULTS)
def test_default_options_are_the_dataclass_defaults(group, monkeypatch):
    monkeypatch.delenv("SVLM_CACHE", raising=False)
    option, cls = DEFAULTS[group]
    composed = compose("train", [f"{group}={option}", "stage=stage1", *NOT_COMPOSED])
    values = OmegaConf.to_container(composed[group], resolve=True)
    expected = plain(cls())
    if group == "paths":
        expected["run_dir"] = "unused"
    assert plain(build(cls, values, group)) == expected
    if group != "paths":
        assert set(values) == set(expected) - {"vocab_size"}, "the default option holds every key of the group"


def test_the_commands_defaults_are_the_dataclass_defaults(monkeypatch):
    monkeypatch.delenv("SVLM_CACHE", raising=False)
    for command, cls in (("train", TrainConfig), ("eval", EvalConfig), ("infer", InferConfig), ("serve", ServeConfig)):
        values = OmegaConf.to_container(compose(command, NOT_COMPOSED), resolve=True)
        built = plain(build(cls, values))
        expected = plain(cls(paths=PathsConfig(run_dir="unused")))
        if command == "train":  # stage=both is the train default; the dataclass's default is both too
            built.pop("tokenizer")["vocab_size"], expected.pop("tokenizer")["vocab_size"]
        assert built == expected, command
        assert "paths" not in own(CONF / f"{command}.yaml")  # conf/paths/default.yaml, for every command
        assert "run" not in own(CONF / f"{command}.yaml").get("hydra", {})  # conf/hydra/default.yaml


@pytest.mark.parametrize("path", option_files(), ids=name)
def test_options_state_only_what_they_change(path):
    if not bases(path):
        return  # a default option, or a model (each states its whole architecture)
    base = flat(base_values(path))
    restated = [k for k, v in flat(own(path)).items() if k in base and base[k] == v]
    assert not restated, f"{name(path)} restates {restated} with the values its base already has"
    added = [k for k in flat(own(path)) if not known(k, base)]
    assert not added, f"{name(path)} adds keys its base does not have: {added}"


@pytest.mark.parametrize("path", [p for p in option_files() if name(p) != "stage/both.yaml"], ids=name)
def test_each_option_composes_to_its_base_with_its_changes(path):
    group = path.parent.name
    if group == "stage" and path.parent.parent.name in CHOOSES:
        stage = path.stem.rsplit("_", 1)[1]
        composed = compose("train", [f"stage={stage}", CHOOSES[path.parent.parent.name]]).stage
    else:
        composed = compose("train", [f"{group}={path.stem}"])[group]
    assert OmegaConf.to_container(composed) == effective(path)


def test_both_stages_compose_from_their_files():
    for experiment, files in (([], ("stage/stage1", "stage/stage2")),
                              (["experiment=svlm"], ("experiment/stage/svlm_stage1", "experiment/stage/svlm_stage2")),
                              (["data=scenes"], ("recipe/stage/tiny_scenes_stage1", "recipe/stage/tiny_scenes_stage2"))):  # fmt: skip
        stage = OmegaConf.to_container(compose("train", ["stage=both", *experiment, *NOT_COMPOSED]).stage)
        for key, file in zip(("stage1", "stage2"), files):
            assert stage[key] == effective(CONF / f"{file}.yaml"), (experiment, key)


def test_the_tools_defaults_are_their_dataclass_defaults(monkeypatch):
    """Each tool's conf/<tool>.yaml equals its dataclass (the required keys given);
    the tools that take train.py's overrides compose train.yaml itself."""
    from svlm.bench import BenchConfig
    from svlm.data.shapes.__main__ import PictureConfig
    from svlm.export import ExportConfig
    from svlm.report.__main__ import ReportConfig
    from svlm.tokenizer.__main__ import TrainTokenizerConfig

    monkeypatch.delenv("SVLM_CACHE", raising=False)
    train = OmegaConf.to_container(compose("train", NOT_COMPOSED), resolve=True)
    for command in ("bench", "memory", "check"):
        values = OmegaConf.to_container(compose(command, NOT_COMPOSED), resolve=True)
        bench = values.pop("bench", None)
        assert values == train, command
        assert own(CONF / f"{command}.yaml").keys() <= {"bench"}, f"{command}.yaml restates train.yaml"
    bench = OmegaConf.to_container(compose("bench", NOT_COMPOSED).bench)
    assert plain(build(BenchConfig, bench, "bench")) == plain(BenchConfig())
    required = {"export": ["out=x"], "report": ["sweep=x"], "tokenizer": ["files=[x]", "out=x"], "shapes": ["out=x"]}
    for command, cls in (("export", ExportConfig), ("report", ReportConfig), ("tokenizer", TrainTokenizerConfig),
                         ("shapes", PictureConfig)):  # fmt: skip
        given = [*required[command], *NOT_COMPOSED]
        values = OmegaConf.to_container(compose(command, given), resolve=True)
        given_values = {k: yaml.safe_load(v) for k, v in (o.split("=") for o in required[command])}
        expected = plain(cls(**given_values, paths=PathsConfig(run_dir="unused")))
        assert plain(build(cls, values)) == expected, command
        assert "paths" not in own(CONF / f"{command}.yaml")
