"""The OpenMP wait policy: svlm's default unless the environment names one,
in force before torch loads, and named in a training run's log."""

import subprocess
import sys

from svlm.openmp import DEFAULT, apply_wait_policy


def test_default_only_when_the_environment_is_silent():
    env: dict[str, str] = {}
    assert apply_wait_policy(env).endswith("(svlm's default)") and env == DEFAULT
    for key, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "0")):
        env = {key: value}
        assert apply_wait_policy(env) == f"{key}={value} (from the environment)" and env == {key: value}


def test_set_before_torch_loads():
    code = (
        "import os, sys; import svlm; print('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'), svlm.WAIT_POLICY)"
    )
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == ["False", DEFAULT["GOMP_SPINCOUNT"]]
