"""One entry-point style (svlm/cli.py): every command is a Hydra main over its own
conf/<name>.yaml; `--help` prints its usage, then its settings with their
defaults; a wrong override is one line, `error: ...`, and exit status 2."""

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO

# (how it is started, the module whose main it is, its config, a word of its usage)
COMMANDS = [
    ("train.py", "train", "train", "Train SVLM"),
    ("eval.py", "eval", "eval", "Score a model"),
    ("infer.py", "infer", "infer", "Ask a model"),
    ("python -m svlm.serve", "svlm.serve.__main__", "serve", "OpenAI-compatible"),
    ("python -m svlm.bench", "svlm.bench.__main__", "bench", "Benchmark"),
    ("python -m svlm.memory", "svlm.memory.__main__", "memory", "memory"),
    ("python -m svlm.export", "svlm.export.__main__", "export", "Export a model"),
    ("python -m svlm.data.check", "svlm.data.check.__main__", "check", "Check a data set"),
    ("python -m svlm.report", "svlm.report.__main__", "report", "sweep"),
    ("python -m svlm.tokenizer", "svlm.tokenizer.__main__", "tokenizer", "byte-level BPE"),
    ("python -m svlm.data.shapes", "svlm.data.shapes.__main__", "shapes", "captions"),
]
IDS = [c[0] for c in COMMANDS]


def command_main(module: str):
    if module.startswith("svlm."):
        return importlib.import_module(module).main
    spec = importlib.util.spec_from_file_location(f"entry_{module}", REPO / f"{module}.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)  # its `if __name__ == "__main__"` does not run
    return entry.main


@pytest.mark.parametrize("started, module, config, usage", COMMANDS, ids=IDS)
def test_help_is_usage_then_settings(started, module, config, usage, capsys):
    assert command_main(module)(["--help"]) == 0
    out = capsys.readouterr().out
    assert usage in out.split("==")[0], "the usage comes first"
    assert "== Settings and their defaults" in out and "outputs: outputs" in out
    assert ("== Config groups" in out) == (config in ("train", "eval", "infer", "serve", "bench", "memory", "check"))


@pytest.mark.parametrize("started, module, config, usage", COMMANDS, ids=IDS)
def test_a_bad_override_is_one_line_and_status_2(started, module, config, usage, capsys):
    main = command_main(module)
    for override, named in (("nosuchkey=1", "nosuchkey"), ("paths.nosuch=1", "paths.nosuch"), ("=", "=")):
        assert main([override]) == 2, override
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and err.count("\n") == 1, err


def test_a_script_fails_the_same_way_as_a_process(tmp_path):
    for args in (["train.py", "stage=nosuch"], ["-m", "svlm.export", "nosuchkey=1"]):
        r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "HYDRA_FULL_ERROR" not in r.stderr and "Traceback" not in r.stderr


def test_a_lone_bare_argument_is_the_positional_key(tmp_path, capsys):
    from svlm.data.shapes.__main__ import main

    picture = tmp_path / "picture.png"
    assert main([str(picture), "seed=3", f"paths.outputs={tmp_path / 'outputs'}"]) == 0
    assert picture.is_file() and str(picture) in capsys.readouterr().out
    (run,) = (tmp_path / "outputs" / "shapes").iterdir()  # the command's own Hydra run folder
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "shapes.log").is_file()
