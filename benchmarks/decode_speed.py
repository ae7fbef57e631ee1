"""Single-stream decoding, this tree against an earlier revision, on one host in one run:

    python benchmarks/decode_speed.py --baseline 505b026        # bench.size=tiny, 1 thread, 256 tokens
    python benchmarks/decode_speed.py --baseline 505b026 --new-tokens 128
    python benchmarks/decode_speed.py --baseline 505b026 --size small --rounds 11

The baseline revision is checked out into a temporary git worktree. One
process per tree builds the model of `python -m svlm.bench bench.size=<size>`
(seed 0), one picture and an 8-token question, and warms up; then, round by
round, each process in turn (the order alternating) generates once: batch 1,
`--new-tokens` new tokens with the KV cache (no stop token; by default as many
as `python -m svlm.bench` generates, bench.gen_tokens), vision encoding and
prefill included, as `python -m svlm.bench` times it. The two runs of a
round are back to back, so they share the host's state: the ratio of a round
is what this noisy host can measure, and the median over rounds is the
figure. Prints each round, the median and quartiles of the ratio, and whether
both trees generated the same tokens (they must: the speed-up may not change
an answer).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from paired import REPO, Worker, rounds, spread, worktree

from svlm.bench import BenchConfig

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
print("@result ready", flush=True)
for _ in sys.stdin:  # one generation a line
    t0 = time.perf_counter()
    (ids,) = generate(model, prompt, pixels, stop_ids=-1, max_new_tokens=new_tokens)
    print("@result " + json.dumps({"tokens_per_s": len(ids) / (time.perf_counter() - t0), "ids": ids}), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="the revision to compare with (e.g. a commit id)")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--new-tokens", type=int, default=BenchConfig.gen_tokens)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--compile", action="store_true", help="this tree with hardware.compile (compiled blocks)")
    args = ap.parse_args()

    def show(r: int, got: dict) -> None:
        base, this = got["baseline"]["tokens_per_s"], got["this tree"]["tokens_per_s"]
        print(
            f"round {r}: baseline {base:.0f} tokens/s, this tree {this:.0f} tokens/s ({this / base:.2f}x)", flush=True
        )

    with tempfile.TemporaryDirectory() as tmp, worktree(args.baseline, Path(tmp) / "baseline") as base:
        workers = {}
        try:
            for name, tree in (("baseline", base), ("this tree", REPO)):
                compiled = args.compile and tree == REPO
                workers[name] = Worker(
                    tree, WORKER, [args.size, str(args.new_tokens), str(args.threads), str(int(compiled))]
                )
            rows = rounds(workers, args.rounds, show)
        finally:
            for w in workers.values():
                w.close()
    q1, median, q3 = spread([g["this tree"]["tokens_per_s"] / g["baseline"]["tokens_per_s"] for g in rows])
    same = all(g["this tree"]["ids"] == g["baseline"]["ids"] for g in rows)
    print(f"bench.size={args.size}, {args.threads} thread(s), batch 1, {args.new_tokens} new tokens"
          f"{', this tree compiled' if args.compile else ''}: "
          f"median {median:.2f}x the baseline ({args.baseline}), quartiles {q1:.2f}x-{q3:.2f}x over {len(rows)} rounds; "
          f"generated tokens identical: {same}")  # fmt: skip


if __name__ == "__main__":
    main()
