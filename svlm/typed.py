"""Typed settings from plain values: `build(cls, values)` makes a dataclass from
a dict (what Hydra composed), checking every value against the dataclass's type
hints and naming the key at fault in a ConfigError; unknown keys are refused."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from svlm.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the type hint `tp` and build dataclasses; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: a value is required, got null")
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            if dataclasses.is_dataclass(opt) and isinstance(value, dict):
                # Pick the dataclass whose fields fit the keys (e.g. stage vs both stages).
                names = {f.name for f in dataclasses.fields(opt)}
                if not set(value) <= names:
                    errors.append(opt)
                    continue
            try:
                return convert(opt, value, key)
            except ConfigError as e:
                errors.append(e)
        real = [e for e in errors if isinstance(e, ConfigError)]
        if real:
            raise real[0]
        shapes = [o for o in errors if dataclasses.is_dataclass(o)]
        if shapes:  # no dataclass has all the keys: report the unknown key of the closest one
            closest = min(shapes, key=lambda o: len(set(value) - {f.name for f in dataclasses.fields(o)}))
            return build(closest, value, key)
        raise ConfigError(f"{key}: {value!r} fits none of {', '.join(_type_name(o) for o in options)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return [convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is Any:
        return value
    if value is None:
        raise ConfigError(f"{key}: a value is required, got null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def build(cls: type, values: dict, key: str = "") -> Any:
    """A dataclass of type `cls` from a plain dict; unknown keys and wrong types fail with the key's name."""
    if not isinstance(values, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping of settings, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - fields)
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]} (known keys of {key or 'the config'}: {', '.join(sorted(fields))})"
        )
    kwargs = {name: convert(hints[name], values[name], f"{key}.{name}" if key else name) for name in values}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a __post_init__ check
        msg = str(e)
        raise ConfigError(msg if key.split(".")[0] in msg or not key else f"{key}: {msg}") from e


def to_plain(cfg: Any) -> dict:
    """A DictConfig (resolved) or a dict -> a plain dict, without Hydra's own node."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in cfg.items() if k != "hydra"}
