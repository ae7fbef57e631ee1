"""`python -m svlm.report <sweep folder>`: a sweep's table and curves
(settings: conf/report.yaml; the report: svlm/report/__init__.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from omegaconf import DictConfig

import svlm.report
from svlm.cli import command
from svlm.config import PathsConfig
from svlm.errors import ConfigError
from svlm.typed import build, to_plain


@dataclass
class ReportConfig:
    sweep: str | None = None  # the sweep folder, e.g. outputs/multirun/<time>
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if self.sweep is None:
            raise ConfigError("sweep=<folder> is required: the sweep to report, e.g. outputs/multirun/<time>")


@command("report", free_text=("sweep",), positional="sweep", doc=svlm.report.__doc__)
def main(cfg: DictConfig) -> None:
    svlm.report.report(build(ReportConfig, to_plain(cfg)).sweep)


if __name__ == "__main__":
    sys.exit(main())
