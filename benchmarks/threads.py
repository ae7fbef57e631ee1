"""Which OpenMP wait policy and thread count to run torch's CPU kernels with:
training steps and batch-1 decoding under each candidate, on a quiet host and
on a busy one, in one run:

    python benchmarks/threads.py                      # every policy, 3 rounds
    python benchmarks/threads.py --rounds 5 --policies svlm,passive,spin1e4,active
    python benchmarks/threads.py --json threads.json  # the figures, for the docs

A row is a wait policy, the environment libgomp (torch's OpenMP on Linux)
reads when it loads, at 2 threads; "1 thread" is one thread (no thread
waits); "svlm" is what SVLM does by default: svlm/openmp.py's policy and
svlm/hardware.py's thread governor (the free cores, measured at the start
and followed between decode steps). Each measurement is a fresh process: it
builds the model of `python -m svlm.bench bench.size=tiny|small` (seed 0),
times training steps (the median of `--steps` after a warm-up, as
`python -m svlm.bench` times them) and batch-1 generation of `--new-tokens`
tokens with the KV cache, and prints one JSON line.

"busy" runs the same measurement beside a competing load this script starts
and stops itself: a busy loop pinned to CPU 0, ended after each measurement
(and bounded by a deadline if this script dies). "late" (the svlm row only)
starts that load after the governor has settled on a quiet host: the figures
once it has followed (training after 3 warm-up steps, decoding after 2.5 s).
A round measures every policy quiet and busy, the order alternating between rounds, so the figures
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

from paired import once

# Each candidate as libgomp reads it, and its thread count. libgomp's own
# default (OMP_WAIT_POLICY unset) spins 300,000 times before it sleeps; ACTIVE
# spins for ever; PASSIVE never spins. GOMP_SPINCOUNT bounds the spin under
# the default policy. "svlm" states nothing: svlm/openmp.py picks.
POLICIES = {
    "svlm": {},
    "1 thread": {"OMP_WAIT_POLICY": "PASSIVE"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin1e4": {"GOMP_SPINCOUNT": "10000"},
    "spin1e5": {"GOMP_SPINCOUNT": "100000"},
    "gomp": {"GOMP_SPINCOUNT": "300000"},  # libgomp's default, stated (svlm would otherwise pick its own)
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
}
ROW_THREADS = {"svlm": "auto", "1 thread": 1}  # every other row: 2

CHILD = r"""
import contextlib, json, os, subprocess, sys, time
spec = json.loads(sys.argv[1])
with contextlib.redirect_stdout(sys.stderr):
    import svlm  # before torch: its wait policy (svlm/openmp.py) must be in force when libgomp loads
    import torch
    from svlm.bench import BenchConfig, build_bench_model, matmul_peak, run, synthetic_batch
    from svlm.cli import compose
    from svlm.config import load_train_config
    from svlm.hardware import THREADS
    from svlm.inference.generation import decoding_layout, generate
    out = {"policy_env": {k: v for k, v in os.environ.items() if "OMP" in k}}
    if spec["peak"]:
        for t in (1, 2):
            torch.set_num_threads(t)
            out[f"peak_{t}"] = matmul_peak(torch.device("cpu"), torch.float32)
    fixed = [] if spec["threads"] == "auto" else [f"hardware.threads={spec['threads']}"]
    run_dir = __import__("tempfile").mkdtemp(prefix="svlm-threads-")
    cfg = load_train_config(compose("train", ["hardware=cpu", f"paths.run_dir={run_dir}", *fixed]))
    THREADS.start(cfg.hardware.threads)  # on a quiet host when the load comes late
    late = subprocess.Popen([sys.executable, "-c", spec["busy"], "900"]) if spec["late"] else None
    for size in spec["sizes"]:
        torch.manual_seed(0)
        bench = BenchConfig(size=size, threads=[0], rounds=1, steps=spec["steps"], warmup=3, gen_tokens=0, data=False)
        (trained,) = run(cfg, bench)["rounds"].values()
        out[f"{size}/train"], out[f"{size}/train_threads"] = trained["samples_per_s"], trained["threads"]
        torch.manual_seed(0)
        model, _ = build_bench_model(cfg, BenchConfig(size=size))
        decoding_layout(model.eval())
        batch = synthetic_batch(model, 1, 8, "cpu")
        prompt, pixels = batch["input_ids"][:, : model.num_image_tokens + 8], batch["pixel_values"]
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 2.5:  # warm-up; long enough for the governor to see a late load
            generate(model, prompt, pixels, stop_ids=-1, max_new_tokens=16)
        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            (ids,) = generate(model, prompt, pixels, stop_ids=-1, max_new_tokens=spec["new_tokens"])
            best = max(best, len(ids) / (time.perf_counter() - t0))
        out[f"{size}/decode"], out[f"{size}/decode_threads"] = best, torch.get_num_threads()
        out[f"{size}/ids"] = ids[:16]
    if late is not None:
        late.kill()
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


def measure(policy: str, spec: dict, late: bool = False) -> dict:
    """One fresh process under `policy`'s environment: its JSON line."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(POLICIES[policy])
    spec = {**spec, "threads": ROW_THREADS.get(policy, 2), "busy": BUSY, "late": late}
    return once(CHILD, spec, env=env, what=f"the {policy} measurement")


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def table(rows: list[dict], policies: list[str], cells: list[str]) -> str:
    """Per load: each cell's median (quartiles) under each policy, and its median ratio to the round's best."""
    lines = []
    for load in ("quiet", "busy", "late"):
        lines.append(f"\n{load} host: median over rounds (quartiles); x = median of the ratio to the round's best")
        lines.append(f"  {'policy':<10}" + "".join(f"{c:>26}" for c in cells))
        for p in [p for p in policies if p in rows[0][load]]:
            row = f"  {p:<10}"
            for c in cells:
                vals = [r[load][p][c] for r in rows]
                best = "busy" if load == "late" else load  # late: against the busy rows
                ratio = statistics.median(r[load][p][c] / max(r[best][q][c] for q in policies) for r in rows)
                q1, q2, q3 = quartiles(vals)
                row += f"{f'{q2:.1f} ({q1:.1f}-{q3:.1f}) {ratio:.2f}x':>26}"
            lines.append(row)
    return "\n".join(lines)


def verdict(rows: list[dict], policies: list[str], cells: list[str]) -> str:
    """svlm's default against the targets: quiet, its share of the best row;
    busy, its ratio to one thread (medians over rounds of each round's ratio)."""
    if "svlm" not in policies or "1 thread" not in policies:
        return ""
    quiet = [statistics.median(r["quiet"]["svlm"][c] / max(r["quiet"][q][c] for q in policies) for r in rows)
             for c in cells]  # fmt: skip

    def over_one(load: str) -> str:
        return "  ".join(f"{c} {statistics.median(r[load]['svlm'][c] / r['busy']['1 thread'][c] for r in rows):.2f}"
                         for c in cells)  # fmt: skip

    return (
        "\nsvlm's default: quiet, of the best row         " + "  ".join(f"{c} {x:.2f}" for c, x in zip(cells, quiet))
        + "\n                busy, over one thread (busy)  " + over_one("busy")
        + "\n                late, over one thread (busy)  " + over_one("late")
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"a comma list of {', '.join(POLICIES)}")
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps a size and thread count")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", help="write every round's figures here")
    args = ap.parse_args()
    policies = args.policies.split(",")
    unknown = set(policies) - set(POLICIES)
    if unknown:
        sys.exit(f"--policies: unknown {', '.join(sorted(unknown))} (known: {', '.join(POLICIES)})")
    sizes = args.sizes.split(",")
    spec = {"sizes": sizes, "steps": args.steps, "new_tokens": args.new_tokens, "peak": False}
    cells = [f"{s}/{kind}" for s in sizes for kind in ("train", "decode")]
    rows = []
    for r in range(args.rounds):
        host = measure("1 thread", {**spec, "sizes": [], "peak": True})
        state = host["peak_2"] / host["peak_1"]
        got: dict = {"host_peak_ratio": state, "quiet": {}, "busy": {}, "late": {}}
        order = policies[:: -1 if r % 2 else 1]
        loads = ("quiet", "busy", "late") if r % 2 == 0 else ("late", "busy", "quiet")
        for load in loads:
            for p in order if load != "late" else [p for p in order if p == "svlm"]:
                with competing_load(load == "busy", deadline_s=900):
                    got[load][p] = measure(p, spec, late=load == "late")
                figures = "  ".join(f"{c} {got[load][p][c]:.1f}" for c in cells)
                g = got[load][p]
                chosen = " ".join(f"{s} {g[f'{s}/train_threads']}/{g[f'{s}/decode_threads']}" for s in sizes)
                print(f"round {r + 1} {load:<5} {p:<8} {figures}  threads (train/decode) {chosen}", flush=True)
        print(f"round {r + 1}: host 2-thread / 1-thread matmul peak {state:.2f}x", flush=True)
        rows.append(got)
    ids = {(load, p): tuple(map(tuple, (r[load][p][f"{s}/ids"] for s in sizes))) for r in rows
           for load in ("quiet", "busy", "late") for p in r[load]}  # fmt: skip
    peaks = ", ".join(f"{r['host_peak_ratio']:.2f}" for r in rows)
    print(f"\nhost 2-thread / 1-thread matmul peak at each round's start: {peaks}")
    print("samples/s (train) and tokens/s (decode), batch 8 (tiny) or 4 (small) for training, 1 for decoding")
    print(table(rows, policies, cells))
    print(verdict(rows, policies, cells))
    print(f"\ngenerated tokens the same under every policy: {len(set(ids.values())) == 1}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": rows}, f, indent=1)


if __name__ == "__main__":
    main()
