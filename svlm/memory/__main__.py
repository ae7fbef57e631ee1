"""`python -m svlm.memory [train.py overrides]`: the memory planner's command
(settings: conf/memory.yaml; the planner: svlm/memory/__init__.py)."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

import svlm.memory
from svlm.cli import command


@command("memory", doc=svlm.memory.__doc__)
def main(cfg: DictConfig) -> None:
    from svlm.config import load_train_config
    from svlm.memory import CONTEXT_GIB, choose_optimizer

    train_cfg = load_train_config(cfg)
    ok = True
    for stage in train_cfg.stages():
        kind, est = choose_optimizer(train_cfg, stage)
        print(est.table())
        budget = train_cfg.hardware.memory_budget_gb
        if budget is not None:
            verdict = "fits" if est.fits(budget) else "does NOT fit"
            print(f"  {verdict} hardware.memory_budget_gb={budget:g} (with {CONTEXT_GIB} GiB for the CUDA context)")
            ok = ok and est.fits(budget)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
