"""Single-stream decoding, this tree against an earlier revision, on one host in one run:

    python benchmarks/decode_speed.py --baseline 505b026        # bench.size=tiny, 1 thread
    python benchmarks/decode_speed.py --baseline 505b026 --size small --rounds 11

The baseline revision is checked out into a temporary git worktree. One
process per tree builds the model of `python -m svlm.bench bench.size=<size>`
(seed 0), one picture and an 8-token question, and warms up; then, round by
round, each process in turn (the order alternating) generates once: batch 1,
`--new-tokens` new tokens with the KV cache (no stop token), vision encoding
and prefill included, as `python -m svlm.bench` times it. The two runs of a
round are back to back, so they share the host's state: the ratio of a round
is what this noisy host can measure, and the median over rounds is the
figure. Prints each round, the median and quartiles of the ratio, and whether
both trees generated the same tokens (they must: the speed-up may not change
an answer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, torch
from svlm.bench import BenchConfig, build_bench_model, synthetic_batch
from svlm.inference.generation import generate
size, new_tokens, threads, compile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
torch.set_num_threads(threads)
torch.manual_seed(0)
model, _ = build_bench_model(None, BenchConfig(size=size))
model.eval()
try:  # as the inference commands prepare a model (where the tree has it)
    from svlm.inference.generation import prepare_for_decoding
    prepare_for_decoding(model, compile=compile)
except ImportError:
    pass
batch = synthetic_batch(model, 1, 8, "cpu")
prompt, pixels = batch["input_ids"][:, : model.num_image_tokens + 8], batch["pixel_values"]
for n in (8, 16, new_tokens):  # warm-up (and, compiled, the compilations of the new shapes)
    generate(model, prompt, pixels, stop_ids=-1, max_new_tokens=n)
print("ready", flush=True)
for _ in sys.stdin:  # one generation a line
    t0 = time.perf_counter()
    (ids,) = generate(model, prompt, pixels, stop_ids=-1, max_new_tokens=new_tokens)
    print(json.dumps({"tokens_per_s": len(ids) / (time.perf_counter() - t0), "ids": ids}), flush=True)
"""


class Worker:
    """A process holding one tree's model, generating on request."""

    def __init__(self, tree: Path, size: str, new_tokens: int, threads: int, compile: bool) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
        argv = [sys.executable, "-c", WORKER, size, str(new_tokens), str(threads), str(int(compile))]
        self.tree = tree
        self.proc = subprocess.Popen(argv, env=env, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # "ready"

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker of {self.tree} exited with {self.proc.wait()}")
        return line

    def measure(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="the revision to compare with (e.g. a commit id)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--compile", action="store_true", help="this tree with hardware.compile (compiled blocks)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.baseline], check=True,
                       capture_output=True)  # fmt: skip
        workers = {}
        try:
            for name, tree in (("baseline", base), ("this tree", REPO)):
                workers[name] = Worker(tree, args.size, args.new_tokens, args.threads, args.compile and tree == REPO)
            rows = []
            for r in range(args.rounds):
                order = ["baseline", "this tree"][:: 1 if r % 2 else -1]
                got = {name: workers[name].measure() for name in order}
                rows.append(got)
                print(f"round {r + 1}: baseline {got['baseline']['tokens_per_s']:.0f} tokens/s, this tree "
                      f"{got['this tree']['tokens_per_s']:.0f} tokens/s "
                      f"({got['this tree']['tokens_per_s'] / got['baseline']['tokens_per_s']:.2f}x)", flush=True)  # fmt: skip
        finally:
            for w in workers.values():
                w.close()
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    ratios = [g["this tree"]["tokens_per_s"] / g["baseline"]["tokens_per_s"] for g in rows]
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    same = all(g["this tree"]["ids"] == g["baseline"]["ids"] for g in rows)
    print(f"bench.size={args.size}, {args.threads} thread(s), batch 1, {args.new_tokens} new tokens"
          f"{', this tree compiled' if args.compile else ''}: "
          f"median {median:.2f}x the baseline ({args.baseline}), quartiles {q1:.2f}x-{q3:.2f}x over {len(ratios)} rounds; "
          f"generated tokens identical: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
