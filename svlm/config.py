"""Typed configuration: dataclass schemas and a strict conversion from the
composed Hydra/OmegaConf config.

Hydra composes YAML; `load_train_config` (and friends) turn the result into
these dataclasses, failing at start with a message naming the key when a key
is unknown, a value has the wrong type, or two settings contradict each other.
Model code receives only the small dataclasses it needs, never a DictConfig.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from svlm.data.chat import ImagePlacement
from svlm.data.embedded import embedded_spec
from svlm.errors import ConfigError
from svlm.models.language_model import LMConfig
from svlm.models.lora import LoraConfig
from svlm.models.projector import ProjectorConfig
from svlm.models.vision import VisionConfig
from svlm.tokenizer import TokenizerConfig
from svlm.typed import build, to_plain

# ---------------------------------------------------------------------- schemas


@dataclass
class ModelConfig:
    """Defaults: model=tiny (conf/model/tiny.yaml); the parts' own dataclasses
    keep the defaults model code is built with."""

    name: str = "tiny"
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(patch_size=4))
    projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(compress="pixel_shuffle", factor=4))
    lm: LMConfig = field(default_factory=lambda: LMConfig(max_seq_len=512))  # vocab_size: from the tokenizer
    # Where a user turn's images go (svlm/data/chat.py): first (before the text, whatever
    # order data or requests give) or inline (as given). Recorded with the model.
    image_placement: ImagePlacement = "first"
    # A linear read-out of each visual token's object (svlm/models/object_head.py), trained when
    # stage.object_loss > 0 on data whose records list their objects (shapes, scenes).
    object_head: bool = False

    def __post_init__(self) -> None:
        if self.vision.use_cls and self.projector.kind == "mlp" and self.projector.compress != "none":
            raise ConfigError(
                "model.vision.use_cls=true cannot be combined with model.projector.compress="
                f"{self.projector.compress}: the CLS token is not on the patch grid"
            )


# Record layouts (svlm/data/formats.py); auto: detected per file from its keys or columns.
DataFormat = Literal["auto", "svlm", "llava", "cauldron", "llava_onevision", "messages"]


@dataclass
class SourceConfig:
    """One file of a mixture (data.sources): drawn in proportion to its weight."""

    file: str  # under data.root ("{task}" becomes the stage's task): jsonl/json, parquet/arrow (glob), or a folder
    weight: float = 1.0
    image_dir: str | None = None  # None: data.image_dir
    format: DataFormat | None = None  # None: data.format
    subset: str | None = None  # a hub repository's configuration (the_cauldron's "ai2d"); None: data.subset
    split: str = "train"  # the split of a save_to_disk or hub repository folder

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ConfigError(f"data.sources: the weight of {self.file} must be positive, got {self.weight}")


@dataclass
class DataConfig:
    name: str = "shapes"
    kind: Literal["shapes", "scenes", "files"] = "shapes"  # shapes, scenes: generated here; files: your own
    root: str | None = None  # folder of the data files; shapes: null = generated under paths.cache
    # File and folder names under root; "{task}" becomes the stage's task
    # (pretrain in stage 1, sft in stage 2).
    image_dir: str = "images"  # images resolve against root/image_dir
    train_file: str = "{task}_train.jsonl"
    val_file: str | None = "{task}_val.jsonl"  # None: hold out val_fraction of the training file
    test_file: str | None = "sft_test.jsonl"  # questions scored by exact match in eval.py
    # More test files, each scored apart by eval.py under its name, e.g. {compositional: sft_test_compositional.jsonl}
    test_sets: dict[str, str] = field(default_factory=dict)
    val_fraction: float = 0.0  # used when val_file is None
    # Any of these files may also be a table (svlm/data/hub.py): parquet/arrow files or a glob of
    # them, a save_to_disk folder, or a local copy of a hub data set repository ("." for data.root itself).
    format: DataFormat = "auto"
    subset: str | None = None  # the configuration of a hub repository folder (the_cauldron's "ai2d")
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "val": "validation", "test": "test"})
    # Several training files mixed by weight instead of train_file, e.g.
    # [{file: a.jsonl, weight: 3}, {file: b.json, weight: 1, image_dir: b_images}]
    sources: list[SourceConfig] = field(default_factory=list)
    # Read jsonl records one at a time through a cached line index instead of
    # encoding every record at start: auto = for files over 100 MB.
    lazy: Literal["auto", "always", "never"] = "auto"
    # Read parquet training shards as a stream (svlm/data/streaming.py): a few row groups at a
    # time, shuffled within windows of shuffle_buffer rows, resumed exactly from a checkpoint.
    streaming: bool = False
    shuffle_buffer: int = 1000
    max_len: int = 512  # tokens, image placeholders included (the original's --fixed_len)
    max_images: int = 8  # images a sample may have (its "image" list); more: a bad sample
    shuffle: bool = True  # a new order every epoch; false: file order
    group_by_length: bool = True  # batch samples of similar length together (less padding)
    packing: bool = False  # a micro-batch's samples share rows of max_len tokens (svlm/data/packing.py)
    group_window: int = 1  # batches whose samples are sorted by length together (more: less padding, less random)
    on_error: Literal["skip", "raise"] = "skip"  # a bad sample: reported and skipped, or fatal
    max_bad_fraction: float = 0.01  # stop when more than this share of the samples is bad
    # Encoder outputs computed once and stored under paths.cache/features (svlm/data/feature_cache.py):
    # auto = when the stage keeps the vision encoder frozen; true = always (an error if it trains); false = never.
    feature_cache: bool | Literal["auto"] = "auto"
    # shapes and scenes: what to generate (svlm/data/shapes/, svlm/data/scenes/)
    n_train: int = 6000
    n_val: int = 300
    n_test: int = 600
    image_size: int = 64
    languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    seed: int = 0
    max_shapes: int = 1  # shapes only
    max_objects: int = 4  # scenes only: objects a picture, 1 to this
    n_compositional: int = 200  # scenes only: pictures of the compositional test split
    questions: int = 12  # scenes only: questions a training picture is asked

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_file is not None and self.val_fraction > 0:
            raise ConfigError("data.val_file and data.val_fraction both set: use one (set data.val_file=null)")
        if self.max_images < 1:
            raise ConfigError(f"data.max_images must be at least 1, got {self.max_images}")
        if self.streaming and self.val_fraction > 0:
            raise ConfigError(
                "data.streaming=true cannot hold out data.val_fraction of a stream: set data.val_file "
                "(a file or table read whole) and data.val_fraction=0"
            )
        if self.streaming and self.sources and len({s.weight for s in self.sources}) > 1:
            raise ConfigError(
                "data.streaming=true reads data.sources row by row, all alike: weights other than equal need "
                "random access (data.streaming=false)"
            )
        if set(self.splits) != {"train", "val", "test"}:
            raise ConfigError(f"data.splits names the split of train, val and test; got the keys {sorted(self.splits)}")
        if self.max_len < 8:
            raise ConfigError(f"data.max_len must be at least 8, got {self.max_len}")
        if self.group_window < 1:
            raise ConfigError(f"data.group_window is a number of batches (>= 1), got {self.group_window}")
        if self.kind != "files":  # the generator's own checks, at start
            embedded_spec(self.kind, dataclasses.asdict(self))


@dataclass
class StageConfig:
    name: str = "stage1"
    task: str = "pretrain"  # fills "{task}" in data file names
    # what trains
    train_vision: bool = True
    train_projector: bool = True
    unfreeze_lm_top_layers: int = -1  # top N blocks of the LM train; -1: all
    train_text_embed: bool = True  # token embeddings (and the tied lm head)
    lora: LoraConfig = field(default_factory=LoraConfig)  # r > 0: those blocks train through LoRA adapters
    # optimisation
    lr: float = 1e-3
    lr_vision: float | None = None  # None: same as lr
    lr_projector: float | None = None  # None: same as lr
    weight_decay: float = 0.0  # never applied to norms, biases and embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup: float = 0.03  # fraction of the optimizer steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    batch_size: int = 32  # samples per optimizer step (all processes, all accumulation)
    epochs: int = 2
    steps_per_epoch: int = -1  # optimizer steps an epoch; -1: one pass over the data
    max_steps: int | None = None  # stop after this many optimizer steps in all
    eval_every: int = 100  # optimizer steps between validations (0: only at the end)
    val_batches: int = 10  # at most this many batches per validation
    log_every: int = 10
    save_every: int = 100  # optimizer steps between checkpoints to resume from (0: only the final model)
    keep_last: int = 3  # checkpoints kept (0: all)
    max_bad_steps: int = 10  # stop after this many steps in a row with a non-finite loss or gradient
    sample_grid: int = 8  # validation samples answered and drawn as a PNG at each validation (0: none)
    # Benchmarks (svlm/benchmarks/) scored at each validation on their first benchmark_limit
    # questions, read from paths.benchmarks/<repository name> (MMStar, POPE, ...).
    benchmarks: list[str] = field(default_factory=list)
    benchmark_limit: int = 200
    # At each validation, up to this many validation questions of each type answered with and without
    # the picture: skills/<type> in the metrics, <run_dir>/skills.png (svlm/evaluation/skills.py); 0: none.
    skills: int = 32
    # The weight of the object head's loss (model.object_head) in this stage's loss; 0: not trained.
    object_loss: float = 0.0

    def __post_init__(self) -> None:
        from svlm.benchmarks.tasks import TASKS

        unknown = [b for b in self.benchmarks if b not in TASKS]
        if unknown:
            raise ConfigError(f"stage.benchmarks: unknown task {unknown[0]!r}; the tasks: {', '.join(TASKS)}")
        if self.benchmark_limit < 1:
            raise ConfigError(f"stage.benchmark_limit is a number of questions (>= 1), got {self.benchmark_limit}")
        if self.name not in ("stage1", "stage2"):
            raise ConfigError(f"stage.name must be stage1 or stage2, got {self.name!r}")
        positive = {"lr": self.lr, "batch_size": self.batch_size, "epochs": self.epochs}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"stage.{key} must be positive, got {value}")
        if self.steps_per_epoch == 0 or self.steps_per_epoch < -1:
            raise ConfigError(f"stage.steps_per_epoch must be positive or -1 (a full pass), got {self.steps_per_epoch}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"stage.max_steps must be positive or null, got {self.max_steps}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"stage.warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if len(self.betas) != 2:
            raise ConfigError(f"stage.betas needs two values, got {self.betas}")
        if self.lora.r and self.unfreeze_lm_top_layers == 0:
            raise ConfigError(
                "stage.lora.r > 0 adapts the LM blocks that train, but stage.unfreeze_lm_top_layers=0 trains none"
            )
        if self.sample_grid < 0:
            raise ConfigError(f"stage.sample_grid is a number of samples (0: no grid), got {self.sample_grid}")
        if self.object_loss < 0:
            raise ConfigError(f"stage.object_loss is a weight (>= 0), got {self.object_loss}")
        if self.skills < 0:
            raise ConfigError(f"stage.skills is a number of questions a type (0: none), got {self.skills}")
        if not (self.train_vision or self.train_projector or self.unfreeze_lm_top_layers or self.train_text_embed):
            raise ConfigError(
                "stage trains nothing: set stage.train_vision, stage.train_projector, "
                "stage.unfreeze_lm_top_layers or stage.train_text_embed"
            )


@dataclass
class BothStagesConfig:
    """stage=both: stage 1, then stage 2 from its result. lr, epochs, steps_per_epoch,
    max_steps, sample_grid, benchmarks and benchmark_limit, when set here, apply to both stages."""

    name: str = "both"
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=lambda: StageConfig(name="stage2", task="sft"))
    lr: float | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    max_steps: int | None = None
    sample_grid: int | None = None
    benchmarks: list[str] | None = None
    benchmark_limit: int | None = None

    def stages(self) -> list[StageConfig]:
        out = []
        shared = ("lr", "epochs", "steps_per_epoch", "max_steps", "sample_grid", "benchmarks", "benchmark_limit")
        for s in (self.stage1, self.stage2):
            changes = {k: getattr(self, k) for k in shared}
            out.append(dataclasses.replace(s, **{k: v for k, v in changes.items() if v is not None}))
        return out


@dataclass
class HardwareConfig:
    name: str = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: fp32 on CPU, bf16 (else fp16) on GPU
    micro_batch_size: int | None = 16  # samples a forward pass; None: the stage's batch size
    grad_checkpointing: bool = False
    num_workers: int = 0
    threads: int | None = None  # torch CPU threads; None: the cores other processes leave free (svlm/hardware.py)
    # The engine when launched with several processes (accelerate launch / torchrun):
    distributed: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: int = 2  # deepspeed: 2 shards optimizer states and gradients, 3 also parameters
    offload: bool = False  # deepspeed: optimizer states (and with zero_stage 3, parameters) in CPU memory
    # adamw: torch's AdamW (fused); adamw_offload: fp32 masters and moments in CPU memory,
    # bf16 weights and gradients on the GPU (svlm/training/optim.py); auto: adamw_offload
    # only when the memory estimate (python -m svlm.memory) exceeds memory_budget_gb.
    optimizer: Literal["auto", "adamw", "adamw_offload"] = "adamw"
    memory_budget_gb: float | None = None  # warn at start when the estimate exceeds it
    compile: bool = False  # torch.compile each language-model block

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"hardware.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.offload and self.distributed != "deepspeed":
            raise ConfigError("hardware.offload=true needs hardware.distributed=deepspeed")
        if self.optimizer == "adamw_offload" and self.precision in ("fp32", "fp16"):
            raise ConfigError(
                f"hardware.optimizer=adamw_offload keeps trained weights in bf16: it needs "
                f"hardware.precision=bf16 (or auto on a GPU), not {self.precision}"
            )
        if self.optimizer != "adamw" and self.distributed != "ddp":
            raise ConfigError(
                f"hardware.optimizer={self.optimizer} works with hardware.distributed=ddp; "
                f"{self.distributed} shards the optimizer itself (hardware.offload=true with deepspeed)"
            )
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise ConfigError(f"hardware.memory_budget_gb must be positive, got {self.memory_budget_gb}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError(f"hardware.micro_batch_size must be positive, got {self.micro_batch_size}")


@dataclass
class LoggerConfig:
    name: Literal["none", "wandb"] = "none"  # metrics.jsonl is always written; wandb on request
    project: str = "svlm"
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online only if logged in


@dataclass
class PathsConfig:
    outputs: str = "outputs"  # every run folder lives under here
    cache: str = ".cache"  # generated data sets and tokenizers
    run_dir: str = "outputs/run"  # this run's folder (Hydra's output dir)
    benchmarks: str | None = None  # the folder holding the benchmarks' clones (MMStar/, POPE/, ...): stage.benchmarks


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig | BothStagesConfig = field(default_factory=BothStagesConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    init_from: str | None = None  # stage 2's start: a model or run folder; None: newest stage-1 result
    seed: int = 0
    run_name: str | None = None  # names the run folder and the wandb run
    resume: str | None = None  # continue a stopped run: latest, a run folder, or a checkpoint folder

    def __post_init__(self) -> None:
        if self.model.lm.path is not None and self.tokenizer.path is None:
            self.tokenizer.path = self.model.lm.path  # a pretrained language model reads with its own tokenizer
        for stage in self.stages():
            if stage.object_loss > 0:
                check_object_head(self.model, stage)

    def stages(self) -> list[StageConfig]:
        return self.stage.stages() if isinstance(self.stage, BothStagesConfig) else [self.stage]


@dataclass
class EvalConfig:
    ckpt: str | None = None  # a model or run folder; None: the newest finished model
    data: DataConfig | None = None  # None: the data the model was trained on
    # data.<key>=<value> given without data=<option>: set on top of the model's own data (svlm/cli.py moves them here)
    data_overlay: dict[str, Any] = field(default_factory=dict)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task: str = "sft"  # fills "{task}" in the data's file names
    batch_size: int = 64
    steps: int = -1  # validation batches for loss/perplexity; -1: all (the original's --steps_per_epoch)
    max_new_tokens: int = 32
    max_test: int | None = None  # score at most this many questions
    max_answer_tokens: int = 16  # only answers this short are scored by exact match
    blind: bool = True  # also score every question with a blank picture (svlm/evaluation/baselines.py)
    benchmark: BenchmarkConfig | None = None  # a benchmark instead of the data's loss and accuracy


@dataclass
class BenchmarkConfig:
    """eval.py benchmark=<task>: a benchmark of svlm/benchmarks/tasks.py on a local copy of its data set."""

    name: str | None = None  # mmstar, pope, mme, scienceqa_img, ai2d
    path: str | None = None  # the local copy (git clone) of the task's hub repository
    limit: int | None = None  # the first N questions only (null: all)
    max_new_tokens: int | None = None  # null: the task's (lmms-eval's generation_kwargs)

    def __post_init__(self) -> None:
        from svlm.benchmarks.tasks import TASKS

        if self.name not in TASKS:
            raise ConfigError(f"benchmark={self.name}: unknown task; the tasks: {', '.join(TASKS)}")
        if self.path is None:
            raise ConfigError(f"benchmark.path is required: {TASKS[self.name].layout}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"benchmark.limit must be at least 1 (or null: all), got {self.limit}")


@dataclass
class InferConfig:
    ckpt: str | None = None
    image: str | None = None
    images: list[str] = field(default_factory=list)  # several: the k-th fills the prompt's k-th <image>
    prompt: str = "What is in this picture?"
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int = 0
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.image is not None and self.images:
            raise ConfigError("image= and images= both set: give one image, or all of them in images=[a.jpg,b.jpg]")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def check_object_head(model: ModelConfig, stage: StageConfig) -> None:
    """stage.object_loss needs an object head on a square grid of visual tokens, one view a picture."""
    key = f"stage.object_loss={stage.object_loss} ({stage.name})"
    if not model.object_head:
        raise ConfigError(f"{key} trains the object head: set model.object_head=true")
    if model.projector.kind != "mlp" or model.vision.tiles is not None or model.vision.use_cls:
        raise ConfigError(
            f"{key} labels each visual token by its patch of the picture: it needs model.projector.kind=mlp, "
            "no model.vision.tiles and model.vision.use_cls=false"
        )


def load_train_config(cfg: Any) -> TrainConfig:
    return build(TrainConfig, to_plain(cfg))


def load_eval_config(cfg: Any) -> EvalConfig:
    return build(EvalConfig, to_plain(cfg))


def load_infer_config(cfg: Any) -> InferConfig:
    return build(InferConfig, to_plain(cfg))
