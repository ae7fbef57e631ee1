"""What the entry scripts call: typed config in, one call into svlm, clear
one-line errors out (no traceback for a wrong setting or a missing file)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from omegaconf import DictConfig

from svlm.config import ConfigError, load_eval_config, load_infer_config, load_train_config
from svlm.data.formats import DataError

FREE_TEXT_KEYS = ("prompt", "image", "ckpt")


def quote_free_text(args: list[str], keys: tuple[str, ...] = FREE_TEXT_KEYS) -> list[str]:
    """Quote free-text overrides for Hydra: `prompt=这张图里有什么？` (the shell has
    already removed the user's quotes) becomes `prompt='这张图里有什么？'`, which
    Hydra's override grammar accepts whatever the characters."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in keys and not (value[:1] in "'\"" and value[:1] == value[-1:] and len(value) > 1):
            escaped = value.replace("'", "\\'")
            arg = f"{key}='{escaped}'"

        out.append(arg)
    return out


def _guard(fn: Callable[[], object]) -> None:
    try:
        fn()
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def command(doc: str, body: Callable[[list[str]], int], argv: list[str] | None = None, errors: tuple = ()) -> int:
    """The main of a `python -m svlm.<tool>`: -h/--help prints the tool's docstring;
    `body(args)` gives the exit status; a wrong setting or a missing file (or one of
    `errors`) is one line on stderr and status 2."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(doc)
        return 0
    try:
        return body(args)
    except (ConfigError, DataError, FileNotFoundError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def compose_train(overrides: list[str]):
    """train.py's TrainConfig (conf/train.yaml) with these overrides, composed
    outside a Hydra run (the tools that take train.py's overrides)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        try:
            cfg = compose("train", overrides)
        except HydraException as e:  # an unknown key or option, a malformed override: one line, no traceback
            message = " ".join(str(e).split()).split(" Config search path")[0]
            raise ConfigError(message) from None
        return load_train_config(cfg)


def run_train(cfg: DictConfig) -> None:
    from svlm.training.loop import train
    from svlm.training.signals import TrainingStopped

    try:
        _guard(lambda: train(load_train_config(cfg)))
    except TrainingStopped as e:
        print(str(e), file=sys.stderr if e.exit_code else sys.stdout)
        sys.exit(e.exit_code)


def run_eval(cfg: DictConfig) -> None:
    from svlm.evaluation.evaluate import evaluate

    _guard(lambda: evaluate(load_eval_config(cfg)))


def run_infer(cfg: DictConfig) -> None:
    from svlm.inference.ask import ask

    _guard(lambda: ask(load_infer_config(cfg)))
