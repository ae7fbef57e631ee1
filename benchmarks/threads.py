"""Which OpenMP wait policy and thread count to run torch's CPU kernels with:
training steps and batch-1 decoding under each candidate, on a quiet host and
on a busy one, in one run:

    python benchmarks/threads.py                      # every policy, 3 rounds
    python benchmarks/threads.py --rounds 5 --policies passive,spin1e4,active
    python benchmarks/threads.py --json threads.json  # the figures, for the docs

A policy is the environment libgomp (torch's OpenMP on Linux) reads when it
loads, so each measurement is a fresh process: it builds the model of
`python -m svlm.bench bench.size=tiny|small` (seed 0), times training steps
at 1 and 2 threads (the median of `--steps` after a warm-up, as
`python -m svlm.bench` times them) and batch-1 generation of `--new-tokens`
tokens with the KV cache at 1 and 2 threads, and prints one JSON line.

"busy" runs the same measurement beside a competing load this script starts
and stops itself: a busy loop pinned to CPU 0, ended after each measurement
(and bounded by a deadline if this script dies). A round measures every
policy quiet and busy, the order alternating between rounds, so the figures
of a round share the host's state; the table gives each cell's median over
rounds with its quartiles, and each policy's median ratio to the round's best.
The host state (the 2-thread matmul peak over the 1-thread one, measured at
the start of each round) is printed with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator

# Each candidate as libgomp reads it. libgomp's own default (OMP_WAIT_POLICY
# unset) spins 300,000 times before it sleeps; ACTIVE spins for ever; PASSIVE
# never spins. GOMP_SPINCOUNT bounds the spin under the default policy.
POLICIES = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin1e4": {"GOMP_SPINCOUNT": "10000"},
    "spin1e5": {"GOMP_SPINCOUNT": "100000"},
    "gomp": {"GOMP_SPINCOUNT": "300000"},  # libgomp's default, stated (svlm would otherwise pick its own)
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
}
MARK = "@result "

CHILD = r"""
import contextlib, json, statistics, sys, time
spec = json.loads(sys.argv[1])
with contextlib.redirect_stdout(sys.stderr):
    import torch
    from svlm.bench import BenchConfig, build_bench_model, matmul_peak, run, synthetic_batch
    from svlm.cli import compose
    from svlm.config import load_train_config
    from svlm.inference.generation import decoding_layout, generate
    out = {"policy_env": {k: v for k, v in __import__("os").environ.items() if "OMP" in k}}
    if spec["peak"]:
        for t in (1, 2):
            torch.set_num_threads(t)
            out[f"peak_{t}"] = matmul_peak(torch.device("cpu"), torch.float32)
    run_dir = __import__("tempfile").mkdtemp(prefix="svlm-threads-")
    cfg = load_train_config(compose("train", ["hardware=cpu", "hardware.threads=2", f"paths.run_dir={run_dir}"]))
    for size in spec["sizes"]:
        torch.manual_seed(0)
        bench = BenchConfig(size=size, threads=[1, 2], rounds=1, steps=spec["steps"], warmup=1, gen_tokens=0,
                            data=False)
        r = run(cfg, bench)
        for t in (1, 2):
            out[f"{size}/train/{t}"] = r["rounds"][str(t)]["samples_per_s"]
        torch.manual_seed(0)
        model, _ = build_bench_model(cfg, BenchConfig(size=size))
        decoding_layout(model.eval())
        batch = synthetic_batch(model, 1, 8, "cpu")
        prompt, pixels = batch["input_ids"][:, : model.num_image_tokens + 8], batch["pixel_values"]
        for t in (1, 2):
            torch.set_num_threads(t)
            generate(model, prompt, pixels, stop_ids=-1, max_new_tokens=8)  # warm-up
            best = 0.0
            for _ in range(2):
                t0 = time.perf_counter()
                (ids,) = generate(model, prompt, pixels, stop_ids=-1, max_new_tokens=spec["new_tokens"])
                best = max(best, len(ids) / (time.perf_counter() - t0))
            out[f"{size}/decode/{t}"] = best
            out[f"{size}/ids"] = ids[:16]
print("@result " + json.dumps(out), flush=True)
"""

BUSY = r"""
import os, sys, time
os.sched_setaffinity(0, {0})
end = time.time() + float(sys.argv[1])
while time.time() < end:
    pass
"""


@contextlib.contextmanager
def competing_load(on: bool, deadline_s: float) -> Iterator[None]:
    """A busy loop on CPU 0 for the duration (none when `on` is false)."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY, str(deadline_s)]) if on else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def measure(policy: str, spec: dict) -> dict:
    """One fresh process under `policy`'s environment: its JSON line."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(POLICIES[policy])
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"the {policy} measurement failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK) :])


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def table(rows: list[dict], policies: list[str], cells: list[str]) -> str:
    """Per load: each cell's median (quartiles) under each policy, and its median ratio to the round's best."""
    lines = []
    for load in ("quiet", "busy"):
        lines.append(f"\n{load} host: median over rounds (quartiles); x = median of the ratio to the round's best")
        lines.append(f"  {'policy':<9}" + "".join(f"{c:>26}" for c in cells))
        for p in policies:
            row = f"  {p:<9}"
            for c in cells:
                vals = [r[load][p][c] for r in rows]
                ratio = statistics.median(r[load][p][c] / max(r[load][q][c] for q in policies) for r in rows)
                q1, q2, q3 = quartiles(vals)
                row += f"{f'{q2:.1f} ({q1:.1f}-{q3:.1f}) {ratio:.2f}x':>26}"
            lines.append(row)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"a comma list of {', '.join(POLICIES)}")
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps a size and thread count")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", help="write every round's figures here")
    args = ap.parse_args()
    policies = args.policies.split(",")
    unknown = set(policies) - set(POLICIES)
    if unknown:
        sys.exit(f"--policies: unknown {', '.join(sorted(unknown))} (known: {', '.join(POLICIES)})")
    sizes = args.sizes.split(",")
    spec = {"sizes": sizes, "steps": args.steps, "new_tokens": args.new_tokens, "peak": False}
    cells = [f"{s}/{kind}/{t}" for s in sizes for kind in ("train", "decode") for t in (1, 2)]
    rows = []
    for r in range(args.rounds):
        host = measure("passive", {**spec, "sizes": [], "peak": True})
        state = host["peak_2"] / host["peak_1"]
        got: dict = {"host_peak_ratio": state, "quiet": {}, "busy": {}}
        order = policies[:: -1 if r % 2 else 1]
        loads = ("quiet", "busy") if r % 2 == 0 else ("busy", "quiet")
        for load in loads:
            for p in order:
                with competing_load(load == "busy", deadline_s=900):
                    got[load][p] = measure(p, spec)
                figures = "  ".join(f"{c} {got[load][p][c]:.1f}" for c in cells)
                print(f"round {r + 1} {load:<5} {p:<8} {figures}", flush=True)
        print(f"round {r + 1}: host 2-thread / 1-thread matmul peak {state:.2f}x", flush=True)
        rows.append(got)
    ids = {(load, p): tuple(map(tuple, (r[load][p][f"{s}/ids"] for s in sizes))) for r in rows
           for load in ("quiet", "busy") for p in policies}  # fmt: skip
    peaks = ", ".join(f"{r['host_peak_ratio']:.2f}" for r in rows)
    print(f"\nhost 2-thread / 1-thread matmul peak at each round's start: {peaks}")
    print("samples/s (train) and tokens/s (decode), batch 8 (tiny) or 4 (small) for training, 1 for decoding")
    print(table(rows, policies, cells))
    print(f"\ngenerated tokens the same under every policy: {len(set(ids.values())) == 1}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": rows}, f, indent=1)


if __name__ == "__main__":
    main()
