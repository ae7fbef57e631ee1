"""`python -m svlm.report <sweep folder>`: a sweep's table and curves (svlm/report/__init__.py)."""

from __future__ import annotations

import sys

import svlm.report
from svlm.report import report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(svlm.report.__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        report(args[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
