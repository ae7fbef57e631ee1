"""Benchmark training and generation speed, with figures, not guesses:

    python -m svlm.bench                              # model=tiny, stage 2, this machine
    python -m svlm.bench bench.size=tiny              # the fixed comparison sizes (tiny | small)
    python -m svlm.bench model=base stage=stage1 bench.threads=[1,2]

Takes the same overrides as train.py, plus `bench.*` (see BenchConfig). Prints
one table and writes the figures as JSON to outputs/bench/<time>/bench.json:

- samples/s and tokens/s of full training steps as the hardware config runs
  them (precision, micro-batches with gradient accumulation, gradient
  checkpointing, hardware.optimizer, hardware.compile), the median step of the
  best round after warm-up;
- model FLOPs a step, counted analytically (vision encoder, projector,
  language model, attention included; in the backward, weight gradients of
  the trained parts and input gradients above the lowest trained part; the
  head where the loss needs logits: half the text is supervised), the FLOP/s
  achieved, and MFU against an fp32 (or bf16 on a GPU) matmul peak measured in
  the same run right before each round;
- the data pipeline alone (images decoded and preprocessed a second);
- the share of padding tokens in batches of the configured data, a row a
  sample and packed (data.packing); with bench.data_steps, samples/s of
  training steps on that data both ways;
- peak memory (process RSS on the CPU, torch.cuda.max_memory_allocated over
  the training steps on a GPU) beside the planner's estimate (svlm/memory/);
- batch-1 generation tokens/s with and without the KV cache (the weights laid
  out for decoding, as the inference commands have them);
- with bench.profile=true, where a step's time goes (forward, backward,
  optimizer, and the costliest operators: profile.txt and trace.json).

The batches are synthetic (random ids, the model's image slots, random
pixels) of `bench.text_tokens` text tokens, so the figures measure the model
and the step, not the data.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svlm.config import ConfigError
from svlm.flops import step_flops
from svlm.hardware import THREADS, make_accelerator
from svlm.models.packed_attention import end_to_end
from svlm.models.vlm import IGNORE_INDEX, VLM, VLMConfig, target_positions
from svlm.training.step import skips_on_device, train_step

# The fixed comparison sizes: 224 px, patch 14 (256 patches -> 64 visual tokens
# by a 2x2 merge), vocabulary 8192, 96 text tokens, every part trained.
SIZES = {
    "tiny": {"vision": (192, 4, 3), "lm": (256, 4, 4), "batch": 8},
    "small": {"vision": (384, 6, 6), "lm": (512, 8, 8), "batch": 4},
}


@dataclass
class BenchConfig:
    size: str | None = None  # tiny | small: the fixed sizes; None: the configured model
    batch: int | None = (
        None  # samples a step, in micro-batches of hardware.micro_batch_size; None: the stage's (or the size's)
    )
    text_tokens: int = 96
    warmup: int = 2
    steps: int = 5  # steps a round
    rounds: int = 3  # the best round is reported, each after a fresh matmul peak
    threads: list[int] = field(default_factory=lambda: [0])  # 0: torch's default; e.g. [1, 2]
    gen_tokens: int = 256  # 0: skip the generation figures
    gen_without_cache: bool = True  # also the no-cache reference's tokens/s (slow at large gen_tokens)
    profile: bool = False  # 2 more steps under torch.profiler: profile.txt and trace.json in the run folder
    data: bool = True  # the data pipeline and padding figures (the configured data, built if absent)
    data_images: int = 200
    data_steps: int = 0  # >0: also that many training steps on the configured data, unpacked and packed


# ------------------------------------------------------------------- measuring


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes=(1024, 2048), seconds: float = 0.6) -> float:
    """FLOP/s of square matmuls on this device now: the best over sizes and repeats."""
    best = 0.0
    for n in sizes if device.type == "cpu" else (4096, 8192):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        for _ in range(3):
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 6:
                a @ b
                count += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 * count / (time.perf_counter() - t0))
    return best


def synthetic_batch(model: VLM, batch: int, text_tokens: int, device) -> dict:
    n_img, vocab = model.num_image_tokens, model.cfg.lm.vocab_size
    ids = torch.randint(10, vocab, (batch, n_img + text_tokens))
    ids[ids == model.cfg.image_token_id] = 11  # no stray image slots in the text
    ids[:, :n_img] = model.cfg.image_token_id  # the picture's slots first
    labels = ids.clone()
    labels[:, : n_img + text_tokens // 2] = IGNORE_INDEX  # half the text supervised
    size = model.cfg.vision.image_size
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "pixel_values": torch.randn(batch, 3, size, size, device=device),
    }


def split(batch: dict, micro: int, device) -> list[dict]:
    """The batch in micro-batches of `micro` on the device, each with the loss's
    target positions found on the CPU, as the training collator gives them."""
    parts = []
    for i in range(0, batch["input_ids"].shape[0], micro):
        part = {k: v[i : i + micro] for k, v in batch.items()}
        part["target_index"] = target_positions(part["labels"].cpu())
        parts.append({k: v.to(device) for k, v in part.items()})
    return parts


@dataclass
class Stepper:
    """What one_step needs: accelerate's Accelerator (device and precision, as
    training has them), the model, its optimizer and the trained parameters."""

    accelerator: object
    model: VLM
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    grad_clip: float
    skip_on_device: bool


def one_step(steps: Stepper, micro_batches: list[dict], phase=lambda name: nullcontext()) -> None:
    """One optimizer step as training takes it (svlm.training.step.train_step:
    the token-mean loss over the micro-batches, clipping, a non-finite step
    skipped), then the gradients cleared. `phase(name)` labels the parts."""
    train_step(steps.accelerator, steps.model, steps.optimizer, micro_batches, steps.trainable, steps.grad_clip,
               steps.skip_on_device, phase=phase)  # fmt: skip
    steps.optimizer.zero_grad(set_to_none=True)


def time_steps(steps: Stepper, micro_batches: list[dict], n: int, device) -> list[float]:
    """Seconds of each of `n` optimizer steps (one_step)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        one_step(steps, micro_batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        THREADS.follow()  # as the training loop does (svlm/hardware.py)
    return times


def profile_steps(steps: Stepper, micro_batches: list[dict], device, folder: Path) -> dict:
    """Two steps under torch.profiler: the share of the step in forward, backward
    and optimizer, and the operators that take the most time (on the GPU when
    there is one), to `folder`/profile.txt; the timeline to `folder`/trace.json
    (chrome://tracing or ui.perfetto.dev)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            one_step(steps, micro_batches, phase=lambda name: record_function(f"## {name}"))
        if device.type == "cuda":
            torch.cuda.synchronize()
    folder.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(folder / "trace.json"))
    events = prof.key_averages()
    gpu = device.type == "cuda"
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    phases = {
        e.key.removeprefix("## "): e.device_time_total if gpu else e.cpu_time_total
        for e in events
        if e.key.startswith("## ")
    }
    total = sum(phases.values()) or 1.0
    shares = {k: v / total for k, v in phases.items()}
    table = events.table(sort_by=key, row_limit=30)
    where = "the GPU's kernel time" if gpu else "the step's time"
    head = f"share of {where}: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
    (folder / "profile.txt").write_text(f"{head}\n(operators sorted by {key})\n{table}\n")
    return {"phases": shares, "table": str(folder / "profile.txt"), "trace": str(folder / "trace.json")}


@torch.no_grad()
def generation_speed(model: VLM, device, new_tokens: int, without_cache: bool = True) -> dict:
    """Batch-1 tokens/s with and without the KV cache, the weights laid out as
    the inference commands lay them (decoding_layout: so it runs after every
    training figure)."""
    from svlm.inference.generation import decoding_layout, generate

    model.eval()
    decoding_layout(model)
    batch = synthetic_batch(model, 1, 8, device)
    prompt = batch["input_ids"][:, : model.num_image_tokens + 8]
    room = model.cfg.lm.max_seq_len - prompt.shape[1]
    n = min(new_tokens, room)
    out = {}
    warm_up = min(n, 16)  # compiled blocks: their compilations happen here
    generate(model, prompt, batch["pixel_values"], stop_ids=-1, max_new_tokens=warm_up)
    for cache in (True, False) if without_cache else (True,):
        t0 = time.perf_counter()
        (ids,) = generate(model, prompt, batch["pixel_values"], stop_ids=-1, max_new_tokens=n, use_cache=cache)
        out["with_cache" if cache else "without_cache"] = len(ids) / (time.perf_counter() - t0)
    model.train()
    out["new_tokens"] = n
    if without_cache:
        out["speedup"] = out["with_cache"] / out["without_cache"]
    return out


def data_pipeline_speed(cfg, model: VLM, images: int) -> float:
    """Images a second decoded and preprocessed (the shapes pictures, or the data's)."""
    from svlm.data.images import open_image
    from svlm.data.source import data_root, image_dir
    from svlm.models.vision import ImageProcessor

    folder = image_dir(cfg.data, data_root(cfg.data, cfg.paths.cache), "sft")
    files = sorted(folder.glob("*"))[:images]
    if not files:
        return float("nan")
    processor = ImageProcessor(model.cfg.vision)
    t0 = time.perf_counter()
    for f in files:
        processor(open_image(f))
    return len(files) / (time.perf_counter() - t0)


def training_data(cfg, model: VLM):
    """The configured training data set (the last stage's task) and its chat encoder."""
    from svlm.data.chat import ChatEncoder
    from svlm.data.source import data_root, load_splits, train_files
    from svlm.models.vision import ImageProcessor
    from svlm.tokenizer import tokenizer_for_data

    root = data_root(cfg.data, cfg.paths.cache)
    first, stage = cfg.stages()[0], cfg.stages()[-1]  # the tokenizer is trained on the first stage's data
    tokenizer = tokenizer_for_data(cfg.tokenizer, train_files(cfg.data, root, first.task))
    encoder = ChatEncoder.for_model(tokenizer, model)
    processor = ImageProcessor(model.cfg.vision)
    ds, _ = load_splits(cfg.data, root, stage.task, encoder, processor, cfg.data.max_len, None, cfg.seed)
    return ds, encoder


def epoch_micro_batches(cfg, ds, batch: int, micro: int) -> list[list[int]]:
    """The sample indices of each micro-batch of one epoch, in the training sampler's order."""
    from svlm.data.sampler import EpochSampler

    lengths = ds.lengths()
    sampler = EpochSampler(len(ds), cfg.seed, cfg.data.shuffle, lengths=lengths if cfg.data.group_by_length else None,
                           group=batch, window=cfg.data.group_window)  # fmt: skip
    order = list(sampler)
    return [order[i : i + micro] for i in range(0, len(order), micro)]


def padding_shares(cfg, ds, batch: int, micro: int, flat: bool) -> dict:
    """Pad tokens / batch tokens over one epoch of the configured training data,
    in micro-batches of `micro`: each padded to its longest sample, and packed
    as training packs them on this device (svlm/data/packing.py, `layout`:
    rows of data.max_len padded to the longest row, or end to end when `flat`)."""
    from svlm.data.packing import layout, row_tokens

    lengths = ds.lengths()
    real = total = packed_total = 0
    for chunk in epoch_micro_batches(cfg, ds, batch, micro):
        sizes = [lengths[i] for i in chunk]
        real += sum(sizes)
        total += max(sizes) * len(sizes)
        packed_total += row_tokens(sizes, layout(sizes, cfg.data.max_len, flat))
    return {"unpacked": 1 - real / total, "packed": 1 - real / packed_total, "end_to_end": flat,
            "sample_tokens": [min(lengths), statistics.median(lengths), max(lengths)]}  # fmt: skip


def data_step_speed(cfg, steps: Stepper, ds, encoder, batch: int, micro: int, n: int, device, flat: bool) -> dict:
    """samples/s of `n` training steps on the configured data's first batches,
    unpacked (a row a sample) and packed: the same samples both ways, the two
    ways' steps interleaved (this host's speed drifts: both see the same
    drift). Token ids are mapped into the bench model's vocabulary (the speed
    does not depend on them)."""
    from svlm.data.dataset import Collator
    from svlm.data.packing import PackingCollator

    chunks = epoch_micro_batches(cfg, ds, batch, micro)[: n * max(1, batch // micro)]
    items = [[ds[i] for i in chunk] for chunk in chunks]
    ways = {"unpacked": Collator(encoder.pad_id), "packed": PackingCollator(encoder.pad_id, cfg.data.max_len, flat)}
    per_step = max(1, batch // micro)
    plan = {}  # way -> its steps, each a list of micro-batches
    for name, collate in ways.items():
        micro_batches = [bench_ids(collate(group), encoder, steps.model, device) for group in items]
        plan[name] = [micro_batches[i : i + per_step] for i in range(0, len(micro_batches), per_step)]
        one_step(steps, plan[name][0])  # warm-up
    seconds = dict.fromkeys(ways, 0.0)
    for i in range(len(plan["unpacked"])):
        for name in list(ways)[:: -1 if i % 2 else 1]:  # the order alternating
            t0 = time.perf_counter()
            one_step(steps, plan[name][i])
            seconds[name] += time.perf_counter() - t0
    result = {}
    for name, step_list in plan.items():
        micro_batches = [b for step in step_list for b in step]
        samples = sum(b.get("n_samples", b["input_ids"].shape[0]) for b in micro_batches)
        result[name] = {"samples_per_s": samples / seconds[name], "rows": sum(b["input_ids"].shape[0] for b in micro_batches),
                        "samples": samples, "tokens_per_row": statistics.mean(b["input_ids"].shape[1] for b in micro_batches)}  # fmt: skip
    return result


def bench_ids(b: dict, encoder, model: VLM, device) -> dict:
    """A collated micro-batch with its ids mapped into the bench model's
    vocabulary, clear of the image id, on `device`."""
    slots = b["input_ids"] == encoder.image_id
    b["input_ids"] = (b["input_ids"] % (model.cfg.lm.vocab_size - 4)) + 4  # clear of the image id (3)
    b["input_ids"][slots] = model.cfg.image_token_id
    b["labels"] = torch.where(b["labels"] >= 0, b["input_ids"], b["labels"])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


# ------------------------------------------------------------------------- main


def build_bench_model(cfg, bench: BenchConfig) -> tuple[VLM, int]:
    """The model to measure and its batch size."""
    from transformers import Dinov2Config

    from svlm.models.language_model import LMConfig
    from svlm.models.projector import ProjectorConfig
    from svlm.models.vision import VisionConfig

    if bench.size is None:
        m = cfg.model
        vocab = 512 if m.lm.d_in is None and m.lm.d_model <= 256 else 32005
        vlm_cfg = VLMConfig(m.vision, m.projector, dataclasses.replace(m.lm, vocab_size=vocab), image_token_id=3)
        dinov2 = None
        if m.vision.path is not None:  # shapes of the folder's model, random weights
            dinov2 = Dinov2Config.from_pretrained(m.vision.path)
        batch = bench.batch or cfg.stages()[-1].batch_size
        return VLM(vlm_cfg, dinov2_config=dinov2), batch
    if bench.size not in SIZES:
        raise ConfigError(f"bench.size must be one of {', '.join(SIZES)} or null, got {bench.size!r}")
    size = SIZES[bench.size]
    (vd, vl, vh), (ld, ll, lh) = size["vision"], size["lm"]
    vlm_cfg = VLMConfig(
        VisionConfig(image_size=224, patch_size=14, hidden_size=vd, num_layers=vl, num_heads=vh),
        ProjectorConfig(compress="pixel_shuffle", factor=2),
        LMConfig(vocab_size=8192, d_model=ld, n_layers=ll, n_heads=lh, max_seq_len=512),
        image_token_id=3,
    )
    return VLM(vlm_cfg), bench.batch or size["batch"]


def run(cfg, bench: BenchConfig) -> dict:
    from svlm.hardware import resolve_precision
    from svlm.memory import choose_optimizer
    from svlm.training.optim import make_optimizer, set_trainable

    hw = cfg.hardware
    device = torch.device("cuda" if torch.cuda.is_available() and hw.device != "cpu" else "cpu")
    precision = resolve_precision(hw, device.type)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(0)
    model, batch_size = build_bench_model(cfg, bench)
    micro = min(hw.micro_batch_size or batch_size, batch_size)
    stage = cfg.stages()[-1]
    if bench.size is not None:  # every part trained
        stage = dataclasses.replace(stage, train_vision=True, train_projector=True, unfreeze_lm_top_layers=-1,
                                    train_text_embed=True)  # fmt: skip
    set_trainable(model, stage)
    tokens = model.num_image_tokens + bench.text_tokens
    measured = cfg  # the planner estimates the model measured: bench.size's, when one is named
    if bench.size is not None:
        parts = {"vision": model.cfg.vision, "projector": model.cfg.projector, "lm": model.cfg.lm}
        measured = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **parts))
    kind, estimate = choose_optimizer(measured, stage, seq_len=tokens, micro_batch=micro, vocab=model.cfg.lm.vocab_size)
    print(estimate.table())
    if hw.grad_checkpointing:
        model.lm.gradient_checkpointing = True
        if stage.train_vision:
            model.vision.dinov2.gradient_checkpointing_enable()
    if hw.compile:
        model.compile_blocks()
    model.to(device).train()
    optimizer = make_optimizer(model, stage, kind, pin=device.type == "cuda")
    micro_batches = split(synthetic_batch(model, batch_size, bench.text_tokens, "cpu"), micro, device)
    flops = step_flops(model, batch_size, tokens, head_tokens=bench.text_tokens - bench.text_tokens // 2)
    results: dict = {
        "model": bench.size or cfg.model.name, "stage": stage.name, "hardware": hw.name, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "precision": precision,
        "optimizer": kind, "grad_checkpointing": hw.grad_checkpointing, "compile": hw.compile, "batch": batch_size,
        "micro_batch": micro, "tokens_per_sample": tokens, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trained_params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "step_gflop": flops / 1e9, "estimate_gib": estimate.total / 2**30,
        "estimate_params_m": estimate.params / 1e6, "rounds": {},
    }  # fmt: skip
    steps = Stepper(make_accelerator(hw), model, optimizer, [p for p in model.parameters() if p.requires_grad],
                    stage.grad_clip, skips_on_device(optimizer))  # fmt: skip
    peak_dtype = low if low is not None and device.type == "cuda" else torch.float32
    default_threads = torch.get_num_threads()
    peak_memory = 0
    for threads in bench.threads:
        THREADS.start(threads or hw.threads)  # a count of its own, hardware.threads, or the governor's
        best = None
        time_steps(steps, micro_batches, bench.warmup, device)
        for _ in range(bench.rounds):
            peak = matmul_peak(device, peak_dtype)
            if device.type == "cuda":  # the peak of the training steps alone (weights and states included)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            step = statistics.median(time_steps(steps, micro_batches, bench.steps, device))
            if device.type == "cuda":
                peak_memory = max(peak_memory, torch.cuda.max_memory_allocated())
            if best is None or flops / step / peak > best["mfu"]:
                best = {"step_s": step, "peak_gflops": peak / 1e9, "achieved_gflops": flops / step / 1e9,
                        "mfu": flops / step / peak, "samples_per_s": batch_size / step,
                        "tokens_per_s": batch_size * tokens / step, "threads": torch.get_num_threads()}  # fmt: skip
        results["rounds"][str(threads or default_threads)] = best
    torch.set_num_threads(default_threads)
    if bench.profile:
        results["profile"] = profile_steps(steps, micro_batches, device, Path(cfg.paths.run_dir))
    if device.type == "cuda":
        results["peak_memory_gib"] = peak_memory / 2**30
        results["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if bench.size is None and bench.data:
        results["data_images_per_s"] = data_pipeline_speed(cfg, model, bench.data_images)
        ds, encoder = training_data(cfg, model)
        if hasattr(ds, "lengths"):  # a data set read whole (a stream has no lengths ahead)
            flat = end_to_end(device, cfg.data.max_len)
            results["padding_share"] = padding_shares(cfg, ds, batch_size, micro, flat)
            if bench.data_steps:
                model.train()
                results["data_steps"] = data_step_speed(cfg, steps, ds, encoder, batch_size, micro, bench.data_steps,
                                                        device, flat)  # fmt: skip
    if bench.gen_tokens:  # last: it lays the weights out for decoding, which training steps do not want
        results["generation_tokens_per_s"] = generation_speed(model, device, bench.gen_tokens, bench.gen_without_cache)
    return results
