"""How much memory a training stage needs, worked out before it runs:

    python -m svlm.memory model=base stage=stage2 hardware=8gb
    python -m svlm.memory experiment=svlm stage=stage2 hardware=8gb data.max_len=512

Takes train.py's overrides. For each stage it prints the parameters (all and
trained) and the device memory for weights, gradients, optimizer states and
activations at the configured micro-batch and sequence length (data.max_len,
the longest a batch can be), and whether that fits hardware.memory_budget_gb.
Training prints the same table at the start of each stage.

How it counts:
- Weights, gradients and optimizer states from the parameter count of the
  configured model, built on PyTorch's meta device (no memory, no compute):
  fp32 weights; for what trains, fp32 gradients and AdamW's two fp32 moments.
  With hardware.optimizer=adamw_offload the trained weights and their
  gradients are bf16 on the device and the fp32 masters and moments sit in
  CPU memory (svlm/training/optim.py OffloadAdamW).
- Activations by measurement rather than by formula: the model is built with
  one and with two layers of the language model and of the vision encoder at
  their real widths, one and two samples of the full length go forward (on
  the GPU when there is one, else the CPU) in the configured precision, and PyTorch's saved-tensor hooks add up what
  autograd keeps for the backward pass (the bf16 copies autocast makes of fp32
  weights included). Every term is linear in layers and samples, so six small
  forward passes give the full depth and the micro-batch. With gradient
  checkpointing a layer keeps only its input, plus one layer recomputed at a
  time during the backward pass.
- The backward pass starts with the gradient of the logits (fp32, plus its
  bf16 copy under autocast) beside every activation. The loss computes logits
  only where a supervised token follows, so at most at every text position:
  that worst case is counted, here and in the activations.
- Gradients of a step exist while the next micro-batch runs forward when a
  step accumulates several micro-batches; with one micro-batch a step, the
  backward pass frees activations as it makes gradients, so the larger of the
  two counts.
Not counted: the CUDA context (about 0.5 GiB outside PyTorch's allocator) and
the allocator's fragmentation; `fits` leaves CONTEXT_GIB for them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Dinov2Config

from svlm.config import StageConfig, TrainConfig
from svlm.hardware import planned_device, resolve_precision
from svlm.models.language_model import LMConfig
from svlm.models.lora import is_adapter
from svlm.models.pretrained import sync_with_checkpoint
from svlm.models.vision import dinov2_config_of
from svlm.models.vlm import IGNORE_INDEX, VLM, VLMConfig

GIB = 2**30
CONTEXT_GIB = 0.75  # the CUDA context and fragmentation, outside the estimate


@dataclass
class MemoryEstimate:
    stage: str
    params: int
    trained: int
    micro_batch: int
    seq_len: int
    precision: str
    optimizer: str
    checkpointing: bool
    accumulating: bool
    weights: float  # bytes on the device
    grads: float
    optimizer_states: float
    activations: float
    loss_grad: float  # the logits' gradient at the start of the backward pass
    cpu_states: float  # bytes in CPU memory (adamw_offload)

    @property
    def total(self) -> float:
        """Peak bytes on the device during a step."""
        busy = self.activations + self.loss_grad
        busy = busy + self.grads if self.accumulating else max(busy, self.grads)
        return self.weights + self.optimizer_states + busy

    def fits(self, budget_gb: float | None) -> bool:
        return budget_gb is None or self.total / GIB + CONTEXT_GIB <= budget_gb

    def table(self) -> str:
        rows = [
            ("weights", self.weights),
            ("gradients", self.grads),
            ("optimizer states", self.optimizer_states),
            ("activations", self.activations),
            ("logits gradient", self.loss_grad),
        ]
        lines = [
            f"[{self.stage}] memory estimate: {self.params / 1e6:.1f}M parameters, {self.trained / 1e6:.1f}M trained; "
            f"micro-batch {self.micro_batch} x {self.seq_len} tokens, {self.precision}, "
            f"{self.optimizer}{', gradient checkpointing' if self.checkpointing else ''}"
        ]
        lines += [f"  {name:<17} {b / GIB:7.2f} GiB" for name, b in rows]
        lines.append(f"  {'peak (estimate)':<17} {self.total / GIB:7.2f} GiB")
        if self.cpu_states:
            lines.append(f"  {'CPU memory':<17} {self.cpu_states / GIB:7.2f} GiB (fp32 masters and AdamW moments)")
        return "\n".join(lines)


def dinov2_config(cfg: TrainConfig) -> Dinov2Config:
    """The encoder's shape: from model.vision.path when it is there, else the config's fields."""
    v = cfg.model.vision
    if v.path is not None and (Path(v.path) / "config.json").is_file():
        return Dinov2Config.from_pretrained(v.path)
    return dinov2_config_of(v)


def _vlm(cfg: TrainConfig, vocab: int, lm_layers: int | None = None, vis_layers: int | None = None) -> VLM:
    dino = dinov2_config(cfg)
    if vis_layers is not None:
        shape = {k: v for k, v in dino.to_dict().items() if k not in ("out_features", "out_indices", "stage_names")}
        dino = Dinov2Config(**{**shape, "num_hidden_layers": vis_layers})
    vision = dataclasses.replace(cfg.model.vision, path=None, num_layers=dino.num_hidden_layers, feature_layer=None)
    lm: LMConfig = dataclasses.replace(cfg.model.lm, vocab_size=vocab, n_layers=lm_layers or cfg.model.lm.n_layers)
    return VLM(VLMConfig(vision, cfg.model.projector, lm, image_token_id=3), dinov2_config=dino)


def _prepare(model: VLM, stage: StageConfig, offload: bool) -> None:
    from svlm.training.optim import set_trainable

    set_trainable(model, stage)
    if offload:  # what OffloadAdamW does to the model: trained weights in bf16
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)


def _param_bytes(model: VLM) -> tuple[int, int, float, float]:
    """(parameters, trained, weight bytes, bytes of the trained ones), each tensor once."""
    seen: dict[int, torch.nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    ps = list(seen.values())
    trained = [p for p in ps if p.requires_grad]
    return (
        sum(p.numel() for p in ps),
        sum(p.numel() for p in trained),
        float(sum(p.numel() * p.element_size() for p in ps)),
        float(sum(p.numel() * p.element_size() for p in trained)),
    )


def views_per_image(model: VLM) -> int:
    """Views the encoder runs on for one image: its largest tile grid's tiles and thumbnail, or 1."""
    tiling = model.cfg.vision.tiling
    return tiling.max_views if tiling else 1


def saved_bytes(model: VLM, batch: int, seq_len: int, precision: str, device: str = "cpu") -> float:
    """Bytes autograd keeps for the backward pass of one forward (real tensors on
    `device`), plus the logits the loss is made from; weights not included."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    kept: dict[int, int] = {}
    alive = []  # no storage is freed and reused while we count

    def pack(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
            alive.append(t.detach())
        # Nothing kept in the graph: there is no backward pass here, and a saved
        # output with its grad_fn would make a reference cycle that leaks the model.
        return None

    views = views_per_image(model)  # the largest tile grid's views (one without tiles)
    n_img = views * model.num_image_tokens
    ids = torch.full((batch, max(seq_len, n_img + 2)), 5, device=device)
    ids[:, :n_img] = model.cfg.image_token_id
    labels = ids.clone()
    labels[:, :n_img] = IGNORE_INDEX
    size = model.cfg.vision.image_size
    pixels = torch.zeros(batch * views, 3, size, size, device=device)  # sizes, not values, matter
    low = {"bf16": torch.bfloat16, "fp16": torch.float16 if device == "cuda" else torch.bfloat16}.get(precision)
    model.train()
    with torch.autocast(device, dtype=low or torch.bfloat16, enabled=low is not None):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            out = model(ids, pixels, labels)
    logits = out.logits.untyped_storage()
    kept[logits.data_ptr()] = logits.nbytes()
    return float(sum(kept.values()))


def estimate_memory(
    cfg: TrainConfig,
    stage: StageConfig,
    optimizer: str | None = None,
    seq_len: int | None = None,
    micro_batch: int | None = None,
    vocab: int | None = None,
) -> MemoryEstimate:
    """The estimate for one stage; optimizer: adamw or adamw_offload (None: what
    hardware.optimizer says, `auto` counting as adamw)."""
    hw = cfg.hardware
    device = planned_device(hw)
    precision = resolve_precision(hw, device)
    kind = optimizer or (hw.optimizer if hw.optimizer != "auto" else "adamw")
    offload = kind == "adamw_offload"
    if cfg.model.lm.path is not None:  # a pretrained LM: its shape and vocabulary are its folder's
        lm = sync_with_checkpoint(cfg.model.lm)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lm=lm))
        vocab = vocab or lm.vocab_size
    vocab = vocab or cfg.tokenizer.vocab_size
    seq_len = min(seq_len or cfg.data.max_len, cfg.model.lm.max_seq_len)
    micro = micro_batch or hw.micro_batch_size or stage.batch_size

    with torch.device("meta"):  # parameter counts without memory
        full = _vlm(cfg, vocab)
    _prepare(full, stage, offload)
    n_params, n_trained, weight_b, trained_b = _param_bytes(full)
    text = max(1, seq_len - views_per_image(full) * full.num_image_tokens)  # positions that can have logits

    # Activations: six small forward passes, each term linear in layers and samples,
    # on the GPU when the run will use one (exact for its autocast), else the CPU.
    where = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    n_lm, n_vis = cfg.model.lm.n_layers, full.vision.dinov2.config.num_hidden_layers
    measured = {}
    for lm_layers, vis_layers in ((1, 1), (2, 1), (1, 2)):
        with torch.device("meta"):  # then zeros: sizes, not values, matter here
            model = _vlm(cfg, vocab, lm_layers, vis_layers)
        model.to_empty(device=where)
        for t in (*model.parameters(), *model.buffers()):
            t.data.zero_()
        _prepare(model, stage, offload)
        measured[lm_layers, vis_layers] = [saved_bytes(model, b, seq_len, precision, where) for b in (1, 2)]
        del model
    per_sample = {k: v[1] - v[0] for k, v in measured.items()}  # bytes a sample
    fixed = measured[1, 1][0] - per_sample[1, 1]  # bytes whatever the batch (weight copies)
    lm_layer = per_sample[2, 1] - per_sample[1, 1]
    vis_layer = per_sample[1, 2] - per_sample[1, 1]
    rest = per_sample[1, 1] - lm_layer - vis_layer  # embeddings, projector, head, loss
    checkpointing = hw.grad_checkpointing
    if checkpointing:  # a layer keeps its input; one layer at a time is recomputed in full
        x_bytes = 2 if offload and full.lm.embed_tokens.weight.requires_grad else 4
        lm_total = n_lm * seq_len * cfg.model.lm.d_model * x_bytes + lm_layer
        vis_total = vis_layer if not stage.train_vision else (
            n_vis * (full.vision.num_patches + 1) * full.vision.hidden_size * 4 * views_per_image(full) + vis_layer
        )  # fmt: skip
    else:
        lm_total, vis_total = n_lm * lm_layer, n_vis * vis_layer
    # Autocast's bf16 copies of fp32 weights, a layer: kept through the forward pass
    # for trained weights (autocast caches them), else saved by each layer, so with
    # checkpointing only the layer being recomputed holds them.
    lm_copies = max(0.0, (measured[2, 1][0] - measured[1, 1][0]) - lm_layer)
    vis_copies = max(0.0, (measured[1, 2][0] - measured[1, 1][0]) - vis_layer)
    lm_trained = any(p.requires_grad for n, p in full.lm.layers.named_parameters() if not is_adapter(n))
    lm_kept = n_lm - 1 if lm_trained or not checkpointing else 0
    vis_kept = n_vis - 1 if stage.train_vision or not checkpointing else 0
    fixed_total = fixed + lm_kept * lm_copies + vis_kept * vis_copies
    activations = fixed_total + micro * (rest + lm_total + vis_total)

    batch_world = stage.batch_size  # accumulation when a step takes more than one micro-batch
    return MemoryEstimate(
        stage=stage.name, params=n_params, trained=n_trained, micro_batch=micro, seq_len=seq_len,
        precision=precision, optimizer=kind, checkpointing=checkpointing, accumulating=micro < batch_world,
        weights=weight_b, grads=trained_b, optimizer_states=0.0 if offload else 2.0 * n_trained * 4,
        activations=activations, loss_grad=micro * text * vocab * (6.0 if precision != "fp32" else 4.0),
        cpu_states=16.0 * n_trained if offload else 0.0,
    )  # fmt: skip


def choose_optimizer(cfg: TrainConfig, stage: StageConfig, **kw) -> tuple[str, MemoryEstimate]:
    """hardware.optimizer, with `auto` settled: plain AdamW when it fits the
    budget (or there is none, or no GPU), else AdamW with its states on the CPU."""
    hw = cfg.hardware
    if hw.optimizer != "auto":
        return hw.optimizer, estimate_memory(cfg, stage, hw.optimizer, **kw)
    plain = estimate_memory(cfg, stage, "adamw", **kw)
    if plain.fits(hw.memory_budget_gb) or planned_device(hw) != "cuda":
        return "adamw", plain
    return "adamw_offload", estimate_memory(cfg, stage, "adamw_offload", **kw)
