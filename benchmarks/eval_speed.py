"""`python eval.py`, this tree against an earlier revision, on one host in one run:

    python benchmarks/eval_speed.py --baseline 505b026 --ckpt outputs/train/<run>
    python benchmarks/eval_speed.py --baseline 505b026 --ckpt outputs/train/<run> --rounds 7 data=shapes

The baseline revision is checked out into a temporary git worktree. One
process per tree imports its code once; then, round by round, each process
in turn (the order alternating) runs what `python eval.py ckpt=<ckpt>
[overrides]` runs (svlm.evaluation.evaluate: the model loaded, the
validation loss, the greedy answers), its outputs in a temporary folder, the data from this folder's `paths.cache`.
Prints each round's seconds and accuracy, the median ratio of the two
trees' times with its quartiles, and whether every round of both trees gave
the same accuracy and validation loss (a faster eval may not change a
score). Other arguments are eval.py overrides.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from paired import REPO, Worker, rounds, spread, worktree

WORKER = r"""
import json, sys, time
from svlm.cli import compose
from svlm.config import load_eval_config
from svlm.evaluation.evaluate import evaluate
cfg = load_eval_config(compose("eval", sys.argv[1:]))
print("@result ready", flush=True)
for _ in sys.stdin:  # one evaluation a line
    t0 = time.perf_counter()
    res = evaluate(cfg)
    seconds = time.perf_counter() - t0
    print("@result " + json.dumps({"seconds": seconds, "accuracy": res.get("accuracy"), "val_loss": res["val_loss"]}), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="the revision to compare with (e.g. a commit id)")
    ap.add_argument("--ckpt", required=True, type=Path, help="a run folder or model folder, as eval.py's ckpt")
    ap.add_argument("--rounds", type=int, default=5)
    args, overrides = ap.parse_known_args()
    if not any(o.startswith("paths.cache=") for o in overrides):  # both trees read the data this folder's eval.py reads
        overrides.append(f"paths.cache={Path(os.environ.get('SVLM_CACHE', '.cache')).resolve()}")

    def show(r: int, got: dict) -> None:
        base, this = got["baseline"], got["this tree"]
        print(f"round {r}: baseline {base['seconds']:.1f} s (accuracy {base['accuracy']}), this tree "
              f"{this['seconds']:.1f} s (accuracy {this['accuracy']}): {base['seconds'] / this['seconds']:.2f}x",
              flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp, worktree(args.baseline, Path(tmp) / "baseline") as base:
        workers = {}
        try:
            for name, tree in (("baseline", base), ("this tree", REPO)):
                out = Path(tmp) / name.replace(" ", "_")
                argv = [f"ckpt={args.ckpt.resolve()}", f"paths.outputs={out}", f"paths.run_dir={out / 'run'}",
                        *overrides]  # fmt: skip
                workers[name] = Worker(tree, WORKER, argv)
            rows = rounds(workers, args.rounds, show)
        finally:
            for w in workers.values():
                w.close()
    q1, median, q3 = spread([g["baseline"]["seconds"] / g["this tree"]["seconds"] for g in rows])
    scores = {(g[n]["accuracy"], g[n]["val_loss"]) for g in rows for n in g}
    print(f"eval.py ckpt={args.ckpt} {' '.join(overrides)}: this tree {median:.2f}x as fast as the baseline "
          f"({args.baseline}), quartiles {q1:.2f}x-{q3:.2f}x over {len(rows)} rounds; "
          f"same accuracy and validation loss throughout: {len(scores) == 1} {sorted(scores)}")  # fmt: skip


if __name__ == "__main__":
    main()
