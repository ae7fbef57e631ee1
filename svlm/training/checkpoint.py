"""Checkpoints that a run resumes from exactly, and finding them.

A checkpoint is a model folder (see svlm/model_folder.py) plus `trainer_state.pt`:
optimizer, scheduler and gradient-scaler states, the RNG states, the step,
and the position in the data. It is written under a temporary name and
renamed, so a kill during a save leaves the previous checkpoint whole. The
state holds only tensors and plain Python values and loads with
`torch.load(weights_only=True)`: a checkpoint cannot run code.

    <run>/<stage>/checkpoints/step-0000100/   model files + trainer_state.pt
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from svlm.config import ConfigError, TrainConfig
from svlm.model_folder import MODEL_FILES, save_model
from svlm.typed import build

TRAINER_STATE = "trainer_state.pt"
ENGINE_STATE = "engine_state"  # FSDP / DeepSpeed: each process's optimizer shard (accelerate's save_state)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def load_trainer_state(folder: Path) -> dict:
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a training checkpoint (no {TRAINER_STATE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def is_checkpoint(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (*MODEL_FILES, TRAINER_STATE))


def checkpoints(stage_dir: Path) -> list[Path]:
    """The complete checkpoints of a stage, oldest first (half-written ones are hidden
    under a temporary name and never listed)."""
    found = [p for p in (Path(stage_dir) / "checkpoints").glob("step-*") if is_checkpoint(p)]
    return sorted(found, key=lambda p: p.name)


def prune(stage_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints of a stage (0: keep all)."""
    if keep_last <= 0:
        return
    for old in checkpoints(stage_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_stage_model(
    model, tokenizer, folder, cfg, stage, key, step, val, finished, extra=None, extra_dirs=None, state_dict=None
):
    meta = {
        "stage": stage.name,
        "model": cfg.model.name,
        "model_key": key,
        "step": step,
        "data": cfg.data.name,
        "data_config": dataclasses.asdict(cfg.data),
        "seed": cfg.seed,
        "finished": finished,
        "metrics": val,
    }
    adapters = stage.lora if stage.lora.r and not finished else None  # a checkpoint keeps them apart, to resume
    save_model(folder, model, tokenizer, meta, extra, extra_dirs, state_dict, adapters)


def find_resume(resume: str, outputs: str) -> tuple[Path, Path | None]:
    """resume=latest | <run folder> | <checkpoint folder> -> (run folder, a chosen checkpoint or None)."""
    if resume == "latest":
        found = [p for p in Path(outputs).glob("**/checkpoints/step-*") if is_checkpoint(p)]
        if not found:
            raise ConfigError(
                f"resume=latest: no checkpoint under {str(outputs)!r} (checkpoints need stage.save_every)"
            )
        newest = max(found, key=lambda p: (p / TRAINER_STATE).stat().st_mtime)
        return newest.parents[2], None
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"resume={resume!r}: no such folder (a run folder, a checkpoint folder, or latest)")
    if is_checkpoint(path):
        return path.parents[2], path
    if (path / "config.yaml").is_file():
        return path, None
    raise ConfigError(f"resume={resume!r} is neither a run folder (with config.yaml) nor a checkpoint")


def load_resumed_config(cfg: TrainConfig) -> tuple[TrainConfig, Path | None]:
    """The resumed run's own config (its hardware and logger may change), in its own folder."""
    run_dir, chosen = find_resume(cfg.resume, cfg.paths.outputs)
    stored = build(TrainConfig, OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")), "")
    stored = dataclasses.replace(
        stored, hardware=cfg.hardware, logger=cfg.logger, resume=None,
        paths=dataclasses.replace(stored.paths, run_dir=str(run_dir)),
    )  # fmt: skip
    print(f"resuming {run_dir} with its own config.yaml (other overrides, but hardware and logger, are ignored)")
    return stored, chosen
