"""The command layer: how every command starts and ends.

Each command (train.py, eval.py, infer.py, and each `python -m svlm.<tool>`) is
a Hydra main over its own config in conf/ (conf/<name>.yaml, run folder
<paths.outputs>/<name>/<time>), made by `@command("<name>")` over its task function:

- `-h`/`--help` prints the command's docstring, then its config groups and
  every setting with its default (conf/hydra/default.yaml has the layout);
- a wrong override, a wrong setting or a missing file is one line on stderr,
  `error: ...`, and exit status 2; set HYDRA_FULL_ERROR=1 for the traceback;
- free-text values (`prompt=这张图里有什么？`) reach Hydra quoted;
- a command with an overlay (eval.py: data -> data_overlay) takes `data.<key>=<value>`
  without `data=<option>`: moved to `+data_overlay.<key>=<value>`, which the
  task sets on top of what it starts from (eval.py: the model's own data).

No library module imports this one (tests/test_layout.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from svlm.data.formats import DataError
from svlm.errors import ConfigError
from svlm.training.signals import TrainingStopped

CONF = str(Path(__file__).resolve().parents[1] / "conf")
USER_ERRORS = (ConfigError, DataError, FileNotFoundError)
FREE_TEXT_KEYS = ("prompt", "image", "ckpt")
FULL_ERROR = "HYDRA_FULL_ERROR"


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


def move_overlays(args: list[str], overlays: dict[str, str]) -> list[str]:
    """`group.key=value` becomes `+<overlay>.key=value` for each group of `overlays`
    that no argument chooses an option of (`group=...`)."""
    out = list(args)
    for group, overlay in overlays.items():
        chosen = any(a.split("=", 1)[0].lstrip("+~") == group for a in args if "=" in a)
        if chosen:
            continue
        prefix = f"{group}."
        out = [f"+{overlay}.{a[len(prefix) :]}" if a.startswith(prefix) and "=" in a else a for a in out]
    return out


def one_line(error: BaseException) -> str:
    """Hydra's and OmegaConf's messages span lines (and list the search path): one line."""
    message = " ".join(str(error).split()).split(" Config search path")[0]
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause).split("\n")[0] not in message:
        message += f" ({str(cause).splitlines()[0]})"
    return message


def command(
    config_name: str,
    free_text: tuple[str, ...] = FREE_TEXT_KEYS,
    positional: str | None = None,
    doc: str | None = None,
    overlays: dict[str, str] | None = None,
) -> Callable[[Callable[[DictConfig], None]], Callable[..., int]]:
    """Make `task(cfg)` a command over conf/<config_name>.yaml: a Hydra main that
    takes `argv` (default: the command line) and gives the exit status; the task
    ends with `sys.exit(status)` for a verdict other than success.
    `positional`: the key a lone bare argument sets (`python -m svlm.report
    <folder>` is `sweep=<folder>`). `--help` starts with `doc`, by default the
    task's module docstring. `overlays`: see move_overlays."""

    def wrap(task: Callable[[DictConfig], None]) -> Callable[..., int]:
        usage = doc or task.__globals__.get("__doc__") or ""
        traceback_asked = False  # the user set HYDRA_FULL_ERROR=1

        def job(cfg: DictConfig) -> None:  # inside Hydra: a user's error ends the run (a sweep too) here
            try:
                task(cfg)
            except TrainingStopped as e:
                print(str(e), file=sys.stderr if e.exit_code else sys.stdout)
                raise SystemExit(e.exit_code) from None
            except USER_ERRORS as e:
                if traceback_asked:
                    raise
                print(f"error: {e}", file=sys.stderr)
                raise SystemExit(2) from None

        hydra_main = hydra.main(config_path=CONF, config_name=config_name, version_base="1.3")(job)

        def main(argv: list[str] | None = None) -> int:
            nonlocal traceback_asked
            traceback_asked = os.environ.get(FULL_ERROR) == "1"
            args = list(sys.argv[1:] if argv is None else argv)
            bare = [i for i, a in enumerate(args) if "=" not in a and not a.startswith("-")]
            if positional and len(bare) == 1:
                args[bare[0]] = f"{positional}={args[bare[0]]}"
            if any(a in ("-h", "--help") for a in args):
                print(usage.strip() + "\n")
            try:
                with hydra_session(move_overlays(quote_free_text(args, free_text), overlays or {})):
                    hydra_main()
                return 0
            except SystemExit as e:  # --help, Hydra's flag errors, the job's own status
                return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except (HydraException, OmegaConfBaseException) as e:  # composing: a bad override or key
                if traceback_asked:
                    raise
                print(f"error: {one_line(e)}", file=sys.stderr)
                return 2

        main.__doc__ = usage
        return main

    return wrap


@contextmanager
def hydra_session(args: list[str]) -> Iterator[None]:
    """Hydra reads sys.argv (a test calls `main([...])` in-process). On a failed
    composition it prints a hint and exits 1; with its full-error flag it raises
    instead, so `command` can make the message one line."""
    saved_argv, saved_flag = sys.argv, os.environ.get(FULL_ERROR)
    sys.argv = [saved_argv[0], *args]
    os.environ[FULL_ERROR] = "1"
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_flag is None:
            os.environ.pop(FULL_ERROR)
        else:
            os.environ[FULL_ERROR] = saved_flag
        GlobalHydra.instance().clear()


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """A command's config with these overrides, composed outside a Hydra run (the
    benchmark scripts); `paths.run_dir` must be among them (no Hydra run folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        try:
            return hydra_compose(config_name, overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(one_line(e)) from None
