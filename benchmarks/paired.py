"""Two trees measured back to back, round by round, on one host: the helper of
benchmarks/decode_speed.py and benchmarks/eval_speed.py.

This host's speed drifts by 2x within minutes, so a figure of one tree alone
means little. Each tree gets one long-lived worker process (its code on
PYTHONPATH); a round asks each worker in turn for one measurement (the order
alternating), and the two answers of a round share the host's state. The
ratio of each round is what can be compared; the median over rounds is the
figure, the quartiles its spread.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def worktree(revision: str, folder: Path) -> Iterator[Path]:
    """`revision` checked out into a temporary git worktree at `folder`."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), revision], check=True,
                   capture_output=True)  # fmt: skip
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], check=False)


MARK = "@result "  # how a worker's answer starts; its other output passes through to stderr


class Worker:
    """A process running `code` with `tree` on its path: it prints MARK
    "ready", then, for each line it reads, MARK and one JSON line."""

    def __init__(self, tree: Path, code: str, args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
        self.tree = tree
        self.proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=tree, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        self._read()  # "ready"

    def _read(self) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the worker of {self.tree} exited with {self.proc.wait()}")
            if line.startswith(MARK):
                return line[len(MARK) :]
            sys.stderr.write(line)

    def measure(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def once(script: str, spec: dict, env: dict | None = None, cwd: Path = REPO, what: str = "a measurement") -> dict:
    """A fresh `python -c script <spec as JSON>`: the JSON of its last MARK line."""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(spec)], env=env, cwd=cwd, capture_output=True,
                          text=True)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK) :])


def rounds(workers: dict[str, Worker], n: int, show) -> list[dict[str, dict]]:
    """n rounds of one measurement a worker, the order alternating; `show`
    prints a round as it ends."""
    rows = []
    for r in range(n):
        names = list(workers)[:: -1 if r % 2 else 1]
        got = {name: workers[name].measure() for name in names}
        rows.append(got)
        show(r + 1, got)
    return rows


def spread(ratios: list[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile."""
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return q1, median, q3
