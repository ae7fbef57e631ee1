"""Streaming a parquet data set larger than memory should allow: resident memory and images/s.

    python benchmarks/streaming.py --folder /tmp/stream --gb 2

Writes (once) --gb of parquet shards in the_cauldron's layout into --folder:
rows of one 224x224 noise JPEG (every picture different, so nothing
compresses) and a question/answer, in row groups of 100 rows as `datasets`
writes image sets. Then:
1. the data pipeline alone: rows read from the stream, parsed, tokenized,
   their JPEGs decoded and preprocessed, in images/s, beside the same
   pictures read as files through a jsonl data set (the existing path);
2. a real training run (`train.py data.streaming=true`, one pass over every
   row, with a model much smaller than model=tiny: the data pipeline is what
   is measured), in a child process whose resident memory is read
   twice a second: the figure is its growth from the first logged step to
   the end, the stream's buffers and everything the run keeps.
Prints one table and writes the figures as JSON beside the data.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import svlm  # noqa: E402,F401  (the OpenMP wait policy before torch)

ROWS_PER_SHARD, GROUP = 4000, 100
SMALL_MODEL = ["model.lm.d_model=64", "model.lm.n_layers=2", "model.vision.hidden_size=32", "model.vision.num_layers=1",
               "model.vision.num_heads=2", "model.vision.patch_size=8", "model.projector.factor=2"]  # fmt: skip


def noise_jpeg(rng, size: int = 224) -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 256, (size, size, 3), dtype="uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


def row(rng, i: int) -> dict:
    colour = ("red", "green", "blue", "grey")[i % 4]
    return {
        "images": [{"bytes": noise_jpeg(rng), "path": None}],
        "texts": [{"user": f"Picture {i}: what is its main colour?", "assistant": f"mostly {colour} noise",
                   "source": "noise"}],
    }  # fmt: skip


def write_data(folder: Path, gb: float) -> list[Path]:
    """Shards of ROWS_PER_SHARD rows until --gb is written (kept: a second run reuses them)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "shards.json"
    if done.is_file() and json.loads(done.read_text())["gb"] == gb:
        return [folder / name for name in json.loads(done.read_text())["files"]]
    rng, files, written, i = np.random.default_rng(0), [], 0, 0
    while written < gb * 2**30:
        path = folder / f"train-{len(files):05d}.parquet"
        writer = None
        for _ in range(ROWS_PER_SHARD // GROUP):
            table = pa.Table.from_pylist([row(rng, i + j) for j in range(GROUP)])
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=GROUP)
            i += GROUP
        writer.close()
        files.append(path)
        written += path.stat().st_size
        print(f"  wrote {path.name}: {written / 2**30:.2f} GiB, {i} rows", flush=True)
    done.write_text(json.dumps({"gb": gb, "files": [f.name for f in files], "rows": i}))
    return files


def pipeline_speed(folder: Path, files: list[Path], n: int) -> dict:
    """images/s of the stream and of a jsonl + image files data set, decoding the same pictures."""
    import pyarrow.parquet as pq
    import torch

    from svlm.data.chat import ChatEncoder
    from svlm.data.dataset import LazyChatDataset
    from svlm.data.source import DataFile
    from svlm.data.streaming import StreamingChatDataset
    from svlm.models.vision import ImageProcessor, VisionConfig
    from svlm.tokenizer import train_bpe

    torch.set_num_threads(1)
    tok = train_bpe(["Picture 12: what is its main colour? mostly red green blue grey noise"] * 50, 300)
    encoder, processor = ChatEncoder(tok, 16), ImageProcessor(VisionConfig(image_size=64, patch_size=4))
    images = folder / "as_files"
    jsonl = folder / "as_files.jsonl"
    if not jsonl.is_file():  # the first n rows' pictures as files, and a jsonl pointing at them
        images.mkdir(exist_ok=True)
        table = pq.ParquetFile(files[0]).read_row_groups(range(-(-n // GROUP))).to_pylist()[:n]
        with open(jsonl, "w") as f:
            for k, r in enumerate(table):
                (images / f"{k}.jpg").write_bytes(r["images"][0]["bytes"])
                turn = r["texts"][0]
                f.write(json.dumps({"image": f"{k}.jpg", "conversations": [
                    {"role": "user", "content": "<image>\n" + turn["user"]},
                    {"role": "assistant", "content": turn["assistant"]}]}) + "\n")  # fmt: skip
    stream = StreamingChatDataset([DataFile(files[0], folder)], folder, encoder, processor, 256, "raise", None, 8)
    stream.shard_for(0, 1, 0, 1, seed=0, shuffle=False, buffer=1000)
    t = time.perf_counter()
    for _, _ in zip(stream, range(n)):
        pass
    streamed = n / (time.perf_counter() - t)
    lazy = LazyChatDataset(jsonl, images, encoder, processor, 256, "raise")
    t = time.perf_counter()
    for k in range(n):
        lazy[k]
    from_files = n / (time.perf_counter() - t)
    return {"stream_images_per_s": round(streamed, 1), "jsonl_images_per_s": round(from_files, 1)}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def train_and_watch(folder: Path, rows: int, batch: int) -> dict:
    """One pass over every row with train.py, the child's resident memory sampled."""
    steps = rows // batch
    run = folder / "run"
    cmd = [sys.executable, "train.py", "stage=stage1", "hardware=cpu", "data.kind=files", f"data.root={folder}",
           "data.train_file='train-*.parquet'", "data.val_file=null", "data.test_file=null", "data.streaming=true",
           f"stage.batch_size={batch}", f"stage.max_steps={steps}", "stage.epochs=1", "stage.eval_every=0",
           "stage.save_every=0", "stage.sample_grid=0", "stage.log_every=20", f"paths.outputs={folder}/outputs",
           f"paths.cache={folder}/cache", f"hydra.run.dir={run}", *SMALL_MODEL]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float, bool]] = []  # (seconds, RSS MB, a step was logged)
    metrics = run / "stage1" / "metrics.jsonl"

    def watch() -> None:
        while proc.poll() is None:
            try:
                samples.append((time.perf_counter() - started, rss_mb(proc.pid), metrics.is_file()
                                and "train/loss" in metrics.read_text()))  # fmt: skip
            except (OSError, ValueError):
                pass
            time.sleep(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"train.py failed:\n{err[-3000:]}")
    training = [rss for _, rss, logged in samples if logged]
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    losses = [m["train/loss"] for m in lines if "train/loss" in m]
    return {
        "train_steps": steps,
        "train_s": round(time.perf_counter() - started, 1),
        "rss_at_first_step_mb": round(training[0], 1) if training else None,
        "rss_peak_mb": round(max(rss for _, rss, _ in samples), 1),
        "rss_growth_mb": round(max(training) - training[0], 1) if training else None,
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--images", type=int, default=1000, help="pictures decoded for the images/s figures")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-train", action="store_true", help="the pipeline figures only")
    args = p.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    files = write_data(args.folder, args.gb)
    rows = json.loads((args.folder / "shards.json").read_text())["rows"]
    figures = {"shards": len(files), "rows": rows, "data_gib": round(sum(f.stat().st_size for f in files) / 2**30, 2)}
    figures.update(pipeline_speed(args.folder, files, args.images))
    if not args.no_train:
        figures.update(train_and_watch(args.folder, rows, args.batch_size))
    width = max(len(k) for k in figures)
    print("streaming benchmark (data.streaming=true over parquet shards of noise JPEGs)")
    for k, v in figures.items():
        print(f"  {k:<{width}}  {v}")
    (args.folder / "streaming_benchmark.json").write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
