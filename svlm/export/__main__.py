"""`python -m svlm.export ckpt=... out=...` (or from_llava=...): the export's command (svlm/export/__init__.py)."""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

import svlm.export
from svlm.cli import command
from svlm.config import build
from svlm.export import ExportConfig, run


def main(argv: list[str] | None = None) -> int:
    def body(args: list[str]) -> int:
        out = run(build(ExportConfig, OmegaConf.to_container(OmegaConf.from_dotlist(args))))
        print(f"wrote {out}")
        return 0

    return command(svlm.export.__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
