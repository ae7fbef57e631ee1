"""Single-stream decoding, this tree against an earlier revision, on one host in one run:

    python benchmarks/decode_speed.py --baseline 505b026        # bench.size=tiny, 1 thread
    python benchmarks/decode_speed.py --baseline 505b026 --size small --rounds 5

The baseline revision is checked out into a temporary git worktree. Each
round runs both trees, one after the other, in fresh processes: the model of
`python -m svlm.bench bench.size=<size>` (seed 0), one picture and an
8-token question, batch 1, `--new-tokens` new tokens with the KV cache
(no stop token), vision encoding and prefill included, as `python -m
svlm.bench` times it. Rounds alternate which tree goes first. Prints each
round's tokens/s, the median ratio, and whether both trees generated the same
tokens (they must: the speed-up may not change an answer).
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

MEASURE = r"""
import json, sys, time, torch
from svlm.bench import BenchConfig, build_bench_model, synthetic_batch
from svlm.inference.generation import generate
torch.set_num_threads(int(sys.argv[3]))
torch.manual_seed(0)
model, _ = build_bench_model(None, BenchConfig(size=sys.argv[1]))
model.eval()
try:  # as the inference commands prepare a model (where the tree has it)
    from svlm.inference.generation import prepare_for_decoding
    prepare_for_decoding(model, compile=sys.argv[4] == "1")
except ImportError:
    pass
batch = synthetic_batch(model, 1, 8, "cpu")
prompt, pixels = batch["input_ids"][:, : model.num_image_tokens + 8], batch["pixel_values"]
for n in (8, 16):  # warm-up (and, compiled, the compilations of the new shapes)
    generate(model, prompt, pixels, stop_ids=-1, max_new_tokens=n)
best, ids = 0.0, None
for _ in range(3):
    t0 = time.perf_counter()
    (ids,) = generate(model, prompt, pixels, stop_ids=-1, max_new_tokens=int(sys.argv[2]))
    best = max(best, len(ids) / (time.perf_counter() - t0))
print(json.dumps({"tokens_per_s": best, "ids": ids}))
"""


def measure(tree: Path, size: str, new_tokens: int, threads: int, compile: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    argv = [sys.executable, "-c", MEASURE, size, str(new_tokens), str(threads), str(int(compile))]
    out = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="the revision to compare with (e.g. a commit id)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="this tree with hardware.compile (compiled blocks)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.baseline], check=True,
                       capture_output=True)  # fmt: skip
        try:
            rows = []
            for r in range(args.rounds):
                order = [("baseline", base), ("this tree", REPO)]
                if r % 2:
                    order.reverse()
                got = {name: measure(tree, args.size, args.new_tokens, args.threads, args.compile and tree == REPO)
                       for name, tree in order}  # fmt: skip
                rows.append(got)
                print(f"round {r + 1}: baseline {got['baseline']['tokens_per_s']:.0f} tokens/s, this tree "
                      f"{got['this tree']['tokens_per_s']:.0f} tokens/s "
                      f"({got['this tree']['tokens_per_s'] / got['baseline']['tokens_per_s']:.2f}x)", flush=True)  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    ratio = statistics.median(g["this tree"]["tokens_per_s"] / g["baseline"]["tokens_per_s"] for g in rows)
    same = all(g["this tree"]["ids"] == g["baseline"]["ids"] for g in rows)
    print(f"bench.size={args.size}, {args.threads} thread(s), batch 1, {args.new_tokens} new tokens"
          f"{', this tree compiled' if args.compile else ''}: "
          f"median {ratio:.2f}x the baseline ({args.baseline}); generated tokens identical: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
