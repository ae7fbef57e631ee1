"""`python -m svlm.data.check [train.py overrides]`: the data checker's command (svlm/data/check/__init__.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import svlm.data.check
from svlm.cli import compose_train, quote_free_text
from svlm.data.check import check, print_report
from svlm.data.formats import DataError
from svlm.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    argv = quote_free_text(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(svlm.data.check.__doc__)
        return 0
    out = Path("outputs") / "check" / time.strftime("%Y-%m-%d_%H-%M-%S")
    try:
        cfg = compose_train([f"paths.run_dir={out}", *argv])
        out = Path(cfg.paths.run_dir)
        report = check(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"report: {out / 'report.json'}")
    return 1 if any(r["bad"] for r in report["files"]) else 0


if __name__ == "__main__":
    sys.exit(main())
