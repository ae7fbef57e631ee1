"""The training loop, explicit: set up a stage, step, validate, save.

    train(cfg)                  every stage the config asks for, in order
      run_stage(...)            one stage:
        prepare(...) -> StageRun  model, data, batch plan, feature cache, optimizer, resume
        fit(run, stop)            the steps (training/step.py), logging, validation, checkpoints
        finish(run)               bad_samples.json and the finished model folder

Everything a run writes goes under cfg.paths.run_dir:

    <run_dir>/config.yaml              the resolved, typed config
    <run_dir>/<stage>/metrics.jsonl    one JSON object per logged step / validation
    <run_dir>/<stage>/bad_samples.json what the data loader skipped, by reason
    <run_dir>/<stage>/checkpoints/     periodic model folders (stage.save_every)
    <run_dir>/<stage>/samples/         a grid of answered validation samples per validation (stage.sample_grid)
    <run_dir>/<stage>/model/           the finished model (weights, config, tokenizer)
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from svlm.benchmarks.run import run_benchmark
from svlm.config import ConfigError, StageConfig, TrainConfig
from svlm.data.dataset import take_bad
from svlm.data.formats import BadSamples, check_bad_fraction
from svlm.data.source import data_root
from svlm.evaluation.evaluate import validate
from svlm.evaluation.samples import sample_grid
from svlm.evaluation.skills import draw_skills, score_skills
from svlm.hardware import THREADS, make_accelerator
from svlm.model_folder import is_model_folder, model_key, resolve_model
from svlm.report import draw_curves
from svlm.training.checkpoint import (
    ENGINE_STATE,
    TRAINER_STATE,
    checkpoints,
    load_resumed_config,
    prune,
    rng_state,
    save_stage_model,
)
from svlm.training.metrics import Figures, MetricsLog, last_time
from svlm.training.prepare import StageRun, prepare
from svlm.training.signals import StopRequested, TrainingStopped
from svlm.training.step import skips_on_device, train_step

SKILL_BATCH = 64  # skill questions answered together

# ------------------------------------------------------------------------ stage


def run_stage(
    cfg: TrainConfig,
    stage: StageConfig,
    accelerator: Accelerator,
    init: Path | None,
    root: Path,
    stop: StopRequested,
    resume: Path | None = None,
) -> Path:
    """Train one stage (from `init`, or continuing the checkpoint `resume`);
    returns the folder of the finished model."""
    run = prepare(cfg, stage, accelerator, init, root, stop, resume)
    fit(run, stop)
    return finish(run)


# -------------------------------------------------------------------------- fit


def batches(run: StageRun):
    """Micro-batches without end: a new order each pass over the data; run.pos says where it stands."""
    while True:
        run.loader.set_epoch(run.pos.epoch)
        for batch in run.loader:
            run.pos.batch += 1
            take_bad(batch, run.bad)  # what a data-loader worker found
            yield batch
        run.pos.epoch += 1
        run.pos.batch = 0


def fit(run: StageRun, stop: StopRequested) -> None:
    """The step loop: one optimizer step (svlm/training/step.py), then, as the
    stage says, the figures read and logged, validation and the sample grid,
    a checkpoint, and a stop request answered with a checkpoint."""
    stage, pos = run.stage, run.pos
    log = MetricsLog(run.dir / "metrics.jsonl", run.cfg, stage.name, run.main)
    bar = tqdm(total=run.total, initial=pos.step, desc=stage.name, disable=not run.main, dynamic_ncols=True)
    figures = Figures(run, log, bar)
    run.started = figures.t0 - (last_time(run.dir / "metrics.jsonl") if pos.step else 0.0)  # a resume's clock goes on
    stream = batches(run)
    run.model.train()
    skip_on_device = not run.sharded and skips_on_device(run.optimizer)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    deepspeed = run.accelerator.distributed_type == DistributedType.DEEPSPEED
    while pos.step < run.total:
        micro_batches = [next(stream) for _ in range(run.accum)]
        step_figures, out = train_step(run.accelerator, run.model, run.optimizer, micro_batches, trainable,
                                       stage.grad_clip, skip_on_device, deepspeed)  # fmt: skip
        pos.seen += sum(b.get("n_samples", b["input_ids"].shape[0]) for b in micro_batches) * run.world
        pos.step += 1
        done = pos.step
        figures.pending.append((done, step_figures))
        if not skip_on_device:  # the flags were read to decide the step: account for them now
            figures.read()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if THREADS.follow() is not None:
            bar.write(f"[{stage.name}] CPU: now {THREADS.describe()}")
        eval_now = run.val_loader is not None and (
            (stage.eval_every and done % stage.eval_every == 0) or done == run.total
        )
        save_now = stage.save_every and done % stage.save_every == 0 and done < run.total
        if done % stage.log_every == 0 or done == run.total or eval_now or save_now or stop.signal is not None:
            figures.read()
        check_lazy_data(run, done)
        if done % stage.log_every == 0 or done == run.total:
            figures.log_window(done, out)
        if eval_now:
            evaluate_now(run, log, bar, done)
        if save_now and not pos.bad_in_a_row:
            save_checkpoint(run, done)  # not during a run of bad steps: the last checkpoint stays a good one
        if stop.signal is not None and done < run.total:
            folder = save_checkpoint(run, done)
            bar.close()
            log.close()
            raise TrainingStopped(
                f"[{stage.name}] stopped by {stop.signal} at step {done} of {run.total}; checkpoint: {folder}\n"
                f"resume with: python train.py resume={run.cfg.paths.run_dir}",
                exit_code=0,
            )
    bar.close()
    log.close()


def check_lazy_data(run: StageRun, step: int) -> None:
    """Lazily read data: bad samples show up as they come, so the share is judged as training goes."""
    if step % run.stage.log_every or not (lazy := run.lazy_parts):
        return
    fetched = sum(d.fetched for d in lazy)
    if fetched >= 200:
        check_bad_fraction(run.bad, fetched - run.bad.total, run.cfg.data.max_bad_fraction)


def evaluate_now(run: StageRun, log: MetricsLog, bar, step: int) -> None:
    """Validation figures, logged; the sample grid drawn."""
    stage = run.stage
    run.val = validate(run.model, run.val_loader, run.accelerator.autocast, stage.val_batches, run.bad)
    log.log({"step": step, **run.val})
    bar.write(f"[{stage.name}] step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in run.val.items()))
    sample_grid(run.raw, run.encoder, run.val_ds, stage.sample_grid, run.dir / "samples" / f"step-{step:07d}.png",
                f"{stage.name} step {step}", step=step, autocast=run.accelerator.autocast, main=run.main,
                sharded=run.sharded, wandb_run=log.wandb)  # fmt: skip
    if run.skills is not None and not run.sharded:  # a sharded model (FSDP, DeepSpeed) generates nowhere whole
        skills = score_skills(run.raw, run.tokenizer, run.encoder, run.skills, SKILL_BATCH,
                              run.accelerator.process_index, run.world, run.accelerator.autocast())  # fmt: skip
        log.log({"step": step, "time": time.time() - run.started, **skills})
        bar.write(f"[{stage.name}] step {step}: skills " + ", ".join(f"{k[7:]}={v:.2f}" for k, v in skills.items()
                                                               if k.startswith("skills/")))  # fmt: skip
        if run.main:
            draw_skills(Path(run.cfg.paths.run_dir))
    if run.benchmarks and not run.sharded:
        figures = {}
        for name, questions in run.benchmarks.items():
            metrics, _ = run_benchmark(run.raw, run.encoder, questions, stage.benchmark_limit, None, run.micro,
                                       run.accelerator.process_index, run.world, run.accelerator.autocast)  # fmt: skip
            figures.update({f"bench/{name}/{k}": v for k, v in metrics.items()})
        log.log({"step": step, **figures})
        bar.write(f"[{stage.name}] step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in figures.items()))


def weights_to_save(run: StageRun) -> dict[str, torch.Tensor] | None:
    """None: the model's own weights. Sharded ones are gathered (every process
    takes part); with adamw_offload, the fp32 masters, not the bf16 working copy."""
    if run.sharded:
        return run.accelerator.get_state_dict(run.model)
    return run.optimizer.optimizer.master_state_dict(run.raw) if run.offloaded else None


def save_checkpoint(run: StageRun, step: int) -> Path:
    """A checkpoint to resume from exactly: the model folder and the trainer state."""
    acc, folder = run.accelerator, run.dir / "checkpoints" / f"step-{step:07d}"
    state = {
        "optimizer": None if run.sharded else run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        "rng": rng_state(),
        "position": {**dataclasses.asdict(run.pos), "samples_in_epoch": run.pos.batch * run.micro * run.world},
        "world": run.world,
        "micro": run.micro,
        "stream": run.train_ds.layout() if run.cfg.data.streaming else None,
    }
    weights = weights_to_save(run)
    extra_dirs = {}
    if run.sharded:  # every process writes its shard of the optimizer state
        engine = run.dir / "checkpoints" / f".engine-{step:07d}"
        acc.save_state(str(engine))
        extra_dirs[ENGINE_STATE] = engine
    if run.main:
        save_stage_model(run.raw, run.tokenizer, folder, run.cfg, run.stage, run.key, step, run.val, finished=False,
                         extra={TRAINER_STATE: state}, extra_dirs=extra_dirs, state_dict=weights)  # fmt: skip
        prune(run.dir, run.stage.keep_last)
    acc.wait_for_everyone()
    return folder


# ----------------------------------------------------------------------- finish


def finish(run: StageRun) -> Path:
    """bad_samples.json and the finished model folder; returns the folder."""
    acc = run.accelerator
    acc.wait_for_everyone()
    out_dir = run.dir / "model"
    weights = weights_to_save(run)
    truncated = [w for d in run.parts for w in d.truncated]  # lazily read data adds to it while training
    bad = run.bad
    if run.world > 1:  # each process met its own samples' problems: one report of them all
        bad = BadSamples()
        for part in gather_object([run.bad]):
            bad.merge(part)
    if run.main:
        report = {"total": bad.total, "counts": dict(bad.counts), "examples": bad.examples,
                  "truncated": len(truncated), "truncated_examples": truncated[:5]}  # fmt: skip
        (run.dir / "bad_samples.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        save_stage_model(run.raw, run.tokenizer, out_dir, run.cfg, run.stage, run.key, run.total, run.val,
                         finished=True, state_dict=weights)  # fmt: skip
        acc.print(f"[{run.stage.name}] done in {time.time() - run.started:.0f}s; model saved to {out_dir}")
    acc.wait_for_everyone()
    return out_dir


# ------------------------------------------------------------------------ train


def train(cfg: TrainConfig) -> list[Path]:
    """Run every stage the config asks for; returns the finished model folders.
    Raises TrainingStopped when a signal or bad numbers stop the run."""
    chosen: Path | None = None
    resuming = cfg.resume is not None
    if resuming:
        cfg, chosen = load_resumed_config(cfg)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg.hardware, find_unused_parameters=cfg.model.lm.mlp == "moe")
    if accelerator.is_main_process and not (run_dir / "config.yaml").is_file():
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))
    stages = cfg.stages()
    key = model_key(dataclasses.asdict(cfg.model))
    root = data_root(cfg.data, cfg.paths.cache)
    init: Path | None = None
    if cfg.init_from is not None:
        init = resolve_model(cfg.init_from, cfg.paths.outputs, key="init_from")
    elif stages[0].name == "stage2" and not (run_dir / "stage2" / "checkpoints").is_dir():
        try:
            init = resolve_model(None, cfg.paths.outputs, key="init_from", stage="stage1", model=key)
        except FileNotFoundError as e:
            raise ConfigError(
                f"stage=stage2 needs a stage-1 model to start from, and {e}. "
                f"Run `python train.py stage=stage1 model={cfg.model.name}` first, or pass init_from=<model folder>."
            ) from None
    stop = StopRequested()
    stop.install()
    results = []
    try:
        for stage in stages:
            stage_dir = run_dir / stage.name
            finished = stage_dir / "model"
            chosen_here = chosen is not None and chosen.parents[1] == stage_dir
            if is_model_folder(finished) and not chosen_here:  # done before the run was stopped
                accelerator.print(f"[{stage.name}] already finished: {finished}")
                init = finished
                results.append(init)
                continue
            resume = None
            if chosen_here:  # a checkpoint named by resume=<checkpoint>
                resume = chosen
            elif resuming and checkpoints(stage_dir):
                resume = checkpoints(stage_dir)[-1]
            set_seed(cfg.seed)
            init = run_stage(cfg, stage, accelerator, init, root, stop, resume)
            results.append(init)
    finally:
        stop.restore()
    if accelerator.is_main_process:
        png = draw_curves([("", run_dir)], run_dir / "loss_curves.png", str(run_dir))
        accelerator.print(f"loss curves: {png}")
    accelerator.end_training()
    return results
