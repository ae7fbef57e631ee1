"""How torch's CPU threads wait between parallel regions: the one home of
SVLM's OpenMP policy. It lives apart from svlm/hardware.py because libgomp
reads it from the environment once, when torch loads, so it must be set
before the first `import torch` (svlm/__init__.py applies it).

A waiting thread either spins (fast to wake: the next kernel starts at once)
or sleeps (frees its core for another process). libgomp's ACTIVE spins for
ever: a decode step of small kernels runs fastest, but a second busy process
on the same cores made training up to 12x slower. PASSIVE never spins: safe,
and 20% of training and 2.5x of decoding lost on a quiet 2-core host.
benchmarks/threads.py measures them: quiet, a bounded spin (GOMP_SPINCOUNT
100,000) is fastest; with one of two cores taken, every spinning policy at
2 threads falls far below 1 thread, PASSIVE least. A single thread never
waits, so the spin is safe once the thread count leaves the taken cores to
their owner: svlm/hardware.py's governor does that, and DEFAULT spins.

The environment overrides it: set OMP_WAIT_POLICY (ACTIVE or PASSIVE) or
GOMP_SPINCOUNT yourself and SVLM leaves both as they are.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULT = {"GOMP_SPINCOUNT": "100000"}
KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def apply_wait_policy(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set DEFAULT unless the environment names a policy of its own; returns
    the policy in force, for the run's log line."""
    source = "from the environment"
    if not any(k in environ for k in KEYS):
        environ.update(DEFAULT)
        source = "svlm's default"
    stated = " ".join(f"{k}={environ[k]}" for k in KEYS if k in environ)
    return f"{stated} ({source})"
