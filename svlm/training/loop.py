"""The training loop, explicit: set up a stage, step, validate, save.

    train(cfg)            every stage the config asks for, in order
      run_stage(...)      one stage: model, data, optimizer, the loop, the final model

Everything a run writes goes under cfg.paths.run_dir:

    <run_dir>/config.yaml              the resolved, typed config
    <run_dir>/<stage>/metrics.jsonl    one JSON object per logged step / validation
    <run_dir>/<stage>/bad_samples.json what the data loader skipped, by reason
    <run_dir>/<stage>/checkpoints/     periodic model folders (stage.save_every)
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
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from svlm.checkpoint import load_model, model_key, resolve_model, save_model
from svlm.config import ConfigError, HardwareConfig, StageConfig, TrainConfig
from svlm.data.chat import ChatEncoder
from svlm.data.dataset import Collator
from svlm.data.formats import BadSamples
from svlm.data.source import data_root, load_splits, split_file
from svlm.evaluation import validate
from svlm.models.vision import ImageProcessor, sync_with_checkpoint
from svlm.models.vlm import VLM, VLMConfig
from svlm.tokenizer import tokenizer_for_data
from svlm.training.optim import lr_factor, make_optimizer, set_trainable

# ------------------------------------------------------------------- hardware


def make_accelerator(hw: HardwareConfig) -> Accelerator:
    if hw.threads:
        torch.set_num_threads(hw.threads)
    cuda = torch.cuda.is_available() and hw.device != "cpu"
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware.device=cuda but no CUDA GPU is available (use hardware=cpu or hardware=auto)")
    precision = hw.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    return Accelerator(cpu=not cuda, mixed_precision={"fp32": "no"}.get(precision, precision))


class EpochSampler(Sampler[int]):
    """A fresh permutation of the data each epoch, from (seed, epoch); file order without shuffle."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.epoch, self.shuffle = n, seed, 0, shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


# ---------------------------------------------------------------------- logging


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
    import netrc
    import os

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


# ------------------------------------------------------------------------ stage


def build_model(cfg: TrainConfig, tokenizer) -> VLM:
    vision = sync_with_checkpoint(dataclasses.replace(cfg.model.vision))
    lm = dataclasses.replace(cfg.model.lm, vocab_size=len(tokenizer))
    vlm_cfg = VLMConfig(
        vision=vision, projector=cfg.model.projector, lm=lm, image_token_id=tokenizer.convert_tokens_to_ids("<image>")
    )
    return VLM(vlm_cfg)


def run_stage(cfg: TrainConfig, stage: StageConfig, accelerator: Accelerator, init: Path | None, root: Path) -> Path:
    """Train one stage; returns the folder of the finished model."""
    main = accelerator.is_main_process
    stage_dir = Path(cfg.paths.run_dir) / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    key = model_key(dataclasses.asdict(cfg.model))
    train_file = split_file(cfg.data, root, "train", stage.task)

    if init is not None:
        model, tokenizer, meta = load_model(init)
        if meta.get("model_key") != key:
            raise ConfigError(
                f"init_from={str(init)!r} holds a model of config {meta.get('model')!r} (key {meta.get('model_key')}), "
                f"but model={cfg.model.name} has key {key}: start from a model trained with the same model config"
            )
        accelerator.print(f"[{stage.name}] starting from {init}")
    else:
        tokenizer = tokenizer_for_data(cfg.tokenizer, [train_file])
        model = build_model(cfg, tokenizer)
    for w in set_trainable(model, stage, fresh=init is None):
        accelerator.print(f"[{stage.name}] note: {w}")
    if cfg.hardware.grad_checkpointing:  # recompute activations block by block in the backward pass
        model.lm.gradient_checkpointing = True
        if stage.train_vision:
            model.vision.dinov2.gradient_checkpointing_enable()

    encoder = ChatEncoder(tokenizer, model.num_image_tokens)
    processor = ImageProcessor(model.cfg.vision)
    collate = Collator(encoder.pad_id)
    bad = BadSamples()
    max_len = min(cfg.data.max_len, model.cfg.lm.max_seq_len)
    train_ds, val_ds = load_splits(cfg.data, root, stage.task, encoder, processor, max_len, bad, cfg.seed)

    micro = cfg.hardware.micro_batch_size or stage.batch_size
    world = accelerator.num_processes
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

    sampler = EpochSampler(len(train_ds), cfg.seed, cfg.data.shuffle)
    loader = DataLoader(
        train_ds,
        batch_size=micro,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.hardware.num_workers,
        drop_last=len(train_ds) >= micro,
    )
    val_loader = (
        DataLoader(val_ds, batch_size=micro, collate_fn=collate, num_workers=cfg.hardware.num_workers)
        if val_ds
        else None
    )
    optimizer = make_optimizer(model, stage)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, stage.warmup, stage.min_lr_ratio)
    )
    # The scheduler counts optimizer steps itself: not prepared (accelerate would
    # step it once per process).
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    raw = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]

    n_params = sum(p.numel() for p in raw.parameters())
    n_train = sum(p.numel() for p in trainable)
    accelerator.print(
        f"[{stage.name}] {n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained; "
        f"{len(train_ds)} samples, {total} steps of {stage.batch_size} ({micro} x {accum} accumulation x {world})"
    )
    if bad.total:
        accelerator.print(f"[{stage.name}] {bad.summary()}")
    log = MetricsLog(stage_dir / "metrics.jsonl", cfg, stage.name, main)

    def batches():  # endless: a new order each pass over the data
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()
    model.train()
    bar = tqdm(total=total, desc=stage.name, disable=not main, dynamic_ncols=True)
    t0, seen, window_loss, window_n = time.time(), 0, 0.0, 0
    val = {}
    for step in range(total):
        for micro_step in range(accum):
            batch = next(stream)
            sync = micro_step == accum - 1
            with accelerator.no_sync(model) if not sync else nullcontext():
                with accelerator.autocast():
                    out = model(batch["input_ids"], batch["pixel_values"], batch["labels"])
                accelerator.backward(out.loss / accum)
            window_loss += float(out.ce_loss.detach()) / accum
            seen += batch["input_ids"].shape[0] * world
        grad_norm = accelerator.clip_grad_norm_(trainable, stage.grad_clip) if stage.grad_clip > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_n += 1
        bar.update(1)
        done = step + 1
        if done % stage.log_every == 0 or done == total:
            loss = window_loss / window_n
            record = {
                "step": done,
                "epoch": round(seen / len(train_ds), 3),
                "train/loss": loss,
                "train/ppl": math.exp(min(loss, 50)),
                "train/lr": scheduler.get_last_lr()[0],
                "train/aux_loss": float((out.loss - out.ce_loss).detach()),
                "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                "samples_per_s": seen / (time.time() - t0),
            }
            log.log(record)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['train/lr']:.1e}")
            window_loss, window_n = 0.0, 0
        if val_loader is not None and ((stage.eval_every and done % stage.eval_every == 0) or done == total):
            val = validate(model, val_loader, accelerator.autocast, stage.val_batches)
            log.log({"step": done, **val})
            bar.write(f"[{stage.name}] step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
        if stage.save_every and done % stage.save_every == 0 and done < total and main:
            _save(
                raw,
                tokenizer,
                stage_dir / "checkpoints" / f"step-{done:07d}",
                cfg,
                stage,
                key,
                done,
                val,
                finished=False,
            )
    bar.close()
    log.close()
    accelerator.wait_for_everyone()
    out_dir = stage_dir / "model"
    if main:
        (stage_dir / "bad_samples.json").write_text(
            json.dumps(
                {"total": bad.total, "counts": dict(bad.counts), "examples": bad.examples}, indent=2, ensure_ascii=False
            )
        )
        _save(raw, tokenizer, out_dir, cfg, stage, key, total, val, finished=True)
        accelerator.print(f"[{stage.name}] done in {time.time() - t0:.0f}s; model saved to {out_dir}")
    accelerator.wait_for_everyone()
    return out_dir


def _save(model, tokenizer, folder, cfg, stage, key, step, val, finished):
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
    save_model(folder, model, tokenizer, meta)


# ------------------------------------------------------------------------ train


def train(cfg: TrainConfig) -> list[Path]:
    """Run every stage the config asks for; returns the finished model folders."""
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg.hardware)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))
    stages = cfg.stages()
    key = model_key(dataclasses.asdict(cfg.model))
    root = data_root(cfg.data, cfg.paths.cache)
    init: Path | None = None
    if cfg.init_from is not None:
        init = resolve_model(cfg.init_from, cfg.paths.outputs, key="init_from")
    elif stages[0].name == "stage2":
        try:
            init = resolve_model(None, cfg.paths.outputs, key="init_from", stage="stage1", model=key)
        except FileNotFoundError as e:
            raise ConfigError(
                f"stage=stage2 needs a stage-1 model to start from, and {e}. "
                f"Run `python train.py stage=stage1 model={cfg.model.name}` first, or pass init_from=<model folder>."
            ) from None
    results = []
    for stage in stages:
        set_seed(cfg.seed)
        init = run_stage(cfg, stage, accelerator, init, root)
        results.append(init)
    accelerator.end_training()
    return results
