"""What a stage logs: metrics.jsonl in the stage folder always (one JSON object
per logged step and validation), wandb when logger=wandb (never a login
prompt: online only with credentials, else offline into the run folder)."""

from __future__ import annotations

import dataclasses
import json
import netrc
import os
from pathlib import Path

from svlm.config import TrainConfig


class MetricsLog:
    """metrics.jsonl always; wandb when the logger config asks for it."""

    def __init__(self, path: Path, cfg: TrainConfig, stage: str, enabled: bool) -> None:
        self.path, self.enabled, self.wandb = path, enabled, None
        if enabled and cfg.logger.name == "wandb":
            import wandb

            mode = cfg.logger.mode
            if mode == "auto":  # never prompt for a login: online only with credentials
                mode = "online" if _wandb_logged_in() else "offline"
            self.wandb = wandb.init(
                project=cfg.logger.project,
                name=f"{cfg.run_name or Path(cfg.paths.run_dir).name}-{stage}",
                dir=str(path.parent),
                mode=mode,
                config=dataclasses.asdict(cfg),
                reinit="finish_previous",
            )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
