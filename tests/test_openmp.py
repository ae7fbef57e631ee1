"""The OpenMP wait policy: svlm's default unless the environment names one,
in force before torch loads, and named in a training run's log."""

import json
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
    code = "import json, os, sys; import svlm; print(json.dumps(['torch' in sys.modules, dict(os.environ)]))"
    out = subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    torch_loaded, env = json.loads(out)
    assert not torch_loaded and all(env.get(k) == v for k, v in DEFAULT.items())
