"""`python -m svlm.data.check [train.py overrides]`: the data checker's command
(settings: conf/check.yaml; the checker: svlm/data/check/__init__.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig

import svlm.data.check
from svlm.cli import command


@command("check", doc=svlm.data.check.__doc__)
def main(cfg: DictConfig) -> None:
    from svlm.config import load_train_config
    from svlm.data.check import check, print_report

    train_cfg = load_train_config(cfg)
    report = check(train_cfg)
    print_report(report)
    out = Path(train_cfg.paths.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"report: {out / 'report.json'}")
    if any(r["bad"] for r in report["files"]):
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
