"""The training loop, explicit: set up a stage, step, validate, save.

    train(cfg)            every stage the config asks for, in order
      run_stage(...)      one stage: model, data, optimizer, the loop, the final model

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
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from svlm.config import ConfigError, StageConfig, TrainConfig
from svlm.data.chat import ChatEncoder
from svlm.data.dataset import ChatDataset, Collator, LazyChatDataset, MixedDataset
from svlm.data.feature_cache import attach as attach_features
from svlm.data.feature_cache import cache_applies
from svlm.data.formats import BadSamples, DataError
from svlm.data.sampler import EpochSampler
from svlm.data.source import data_root, load_splits, train_files
from svlm.evaluation import shard, validate
from svlm.hardware import make_accelerator, to_device
from svlm.memory import CONTEXT_GIB, choose_optimizer
from svlm.model_folder import is_model_folder, load_model, model_key, resolve_model
from svlm.models.vision import ImageProcessor, sync_with_checkpoint
from svlm.models.vlm import VLM, VLMConfig
from svlm.report import draw_curves
from svlm.samples import sample_grid
from svlm.tokenizer import tokenizer_for_data
from svlm.training.checkpoint import (
    ENGINE_STATE,
    TRAINER_STATE,
    checkpoints,
    load_resumed_config,
    load_trainer_state,
    prune,
    rng_state,
    save_stage_model,
    set_rng_state,
)
from svlm.training.metrics import MetricsLog, truncate_metrics
from svlm.training.optim import OffloadAdamW, lr_factor, make_optimizer, set_trainable
from svlm.training.signals import StopRequested, TrainingStopped

# ------------------------------------------------------------------------ stage


def build_model(cfg: TrainConfig, tokenizer) -> VLM:
    vision = sync_with_checkpoint(dataclasses.replace(cfg.model.vision))
    lm = dataclasses.replace(cfg.model.lm, vocab_size=len(tokenizer))
    vlm_cfg = VLMConfig(
        vision=vision,
        projector=cfg.model.projector,
        lm=lm,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_placement=cfg.model.image_placement,
    )
    return VLM(vlm_cfg)


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
    main = accelerator.is_main_process
    stage_dir = Path(cfg.paths.run_dir) / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    key = model_key(dataclasses.asdict(cfg.model))
    files = train_files(cfg.data, root, stage.task)

    start = resume or init
    if start is not None:
        model, tokenizer, meta = load_model(start)
        if meta.get("model_key") != key:
            what = "resume" if resume else "init_from"
            raise ConfigError(
                f"{what}={str(start)!r} holds a model of config {meta.get('model')!r} (key {meta.get('model_key')}), "
                f"but model={cfg.model.name} has key {key}: start from a model trained with the same model config"
            )
        accelerator.print(f"[{stage.name}] {'resuming' if resume else 'starting'} from {start}")
    else:
        tokenizer = tokenizer_for_data(cfg.tokenizer, files)
        model = build_model(cfg, tokenizer)
    for w in set_trainable(model, stage, fresh=start is None):
        accelerator.print(f"[{stage.name}] note: {w}")
    if cfg.hardware.grad_checkpointing:  # recompute activations block by block in the backward pass
        model.lm.gradient_checkpointing = True
        if stage.train_vision:
            model.vision.dinov2.gradient_checkpointing_enable()

    encoder = ChatEncoder.for_model(tokenizer, model)
    processor = ImageProcessor(model.cfg.vision)
    collate = Collator(encoder.pad_id)
    bad = BadSamples()
    max_len = min(cfg.data.max_len, model.cfg.lm.max_seq_len)
    train_ds, val_ds = load_splits(cfg.data, root, stage.task, encoder, processor, max_len, bad, cfg.seed)
    parts = train_ds.datasets if isinstance(train_ds, MixedDataset) else [train_ds]
    lazy_parts = [d for d in parts if isinstance(d, LazyChatDataset)]
    if not lazy_parts:  # every record was read: judge the data now
        check_bad_fraction(bad, len(train_ds) + (len(val_ds) if val_ds else 0), cfg.data.max_bad_fraction)

    world = accelerator.num_processes
    # A micro-batch is at most a process's share of the batch (hardware.micro_batch_size
    # is a ceiling: stage.batch_size=8 on one process runs in one pass of 8).
    micro = min(cfg.hardware.micro_batch_size or stage.batch_size, max(1, stage.batch_size // world))
    if stage.batch_size % (micro * world):
        raise ConfigError(
            f"stage.batch_size={stage.batch_size} is not a multiple of hardware.micro_batch_size={micro} "
            f"x {world} process(es)"
        )
    accum = stage.batch_size // (micro * world)
    steps_per_epoch = (
        stage.steps_per_epoch if stage.steps_per_epoch > 0 else math.ceil(len(train_ds) / stage.batch_size)
    )
    total = stage.epochs * steps_per_epoch
    if stage.max_steps is not None:
        total = min(total, stage.max_steps)

    mixed = isinstance(train_ds, MixedDataset)
    lengths = train_ds.lengths() if cfg.data.group_by_length and isinstance(train_ds, ChatDataset) else None
    sampler = EpochSampler(
        len(train_ds), cfg.seed, cfg.data.shuffle, *((train_ds.sizes, train_ds.weights) if mixed else (None, None)),
        lengths=lengths, group=stage.batch_size, window=cfg.data.group_window,
    )  # fmt: skip
    loader = DataLoader(
        train_ds,
        batch_size=micro,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.hardware.num_workers,
        drop_last=len(train_ds) >= micro,
    )
    val_loader = None  # each process validates its own shard; validate() adds the sums up
    if val_ds is not None:
        val_part = shard(val_ds, accelerator.process_index, world)
        val_loader = DataLoader(val_part, batch_size=micro, collate_fn=collate, num_workers=cfg.hardware.num_workers)
    state = load_trainer_state(resume) if resume is not None else None
    if cache_applies(cfg.data.feature_cache, stage.train_vision, stage.name):
        # A frozen encoder: the features of the images this run reads are computed once (on the
        # main process), then read from disk, for training and validation (the sample grid reads pixels).
        at = state["position"] if state else {"step": 0, "epoch": 0, "samples_in_epoch": 0}
        sampler.start_at(at["epoch"], at["samples_in_epoch"])
        draws = (total - at["step"] + 1) * stage.batch_size  # one batch to spare
        plan = [("training", train_ds, sampler.ahead(at["epoch"], draws, micro, loader.drop_last))]
        if val_ds is not None:  # validate() reads the first val_batches micro-batches of each shard
            plan.append(("validation", val_ds, range(min(len(val_ds), stage.val_batches * micro * world))))
        model.vision.to(accelerator.device)
        for part, ds, indices in plan:
            attach_features(
                ds, model.vision, processor, Path(cfg.paths.cache) / "features", indices,
                is_main=accelerator.is_local_main_process, wait=accelerator.wait_for_everyone,
                log=lambda m, part=part: accelerator.print(f"[{stage.name}] {part} {m}"),
                stop=lambda: stop.signal is not None,
            )  # fmt: skip
        if stop.signal is not None:  # before any step: nothing to save, the features encoded stay cached
            raise TrainingStopped(
                f"[{stage.name}] stopped by {stop.signal} during the feature cache fill (what was encoded is "
                f"kept)\nresume with: python train.py resume={cfg.paths.run_dir}",
                exit_code=0,
            )
    kind, estimate = choose_optimizer(cfg, stage, micro_batch=micro, vocab=len(tokenizer))
    accelerator.print(estimate.table())
    budget = cfg.hardware.memory_budget_gb
    if not estimate.fits(budget):
        accelerator.print(
            f"[{stage.name}] warning: the estimate ({estimate.total / 2**30:.2f} GiB + {CONTEXT_GIB} GiB for the CUDA "
            f"context) exceeds hardware.memory_budget_gb={budget:g}: lower hardware.micro_batch_size or data.max_len, "
            "set hardware.grad_checkpointing=true or hardware.optimizer=adamw_offload"
        )
    if cfg.hardware.compile:  # each block compiled once; the rest of the model stays eager
        model.compile_blocks()
    optimizer = make_optimizer(model, stage, kind, pin=accelerator.device.type == "cuda")
    offloaded = isinstance(optimizer, OffloadAdamW)
    raw_optimizer = optimizer  # accelerate wraps it below
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, stage.warmup, stage.min_lr_ratio)
    )
    # FSDP and DeepSpeed shard weights and optimizer states over the processes
    # (on a GPU; on the CPU accelerate runs DDP whatever the plugin).
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # the engine accumulates and clips itself: tell it this stage's numbers
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["gradient_accumulation_steps"] = accum
        ds_config["gradient_clipping"] = stage.grad_clip
        ds_config["train_micro_batch_size_per_gpu"] = micro
    # The scheduler counts optimizer steps itself: not prepared (accelerate would
    # step it once per process).
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    raw = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # Where the loop stands; all of it goes into a checkpoint's trainer state.
    pos = {"step": 0, "epoch": 0, "batch": 0, "seen": 0, "window_loss": 0.0, "window_n": 0, "bad_in_a_row": 0}
    if state is not None:
        if state["optimizer"] is None:  # sharded: each process's part, saved by accelerate
            accelerator.load_state(str(resume / ENGINE_STATE))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        pos.update(state["position"])
        # The data position is kept in samples, so a run may resume with another
        # number of processes or micro-batch (stage.batch_size stays the same).
        done_in_epoch = pos.pop("samples_in_epoch")
        pos["batch"] = done_in_epoch // (micro * world)
        sampler.start_at(pos["epoch"], done_in_epoch)
        if main:
            truncate_metrics(stage_dir / "metrics.jsonl", pos["step"])

    n_params = sum(p.numel() for p in raw.parameters())
    n_train = sum(p.numel() for p in trainable)
    accelerator.print(
        f"[{stage.name}] {n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained; "
        f"{len(train_ds)} samples, {total} steps of {stage.batch_size} ({micro} x {accum} accumulation x {world})"
    )
    if bad.total:
        accelerator.print(f"[{stage.name}] {bad.summary()}")
    truncated = [w for d in parts for w in d.truncated]
    if truncated:
        accelerator.print(
            f"[{stage.name}] {len(truncated)} sample(s) cut to data.max_len={max_len} "
            f"(their image and some answers fit), e.g. {truncated[0]}"
        )
    log = MetricsLog(stage_dir / "metrics.jsonl", cfg, stage.name, main)

    def batches():  # endless: a new order each pass over the data; pos says where it stands
        while True:
            loader.set_epoch(pos["epoch"])
            for batch in loader:
                pos["batch"] += 1
                yield batch
            pos["epoch"] += 1
            pos["batch"] = 0

    def weights_to_save() -> dict[str, torch.Tensor] | None:
        """None: the model's own weights. Sharded ones are gathered (every process
        takes part); with adamw_offload, the fp32 masters, not the bf16 working copy."""
        if sharded:
            return accelerator.get_state_dict(model)
        return optimizer.optimizer.master_state_dict(raw) if offloaded else None

    def save_checkpoint(step: int) -> Path:
        folder = stage_dir / "checkpoints" / f"step-{step:07d}"
        state = {
            "optimizer": None if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "rng": rng_state(),
            "position": {**pos, "samples_in_epoch": pos["batch"] * micro * world},
            "world": world,
            "micro": micro,
        }
        weights = weights_to_save()
        extra_dirs = {}
        if sharded:  # every process writes its shard of the optimizer state
            engine = stage_dir / "checkpoints" / f".engine-{step:07d}"
            accelerator.save_state(str(engine))
            extra_dirs[ENGINE_STATE] = engine
        if main:
            save_stage_model(raw, tokenizer, folder, cfg, stage, key, step, val, finished=False,
                  extra={TRAINER_STATE: state}, extra_dirs=extra_dirs, state_dict=weights)  # fmt: skip
            prune(stage_dir, stage.keep_last)
        accelerator.wait_for_everyone()
        return folder

    stream = batches()
    model.train()
    bar = tqdm(total=total, initial=pos["step"], desc=stage.name, disable=not main, dynamic_ncols=True)
    t0, seen0 = time.time(), pos["seen"]
    val: dict = {}
    # No step waits for the device: losses, gradient norms and the non-finite
    # flags stay tensors (a fused AdamW skips a bad update on the device itself)
    # and are read in one go at the next logging, validation or checkpoint.
    skip_on_device = not sharded and (getattr(raw_optimizer, "defaults", {}).get("fused") or offloaded)
    pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, grad norm, bad loss, bad gradient])
    last_grad_norm = 0.0

    def flush() -> None:
        """Read the pending steps' figures (one sync) and account for them."""
        nonlocal last_grad_norm
        if not pending:
            return
        figures = torch.stack([f for _, f in pending]).tolist()
        steps = [s for s, _ in pending]
        pending.clear()
        for step, (loss, grad_norm, bad_loss, bad_grad) in zip(steps, figures):
            last_grad_norm = grad_norm
            if not (bad_loss or bad_grad):
                pos["bad_in_a_row"] = 0
                pos["window_loss"] += loss
                pos["window_n"] += 1
                continue
            # a non-finite loss or gradient: the update was skipped, the schedule kept
            pos["bad_in_a_row"] += 1
            log.log({"step": step, "skipped": f"non-finite {'loss' if bad_loss else 'gradient'}"})
            bar.write(f"[{stage.name}] step {step}: non-finite loss or gradient, update skipped")
            if pos["bad_in_a_row"] >= stage.max_bad_steps:
                last = checkpoints(stage_dir)
                raise TrainingStopped(
                    f"[{stage.name}] {pos['bad_in_a_row']} steps in a row had a non-finite loss or gradient "
                    f"(stage.max_bad_steps={stage.max_bad_steps}); stopped at step {step}. Last good checkpoint: "
                    f"{last[-1] if last else 'none'}. Try a lower stage.lr or hardware.precision=fp32.",
                    exit_code=1,
                )

    while pos["step"] < total:
        # The loss is the mean over every supervised token of the optimizer step,
        # across accumulation and processes, whatever the micro-batch split: so
        # 2 processes x b samples train exactly like 1 process x 2b.
        micro_batches = [next(stream) for _ in range(accum)]
        local_tokens = sum(len(b["target_index"]) for b in micro_batches)  # a shape: found by the collator
        step_tokens = max(1, local_tokens)
        if world > 1:  # every process's count: a small all-reduce, queued like the rest
            step_tokens = accelerator.reduce(to_device(float(local_tokens), accelerator.device), "sum").clamp(min=1)
        ce_sum = torch.zeros((), device=accelerator.device)
        for micro_step, batch in enumerate(micro_batches):
            sync = micro_step == accum - 1
            with accelerator.no_sync(model) if not sync else nullcontext():
                with accelerator.autocast():
                    out = model(batch["input_ids"], batch["pixel_values"], batch["labels"],
                                vision_features=batch.get("vision_features"), target_index=batch["target_index"])  # fmt: skip
                # DDP averages gradients over processes: scale by `world` to get the global token mean.
                loss = out.ce_loss * out.n_tokens * (world / step_tokens) + (out.loss - out.ce_loss) / accum
                accelerator.backward(loss * accum if deepspeed else loss)  # DeepSpeed divides by accum itself
            ce_sum += out.ce_loss.detach() * out.n_tokens
            pos["seen"] += batch["input_ids"].shape[0] * world
        step_loss = accelerator.reduce(ce_sum, "sum") / step_tokens
        grad_norm = accelerator.clip_grad_norm_(trainable, stage.grad_clip if stage.grad_clip > 0 else float("inf"))
        if grad_norm is None:  # DeepSpeed clips in its engine
            grad_norm = torch.zeros((), device=accelerator.device)
        bad_loss, bad_grad = ~torch.isfinite(step_loss), ~torch.isfinite(grad_norm)
        pos["step"] += 1
        done = pos["step"]
        pending.append((done, torch.stack([step_loss.float(), grad_norm.float(), bad_loss.float(), bad_grad.float()])))
        if skip_on_device:
            raw_optimizer.found_inf = (bad_loss | bad_grad).float()  # a bad step changes nothing
            optimizer.step()
        else:  # the engine's optimizer cannot skip by itself: look now
            flush()
            if not pos["bad_in_a_row"]:
                optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        eval_now = val_loader is not None and ((stage.eval_every and done % stage.eval_every == 0) or done == total)
        save_now = stage.save_every and done % stage.save_every == 0 and done < total
        if done % stage.log_every == 0 or done == total or eval_now or save_now or stop.signal is not None:
            flush()
        if lazy_parts and done % stage.log_every == 0:  # lazily read data: bad samples show up as they come
            fetched = sum(d.fetched for d in lazy_parts)
            if fetched >= 200:
                check_bad_fraction(bad, fetched - bad.total, cfg.data.max_bad_fraction)
        if (done % stage.log_every == 0 or done == total) and pos["window_n"]:
            loss = pos["window_loss"] / pos["window_n"]
            record = {
                "step": done,
                "epoch": round(pos["seen"] / len(train_ds), 3),
                "train/loss": loss,
                "train/ppl": math.exp(min(loss, 50)),
                "train/lr": scheduler.get_last_lr()[0],
                "train/aux_loss": float((out.loss - out.ce_loss).detach()),
                "train/grad_norm": last_grad_norm,
                "samples_per_s": (pos["seen"] - seen0) / (time.time() - t0),
            }
            log.log(record)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['train/lr']:.1e}")
            pos["window_loss"], pos["window_n"] = 0.0, 0
        if eval_now:
            val = validate(model, val_loader, accelerator.autocast, stage.val_batches)
            log.log({"step": done, **val})
            bar.write(f"[{stage.name}] step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
            sample_grid(raw, encoder, val_ds, stage.sample_grid, stage_dir / "samples" / f"step-{done:07d}.png",
                        f"{stage.name} step {done}", step=done, autocast=accelerator.autocast, main=main,
                        sharded=sharded, wandb_run=log.wandb)  # fmt: skip
        if save_now and not pos["bad_in_a_row"]:
            save_checkpoint(done)  # not during a run of bad steps: the last checkpoint stays a good one
        if stop.signal is not None and done < total:
            folder = save_checkpoint(done)
            bar.close()
            log.close()
            raise TrainingStopped(
                f"[{stage.name}] stopped by {stop.signal} at step {done} of {total}; checkpoint: {folder}\n"
                f"resume with: python train.py resume={cfg.paths.run_dir}",
                exit_code=0,
            )
    bar.close()
    log.close()
    accelerator.wait_for_everyone()
    out_dir = stage_dir / "model"
    weights = weights_to_save()
    truncated = [w for d in parts for w in d.truncated]  # lazily read data adds to it while training
    if main:
        (stage_dir / "bad_samples.json").write_text(
            json.dumps(
                {
                    "total": bad.total,
                    "counts": dict(bad.counts),
                    "examples": bad.examples,
                    "truncated": len(truncated),
                    "truncated_examples": truncated[:5],
                },
                indent=2,
                ensure_ascii=False,
            )  # fmt: skip
        )
        save_stage_model(raw, tokenizer, out_dir, cfg, stage, key, total, val, finished=True, state_dict=weights)
        accelerator.print(f"[{stage.name}] done in {time.time() - t0:.0f}s; model saved to {out_dir}")
    accelerator.wait_for_everyone()
    return out_dir


def check_bad_fraction(bad: BadSamples, good: int, limit: float) -> None:
    """Stop when more than `limit` of the samples are bad: the data, not a few lines, is wrong."""
    total = good + bad.total
    if bad.total and bad.total > limit * total:
        raise DataError(
            "data",
            "too many bad samples",
            f"{bad.total} of {total} samples are bad ({bad.total / total:.1%} > data.max_bad_fraction={limit}):\n"
            f"{bad.summary()}",
        )


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
