"""What a stage logs: metrics.jsonl in the stage folder always (one JSON object
per logged step and validation), wandb when logger=wandb (never a login
prompt: online only with credentials, else offline into the run folder)."""

from __future__ import annotations

import dataclasses
import json
import math
import netrc
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from svlm.config import TrainConfig
from svlm.training.checkpoint import checkpoints
from svlm.training.signals import TrainingStopped

if TYPE_CHECKING:
    from svlm.training.prepare import StageRun


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


def last_time(path: Path) -> float:
    """The latest `time` logged in a metrics file (0 when none): where a resumed stage's clock goes on from."""
    if not path.is_file():
        return 0.0
    times = [json.loads(line).get("time", 0.0) for line in path.read_text().splitlines() if line.strip()]
    return max(times, default=0.0)


class Figures:
    """The steps' figures, kept on the device until read in one go (one sync):
    the window of losses for the log line, the last gradient norm, and the
    steps skipped for a non-finite loss or gradient (too many in a row stop the run)."""

    def __init__(self, run: StageRun, log: MetricsLog, bar) -> None:
        self.run, self.log, self.bar = run, log, bar
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, grad norm, bad loss, bad gradient])
        self.last_grad_norm = 0.0
        self.t0, self.seen0 = time.time(), run.pos.seen

    def read(self) -> None:
        if not self.pending:
            return
        values = torch.stack([f for _, f in self.pending]).tolist()
        steps = [s for s, _ in self.pending]
        self.pending.clear()
        pos, stage = self.run.pos, self.run.stage
        for step, (loss, grad_norm, bad_loss, bad_grad) in zip(steps, values):
            self.last_grad_norm = grad_norm
            if not (bad_loss or bad_grad):
                pos.bad_in_a_row, pos.window_loss, pos.window_n = 0, pos.window_loss + loss, pos.window_n + 1
                continue
            # a non-finite loss or gradient: the update was skipped, the schedule kept
            pos.bad_in_a_row += 1
            self.log.log({"step": step, "skipped": f"non-finite {'loss' if bad_loss else 'gradient'}"})
            self.bar.write(f"[{stage.name}] step {step}: non-finite loss or gradient, update skipped")
            if pos.bad_in_a_row >= stage.max_bad_steps:
                last = checkpoints(self.run.dir)
                raise TrainingStopped(
                    f"[{stage.name}] {pos.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                    f"(stage.max_bad_steps={stage.max_bad_steps}); stopped at step {step}. Last good checkpoint: "
                    f"{last[-1] if last else 'none'}. Try a lower stage.lr or hardware.precision=fp32.",
                    exit_code=1,
                )

    def log_window(self, step: int, out) -> None:
        """The log line of the steps since the last one (none when all were skipped)."""
        pos = self.run.pos
        if not pos.window_n:
            return
        loss = pos.window_loss / pos.window_n
        record = {
            "step": step,
            "epoch": round(pos.seen / len(self.run.train_ds), 3),
            "train/loss": loss,
            "train/ppl": math.exp(min(loss, 50)),
            "train/lr": self.run.scheduler.get_last_lr()[0],
            "train/aux_loss": float((out.loss - out.ce_loss).detach()),
            "train/grad_norm": self.last_grad_norm,
            "samples_per_s": (pos.seen - self.seen0) / (time.time() - self.t0),
            "time": time.time() - self.run.started,  # seconds since the stage began (the skill curves' axis)
        }
        self.log.log(record)
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['train/lr']:.1e}")
        pos.window_loss, pos.window_n = 0.0, 0
