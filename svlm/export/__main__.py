"""`python -m svlm.export ckpt=... out=...` (or from_llava=...): the export's command
(settings: conf/export.yaml; the export: svlm/export/__init__.py)."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

import svlm.export
from svlm.cli import command


@command("export", free_text=("ckpt", "out", "from_llava"), doc=svlm.export.__doc__)
def main(cfg: DictConfig) -> None:
    from svlm.export import ExportConfig, run
    from svlm.typed import build, to_plain

    out = run(build(ExportConfig, to_plain(cfg)))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
