"""`python -m svlm.memory [train.py overrides]`: the memory planner's command (svlm/memory/__init__.py)."""

from __future__ import annotations

import sys

import svlm.memory
from svlm.cli import command, compose_train
from svlm.memory import CONTEXT_GIB, choose_optimizer


def main(argv: list[str] | None = None) -> int:
    def body(args: list[str]) -> int:
        cfg = compose_train(["paths.run_dir=outputs/memory", *args])
        ok = True
        for stage in cfg.stages():
            kind, est = choose_optimizer(cfg, stage)
            print(est.table())
            budget = cfg.hardware.memory_budget_gb
            if budget is not None:
                verdict = "fits" if est.fits(budget) else "does NOT fit"
                print(f"  {verdict} hardware.memory_budget_gb={budget:g} (with {CONTEXT_GIB} GiB for the CUDA context)")
                ok = ok and est.fits(budget)
        return 0 if ok else 1

    return command(svlm.memory.__doc__, body, argv, errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
