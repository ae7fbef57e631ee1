"""Stage-1 training speed of model=base with and without the feature cache.

    python benchmarks/feature_cache.py                       # CPU, 2 rounds, batches of 8
    python benchmarks/feature_cache.py --steps 8 --batch 16 --rounds 3 --folder /tmp/fcbench
    python benchmarks/feature_cache.py --hardware auto --batch 32      # on a GPU, bf16
    python benchmarks/feature_cache.py model.vision.image_size=448 model.projector.factor=4   # + train.py overrides

Writes (once) a DINOv2-base-shaped encoder with random weights into
<folder>/dinov2-base (hidden 768, 12 layers, 12 heads, patch 14, 224 px: the
shapes of conf/model/base.yaml), then trains stage 1 of model=base with
train.py's own `train()` on a small shapes data set, as the original recipe's
stage 1 does (conf/experiment/stage/svlm_stage1.yaml: encoder frozen; the
projector, the text embedding and the top 2 LM blocks train), alternately with
data.feature_cache=false and true. The cache is filled first (timed: that is
the encoder's cost per image, paid once), so the cached runs only read it.
Each run's samples/s is measured from its metrics.jsonl between the first and
the last step (the first step warms up); the best run of each kind is
reported, with their ratio and the ceiling that the encoder's share of a
step's FLOPs puts on it. The figures go to <folder>/result.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import svlm  # noqa: E402,F401  (the OpenMP wait policy before torch)

REPO = Path(__file__).resolve().parents[1]
BASE_SHAPES = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=224)


def encoder_folder(folder: Path) -> Path:
    """A random-init DINOv2 with dinov2-base's shapes (written once)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    path = folder / "dinov2-base"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(**BASE_SHAPES)).save_pretrained(path)
    return path


def config(folder: Path, name: str, cached: bool, args):
    """The TrainConfig of one run: train.py's config with these overrides."""
    from svlm.cli import compose
    from svlm.config import StageConfig, load_train_config

    overrides = [
        f"model={args.model}",
        f"model.vision.path={encoder_folder(folder)}",
        "stage=stage1",
        # what trains in the original recipe's stage 1
        "stage.train_vision=false",
        "stage.train_projector=true",
        "stage.unfreeze_lm_top_layers=2",
        "stage.train_text_embed=true",
        "stage.lr=2e-4",
        f"stage.batch_size={args.batch}",
        f"stage.max_steps={args.steps}",
        "stage.log_every=1",
        "stage.eval_every=0",
        "stage.save_every=0",
        f"data.n_train={args.images}",
        "data.n_val=8",
        "data.n_test=8",
        "data.val_file=null",  # no validation: only training steps are timed
        f"data.feature_cache={str(cached).lower()}",
        f"hardware={args.hardware}",
        f"hardware.threads={args.threads or 'null'}",
        f"paths.outputs={folder / 'outputs'}",
        f"paths.cache={folder / 'cache'}",
        f"paths.run_dir={folder / 'runs' / name}",
        *args.overrides,
    ]
    if "sample_grid" in {f.name for f in dataclasses.fields(StageConfig)}:
        overrides.append("stage.sample_grid=0")
    return load_train_config(compose("train", overrides))


def samples_per_s(metrics: Path, batch: int) -> float:
    """Samples/s between the first and the last logged step. A record's
    samples_per_s is seen / (time since the loop began), so its time is seen / rate."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    logged = [r for r in records if "samples_per_s" in r]
    first, last = logged[0], logged[-1]
    seen = [r["step"] * batch for r in (first, last)]  # one process
    times = [s / r["samples_per_s"] for s, r in zip(seen, (first, last))]
    return (seen[1] - seen[0]) / (times[1] - times[0])


def fill_cache(cfg) -> tuple[int, float]:
    """Fill the feature cache with the training pictures' features, as a run's start
    would (the runs then find them all); returns (pictures, seconds)."""
    from svlm.data.feature_cache import FeatureCache
    from svlm.data.source import data_root
    from svlm.models.vision import ImageProcessor, VisionEncoder, sync_with_checkpoint

    files = sorted((data_root(cfg.data, cfg.paths.cache) / "images").glob("train-*.png"))
    vision = VisionEncoder(sync_with_checkpoint(dataclasses.replace(cfg.model.vision))).eval()
    processor = ImageProcessor(vision.cfg)
    t0 = time.perf_counter()
    cache = FeatureCache(Path(cfg.paths.cache) / "features", vision, processor)
    computed = cache.fill(cache.image_keys(files), vision)
    return computed, time.perf_counter() - t0


def analytic_ceiling(cfg) -> dict:
    """What the cache can gain at most, from FLOPs counted as svlm.bench counts them
    (step_flops with this stage's frozen and trained parts, at the data's mean
    length and mean supervised tokens): the encoder's forward pass per sample
    against everything else in a step, chiefly the language model's forward and
    backward (the input gradient runs through every block, since the projector
    below them trains)."""
    import torch

    from svlm.data.chat import ChatEncoder
    from svlm.data.formats import BadSamples
    from svlm.data.source import data_root, load_splits, train_files
    from svlm.flops import step_flops, vision_flops
    from svlm.models.vision import ImageProcessor
    from svlm.models.vlm import target_positions
    from svlm.tokenizer import tokenizer_for_data
    from svlm.training.optim import set_trainable
    from svlm.training.prepare import build_model

    stage = cfg.stages()[0]
    root = data_root(cfg.data, cfg.paths.cache)
    tokenizer = tokenizer_for_data(cfg.tokenizer, train_files(cfg.data, root, stage.task))
    model = build_model(cfg, tokenizer)
    set_trainable(model, stage)
    encoder = ChatEncoder.for_model(tokenizer, model)
    processor = ImageProcessor(model.cfg.vision)
    train_ds, _ = load_splits(cfg.data, root, stage.task, encoder, processor, cfg.data.max_len, BadSamples(), 0)
    examples = [train_ds.example(i) for i in range(len(train_ds))]
    tokens = sum(len(ex.input_ids) for ex in examples) / len(examples)
    targets = sum(len(target_positions(torch.tensor([ex.labels]))) for ex in examples) / len(examples)
    step = step_flops(model, 1, round(tokens), head_tokens=round(targets))
    vision = vision_flops(model.vision.dinov2.config, model.vision.num_patches, 1)
    return {"tokens": tokens, "targets": targets, "encoder_gflop": vision / 1e9, "rest_gflop": (step - vision) / 1e9,
            "ceiling": step / (step - vision)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, default=REPO / "outputs" / "bench" / "feature_cache")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps a run")
    p.add_argument("--batch", type=int, default=8, help="samples a step")
    p.add_argument("--images", type=int, default=64, help="training pictures (the cache holds their features)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each kind; the best is reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--model", default="base", help="the model option (its encoder: random weights of dinov2-base)")
    p.add_argument("--hardware", default="cpu", help="the hardware option (auto: a GPU if there is one)")
    p.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. model.vision.image_size=448")
    args = p.parse_args(argv)

    import torch

    from svlm.training.loop import train

    args.folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.folder / "cache" / "features", ignore_errors=True)
    n_images, fill_s = fill_cache(config(args.folder, "fill", True, args))
    rates: dict[str, list[float]] = {"uncached": [], "cached": []}
    for r in range(args.rounds):
        for kind in ("uncached", "cached"):
            name = f"{kind}-{r}"
            cfg = config(args.folder, name, kind == "cached", args)
            shutil.rmtree(cfg.paths.run_dir, ignore_errors=True)
            train(cfg)
            rates[kind].append(samples_per_s(Path(cfg.paths.run_dir) / "stage1" / "metrics.jsonl", args.batch))
            shutil.rmtree(cfg.paths.run_dir)  # a model=base folder is about 1 GB
            print(f"{name}: {rates[kind][-1]:.2f} samples/s", flush=True)

    uncached, cached = max(rates["uncached"]), max(rates["cached"])
    bound = analytic_ceiling(cfg)
    result = {
        "command": " ".join(["python benchmarks/feature_cache.py", *(argv if argv is not None else sys.argv[1:])]),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.hardware != "cpu" and torch.cuda.is_available() else "cpu",
        "batch": args.batch,
        "steps": args.steps,
        "uncached_samples_per_s": uncached,
        "cached_samples_per_s": cached,
        "ratio": cached / uncached,
        "runs": rates,
        "fill_images": n_images,
        "fill_seconds": fill_s,
        "analytic": bound,
    }
    (args.folder / "result.json").write_text(json.dumps(result, indent=2))
    print(
        f"\nmodel={args.model} {' '.join(args.overrides)} stage 1 (encoder frozen; projector, text embedding, top 2 LM blocks train), "
        f"hardware={args.hardware}, {result['threads']} CPU threads, batches of {args.batch}:\n"
        f"  without the cache  {uncached:6.2f} samples/s\n"
        f"  with the cache     {cached:6.2f} samples/s   ({cached / uncached:.2f}x)\n"
        f"  filling the cache: {n_images} images in {fill_s:.1f}s ({fill_s / n_images:.2f}s an image, once)\n"
        f"  a sample ({bound['tokens']:.0f} tokens, {bound['targets']:.0f} supervised): encoder forward "
        f"{bound['encoder_gflop']:.1f} GFLOP, the rest of a step {bound['rest_gflop']:.1f} GFLOP:\n"
        f"  removing the encoder can give at most {bound['ceiling']:.2f}x\n"
        f"figures: {args.folder / 'result.json'}"
    )
    return result


if __name__ == "__main__":
    main()
