"""Setting up one stage of training: what `fit` and `finish` (training/loop.py) use.

prepare(...) -> StageRun
  start_model          the model (from a checkpoint, a stage-1 model, or new) and what trains
  load_splits          the training and validation data (svlm/data/source.py)
  batch_plan           micro-batch, accumulation, optimizer steps
  make_loaders         the epoch sampler and the loaders
  cache_features       a frozen encoder's features, for the samples this run reads
  make_optimizer_and_schedule
  accelerator.prepare  then `restore` (resume) and `announce`
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader

import svlm
from svlm.benchmarks.task import Questions
from svlm.benchmarks.tasks import TASKS
from svlm.config import ConfigError, StageConfig, TrainConfig
from svlm.data.chat import ChatEncoder, chat_format_of
from svlm.data.dataset import ChatDataset, Collator, MixedDataset
from svlm.data.drawing import object_classes
from svlm.data.feature_cache import attach as attach_features
from svlm.data.feature_cache import cache_applies
from svlm.data.formats import BadSamples, check_bad_fraction
from svlm.data.packing import PackingCollator
from svlm.data.sampler import EpochSampler
from svlm.data.source import load_splits, split_file, train_files
from svlm.data.streaming import DeviceLoader, StreamingChatDataset
from svlm.evaluation.evaluate import shard
from svlm.evaluation.skills import QuestionSet, skill_questions
from svlm.hardware import THREADS
from svlm.memory import CONTEXT_GIB, choose_optimizer
from svlm.model_folder import load_model, model_key
from svlm.models.lora import ADAPTERS, is_adapter, load_adapters
from svlm.models.packed_attention import end_to_end, packed_kernel
from svlm.models.pretrained import eos_ids, pretrained_lm
from svlm.models.vision import ImageProcessor, sync_with_checkpoint
from svlm.models.vlm import VLM, VLMConfig
from svlm.tokenizer import tokenizer_for_data
from svlm.training.checkpoint import ENGINE_STATE, load_trainer_state, set_rng_state
from svlm.training.metrics import truncate_metrics
from svlm.training.optim import OffloadAdamW, lr_factor, make_optimizer, set_trainable
from svlm.training.signals import TrainingStopped


def build_model(cfg: TrainConfig, tokenizer) -> VLM:
    vision = sync_with_checkpoint(dataclasses.replace(cfg.model.vision))
    pretrained = pretrained_lm(cfg.model.lm, len(tokenizer)) if cfg.model.lm.path else None
    lm = pretrained.cfg if pretrained else dataclasses.replace(cfg.model.lm, vocab_size=len(tokenizer))
    vlm_cfg = VLMConfig(
        vision=vision,
        projector=cfg.model.projector,
        lm=lm,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_placement=cfg.model.image_placement,
        chat_format=chat_format_of(tokenizer),
        stop_ids=eos_ids(cfg.model.lm.path) if cfg.model.lm.path else [],
        object_classes=object_classes() if cfg.model.object_head else [],
    )
    return VLM(vlm_cfg, lm=pretrained)


def sources(train_ds) -> list:
    """The training data sets: a mixture's sources, or the one data set."""
    return train_ds.datasets if isinstance(train_ds, MixedDataset) else [train_ds]


@dataclass
class Position:
    """Where the loop stands; all of it goes into a checkpoint's trainer state."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches read in this epoch, by every process together / world
    seen: int = 0  # samples trained on, all processes
    window_loss: float = 0.0  # sum of the step losses since the last logged line
    window_n: int = 0
    bad_in_a_row: int = 0  # steps in a row with a non-finite loss or gradient


@dataclass
class StageRun:
    """One stage, set up by `prepare`, trained by `fit`, saved by `finish`."""

    cfg: TrainConfig
    stage: StageConfig
    accelerator: Accelerator
    dir: Path  # <run_dir>/<stage>
    key: str  # the model config's key (svlm.model_folder.model_key)
    model: torch.nn.Module  # as accelerate prepared it (wrapped under DDP/FSDP/DeepSpeed)
    raw: VLM  # the model itself
    tokenizer: object
    encoder: ChatEncoder
    train_ds: object
    val_ds: object | None
    bad: BadSamples
    sampler: EpochSampler
    loader: DataLoader
    val_loader: DataLoader | None
    optimizer: object  # as accelerate prepared it
    scheduler: torch.optim.lr_scheduler.LambdaLR
    micro: int  # samples a forward pass
    accum: int  # micro-batches an optimizer step, per process
    total: int  # optimizer steps of the stage
    pos: Position = field(default_factory=Position)
    val: dict = field(default_factory=dict)  # the latest validation figures
    started: float = field(default_factory=time.time)
    benchmarks: dict = field(default_factory=dict)  # stage.benchmarks: name -> Questions, opened once
    skills: QuestionSet | None = None  # stage.skills: the validation questions scored per type

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def sharded(self) -> bool:  # FSDP and DeepSpeed shard weights and optimizer states (on a GPU)
        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    @property
    def offloaded(self) -> bool:
        return isinstance(self.optimizer.optimizer, OffloadAdamW)

    @property
    def parts(self) -> list:
        return sources(self.train_ds)

    @property
    def lazy_parts(self) -> list:
        return [d for d in self.parts if d.lazy]


def prepare(cfg, stage, accelerator, init, root, stop, resume) -> StageRun:
    """Model, data, batch plan, feature cache, optimizer and schedule, all
    prepared by accelerate, and the trainer state of `resume` restored."""
    stage_dir = Path(cfg.paths.run_dir) / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    key = model_key(dataclasses.asdict(cfg.model))
    model, tokenizer = start_model(cfg, stage, accelerator, init, root, resume, key)
    encoder = ChatEncoder.for_model(tokenizer, model)
    processor = ImageProcessor(model.cfg.vision)
    bad = BadSamples()
    max_len = min(cfg.data.max_len, model.cfg.lm.max_seq_len)
    check_tile_budget(encoder, max_len)
    benchmarks = open_benchmarks(cfg, stage)
    train_ds, val_ds = load_splits(cfg.data, root, stage.task, encoder, processor, max_len, bad, cfg.seed)
    if not any(d.lazy for d in sources(train_ds)):  # every record was read: judge the data now
        check_bad_fraction(bad, len(train_ds) + (len(val_ds) if val_ds else 0), cfg.data.max_bad_fraction)
    micro, accum, total = batch_plan(cfg, stage, accelerator.num_processes, len(train_ds))
    grid = math.isqrt(model.num_image_tokens) if stage.object_loss > 0 else None  # the object head's labels
    sampler, loader, val_loader = make_loaders(cfg, stage, accelerator, train_ds, val_ds, encoder.pad_id, micro, grid)
    if cfg.data.packing:
        device, n = accelerator.device, cfg.data.max_len
        layout = "go end to end in one row (no padding)" if end_to_end(device, n) else "share rows"
        accelerator.print(f"[{stage.name}] packing: each micro-batch's samples {layout}, each sample at most "
                          f"data.max_len={n} tokens; attention: {packed_kernel(device, n)}")  # fmt: skip
    state = load_trainer_state(resume) if resume is not None else None
    unsupported = (
        "data.streaming=true" if cfg.data.streaming else "model.vision.tiles" if cfg.model.vision.tiles else None
    )
    if cache_applies(cfg.data.feature_cache, stage.train_vision, stage.name, unsupported):
        cache_features(cfg, stage, accelerator, model, processor, (train_ds, val_ds), sampler, state, total, micro,
                       loader.drop_last, stop)  # fmt: skip
    optimizer, scheduler = make_optimizer_and_schedule(cfg, stage, accelerator, model, micro, accum, total, tokenizer)
    # The scheduler counts optimizer steps itself: not prepared (accelerate would step it once per process).
    if isinstance(train_ds, StreamingChatDataset):  # it shards itself: accelerate prepares the rest
        prepared, optimizer = accelerator.prepare(model, optimizer)
    else:
        prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    run = StageRun(cfg, stage, accelerator, stage_dir, key, prepared, accelerator.unwrap_model(prepared), tokenizer,
                   encoder, train_ds, val_ds, bad, sampler, loader, val_loader, optimizer, scheduler, micro, accum,
                   total)  # fmt: skip
    if state is not None:
        restore(run, state, resume)
    run.benchmarks = benchmarks
    if val_ds is not None and cfg.data.val_file is not None:
        run.skills = skill_questions(split_file(cfg.data, root, "val", stage.task), encoder, processor, max_len,
                                     stage.skills)  # fmt: skip
    announce(run, max_len)
    return run


def open_benchmarks(cfg: TrainConfig, stage: StageConfig) -> dict[str, Questions]:
    """stage.benchmarks: each one's questions, opened from paths.benchmarks now (a missing clone
    stops the run before its first step) and read at every validation."""
    if not stage.benchmarks:
        return {}
    if cfg.paths.benchmarks is None:
        raise ConfigError(
            f"stage.benchmarks={stage.benchmarks} needs paths.benchmarks=<folder> (or $SVLM_BENCHMARKS) holding "
            f"their clones: {', '.join(TASKS[b].folder for b in stage.benchmarks)}"
        )
    return {
        name: Questions(TASKS[name], Path(cfg.paths.benchmarks) / TASKS[name].folder)  # a ConfigError if wrong
        for name in stage.benchmarks
    }


def check_tile_budget(encoder: ChatEncoder, max_len: int) -> None:
    """With tiles, an image of the largest grid must leave room for text within max_len."""
    tiling = encoder.tiling
    if tiling is None or tiling.max_views == 1:
        return
    worst = len(encoder.image_ids((tiling.rows, tiling.cols)))
    if worst >= max_len - 16:
        raise ConfigError(
            f"model.vision.tiles=[{tiling.rows}, {tiling.cols}]: an image of that grid takes {worst} tokens "
            f"({tiling.max_views} views of {encoder.num_image_tokens} and their separators), leaving no room for "
            f"text in data.max_len={max_len}: raise data.max_len (and model.lm.max_seq_len) or use fewer tiles"
        )


def start_model(cfg, stage, accelerator, init, root, resume, key) -> tuple[VLM, object]:
    """The model (loaded from `resume` or `init`, else built with a tokenizer for the
    data), with what trains set and gradient checkpointing as hardware asks."""
    start = resume or init
    if start is not None:
        model, tokenizer, meta = load_model(start, merge_adapters=resume is None)  # a resume adds them back
        if meta.get("model_key") != key:
            what = "resume" if resume else "init_from"
            raise ConfigError(
                f"{what}={str(start)!r} holds a model of config {meta.get('model')!r} (key {meta.get('model_key')}), "
                f"but model={cfg.model.name} has key {key}: start from a model trained with the same model config"
            )
        accelerator.print(f"[{stage.name}] {'resuming' if resume else 'starting'} from {start}")
    else:
        tokenizer = tokenizer_for_data(cfg.tokenizer, tokenizer_files(cfg, stage, root))
        model = build_model(cfg, tokenizer)
    for w in set_trainable(model, stage, fresh=start is None):
        accelerator.print(f"[{stage.name}] note: {w}")
    if resume is not None and stage.lora.r:
        restore_adapters(model, resume)
    if cfg.hardware.grad_checkpointing:  # recompute activations block by block in the backward pass
        model.lm.gradient_checkpointing = True
        if stage.train_vision:
            model.vision.dinov2.gradient_checkpointing_enable()
    return model, tokenizer


def tokenizer_files(cfg: TrainConfig, stage: StageConfig, root: Path) -> list:
    """What our BPE learns from: the training files of every task the data has
    (stage 1's captions and stage 2's questions; a stage-1 model's tokenizer
    serves its stage 2 too). Learned from captions alone, the questions' words
    came out in pieces: the scenes questions took 38% more tokens."""
    found = {}
    for task in dict.fromkeys([stage.task, *(s.task for s in cfg.stages()), "pretrain", "sft"]):
        try:
            files = train_files(cfg.data, root, task)
        except ConfigError:  # the data has no file for this task
            if task == stage.task:
                raise
            continue
        for f in files:
            found.setdefault(f.path, f)
    return list(found.values())


def restore_adapters(model: VLM, checkpoint: Path) -> None:
    """The LoRA adapters of a checkpoint, into the ones set_trainable added."""
    found = load_adapters(checkpoint)
    if found is None:
        raise ConfigError(f"resume={checkpoint}: no LoRA adapters there ({ADAPTERS}), but the stage trains with them")
    missing, unexpected = model.load_state_dict(found[0], strict=False)
    missing = [k for k in missing if is_adapter(k)]
    if missing or unexpected:
        raise ConfigError(f"{checkpoint / ADAPTERS}: adapters that do not fit: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")  # fmt: skip


def batch_plan(cfg: TrainConfig, stage: StageConfig, world: int, n_samples: int) -> tuple[int, int, int]:
    """(micro-batch, accumulation, optimizer steps). A micro-batch is at most a
    process's share of the batch (hardware.micro_batch_size is a ceiling:
    stage.batch_size=8 on one process runs in one pass of 8)."""
    micro = min(cfg.hardware.micro_batch_size or stage.batch_size, max(1, stage.batch_size // world))
    if stage.batch_size % (micro * world):
        raise ConfigError(
            f"stage.batch_size={stage.batch_size} is not a multiple of hardware.micro_batch_size={micro} "
            f"x {world} process(es)"
        )
    steps_per_epoch = stage.steps_per_epoch if stage.steps_per_epoch > 0 else math.ceil(n_samples / stage.batch_size)
    total = stage.epochs * steps_per_epoch
    if stage.max_steps is not None:
        total = min(total, stage.max_steps)
    return micro, stage.batch_size // (micro * world), total


def make_loaders(cfg, stage, accelerator, train_ds, val_ds, pad_id: int, micro: int, object_grid: int | None = None):
    """(sampler, training loader, validation loader or None); each process
    validates its own shard, and validate() adds the sums up."""
    collate = Collator(pad_id, object_grid)
    flat = end_to_end(accelerator.device, cfg.data.max_len)
    train_collate = (
        PackingCollator(pad_id, cfg.data.max_len, flat, object_grid) if cfg.data.packing else collate
    )  # validation: unpacked
    workers = cfg.hardware.num_workers
    # Each loader seeds its workers from its own generator: starting an epoch (as a resume does
    # mid-epoch) takes nothing from the global RNG, which dropout (LoRA's) draws from.
    own = lambda: torch.Generator().manual_seed(cfg.seed)  # noqa: E731
    val_loader = None
    if val_ds is not None:
        val_part = shard(val_ds, accelerator.process_index, accelerator.num_processes)
        val_loader = DataLoader(val_part, batch_size=micro, collate_fn=collate, num_workers=workers, generator=own())
    if isinstance(train_ds, StreamingChatDataset):  # the stream is its own sampler (start_at, set_epoch)
        train_ds.shard_for(accelerator.process_index, accelerator.num_processes, workers, micro, cfg.seed,
                           cfg.data.shuffle, cfg.data.shuffle_buffer)  # fmt: skip
        loader = DataLoader(train_ds, batch_size=micro, collate_fn=train_collate, num_workers=workers,
                            generator=own())  # fmt: skip
        return train_ds, DeviceLoader(loader, accelerator.device), val_loader
    mixed = isinstance(train_ds, MixedDataset)
    lengths = train_ds.lengths() if cfg.data.group_by_length and isinstance(train_ds, ChatDataset) else None
    sampler = EpochSampler(
        len(train_ds), cfg.seed, cfg.data.shuffle, *((train_ds.sizes, train_ds.weights) if mixed else (None, None)),
        lengths=lengths, group=stage.batch_size, window=cfg.data.group_window,
    )  # fmt: skip
    loader = DataLoader(train_ds, batch_size=micro, sampler=sampler, collate_fn=train_collate, num_workers=workers,
                        drop_last=len(train_ds) >= micro, generator=own())  # fmt: skip
    return sampler, loader, val_loader


def cache_features(cfg, stage, accelerator, model, processor, datasets, sampler, state, total, micro, drop_last, stop):
    """A frozen encoder: the features of the images this run reads are computed
    once (on the main process), then read from disk, for training and validation
    (the sample grid reads pixels). A stop request ends the fill, and the stage."""
    train_ds, val_ds = datasets
    at = state["position"] if state else {"step": 0, "epoch": 0, "samples_in_epoch": 0}
    sampler.start_at(at["epoch"], at["samples_in_epoch"])
    draws = (total - at["step"] + 1) * stage.batch_size  # one batch to spare
    plan = [("training", train_ds, sampler.ahead(at["epoch"], draws, micro, drop_last))]
    if val_ds is not None:  # validate() reads the first val_batches micro-batches of each shard
        plan.append(
            ("validation", val_ds, range(min(len(val_ds), stage.val_batches * micro * accelerator.num_processes)))
        )
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


def make_optimizer_and_schedule(cfg, stage, accelerator, model, micro, accum, total, tokenizer):
    """The optimizer the memory plan chooses (printed, with a warning over budget)
    and warm-up then cosine over the stage's optimizer steps."""
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, stage.warmup, stage.min_lr_ratio)
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # the engine accumulates and clips itself
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["gradient_accumulation_steps"] = accum
        ds_config["gradient_clipping"] = stage.grad_clip
        ds_config["train_micro_batch_size_per_gpu"] = micro
    return optimizer, scheduler


def restore(run: StageRun, state: dict, resume: Path) -> None:
    """Optimizer, schedule, scaler, RNG and data position of a checkpoint. The
    data position is kept in samples, so a run may resume with another number
    of processes or micro-batch (stage.batch_size stays the same)."""
    if state["optimizer"] is None:  # sharded: each process's part, saved by accelerate
        run.accelerator.load_state(str(resume / ENGINE_STATE))
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") is not None and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    if isinstance(run.train_ds, StreamingChatDataset) and state.get("stream") != run.train_ds.layout():
        raise ConfigError(
            f"resume={resume}: the stream was read as {state.get('stream')}, now {run.train_ds.layout()}: an exact "
            "resume of data.streaming needs the same processes x hardware.num_workers, micro-batch, seed and data"
        )
    position = dict(state["position"])
    done_in_epoch = position.pop("samples_in_epoch")
    run.pos = Position(**position)
    run.pos.batch = done_in_epoch // (run.micro * run.world)
    run.sampler.start_at(run.pos.epoch, done_in_epoch)
    if run.main:
        truncate_metrics(run.dir / "metrics.jsonl", run.pos.step)


def announce(run: StageRun, max_len: int) -> None:
    """What the stage trains on, printed once."""
    p, name = run.accelerator.print, run.stage.name
    n_params = sum(x.numel() for x in run.raw.parameters())
    n_train = sum(x.numel() for x in run.model.parameters() if x.requires_grad)
    p(f"[{name}] {n_params / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained; {len(run.train_ds)} samples, "
      f"{run.total} steps of {run.stage.batch_size} ({run.micro} x {run.accum} accumulation x {run.world})")  # fmt: skip
    if run.accelerator.device.type == "cpu":
        p(f"[{name}] CPU: {THREADS.describe()}, waiting {svlm.WAIT_POLICY}")
    tiling = run.encoder.tiling
    if tiling is not None:
        p(f"[{name}] tiles: up to {tiling.rows} x {tiling.cols} of {tiling.size} px and a thumbnail; an image takes "
          f"{run.encoder.num_image_tokens} to {len(run.encoder.image_ids((tiling.rows, tiling.cols)))} tokens")  # fmt: skip
    if run.bad.total:
        p(f"[{name}] {run.bad.summary()}")
    truncated = [w for d in run.parts for w in d.truncated]
    if truncated:
        p(f"[{name}] {len(truncated)} sample(s) cut to data.max_len={max_len} (their image and some answers fit), "
          f"e.g. {truncated[0]}")  # fmt: skip
