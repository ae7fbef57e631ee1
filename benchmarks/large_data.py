"""How a training data set of a million lines starts, and what it costs in memory.

    python benchmarks/large_data.py --lines 1000000 --folder /tmp/big

Writes (once) a jsonl file of --lines conversations about a few pictures into
--folder, then measures: building the line index the first time, starting a
lazily read data set when the index is cached (what a training run does
at start), reading batches, and the process's resident memory. Prints one
table and writes the figures as JSON next to the data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import svlm  # noqa: E402,F401  (the OpenMP wait policy before torch)


def rss_mb() -> float:
    """The current resident memory of this process (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_data(folder: Path, lines: int) -> Path:
    from PIL import Image

    path = folder / "big.jsonl"
    if path.is_file() and sum(1 for _ in open(path, "rb")) == lines:
        return path
    (folder / "images").mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
    for name, rgb in colours.items():
        Image.new("RGB", (64, 64), rgb).save(folder / "images" / f"{name}.png")
    names = list(colours)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(lines):
            c = names[i % len(names)]
            f.write(json.dumps({"id": i, "image": f"{c}.png", "conversations": [
                {"role": "user", "content": f"<image>\nWhat colour is picture {i}?"},
                {"role": "assistant", "content": c}]}) + "\n")  # fmt: skip
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader

    from svlm.data.chat import ChatEncoder
    from svlm.data.dataset import Collator, LazyChatDataset
    from svlm.data.formats import line_index
    from svlm.models.vision import ImageProcessor, VisionConfig
    from svlm.tokenizer import train_bpe

    args.folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    path = write_data(args.folder, args.lines)
    write_s = time.perf_counter() - t
    tok = train_bpe(["What colour is picture 123? red green blue yellow"] * 50, 300)
    encoder = ChatEncoder(tok, 16)
    processor = ImageProcessor(VisionConfig(image_size=64, patch_size=8))
    for cache in args.folder.glob(".big.jsonl.svlm-index*"):
        cache.unlink()
    rss_before = rss_mb()

    t = time.perf_counter()
    line_index(path)  # the first time: a pass over the file
    index_s = time.perf_counter() - t

    t = time.perf_counter()  # what a run does at start once the index is cached
    ds = LazyChatDataset(path, args.folder / "images", encoder, processor, max_len=256)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, collate_fn=Collator(encoder.pad_id),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    it = iter(loader)
    next(it)
    start_s = time.perf_counter() - t

    t = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    batch_s = (time.perf_counter() - t) / args.batches
    figures = {
        "lines": len(ds),
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "write_s": round(write_s, 2),
        "first_index_s": round(index_s, 2),
        "start_with_cached_index_s": round(start_s, 3),
        "batch_ms": round(batch_s * 1000, 2),
        "samples_per_s": round(args.batch_size / batch_s),
        "rss_mb": round(rss_mb(), 1),
        "rss_growth_mb": round(rss_mb() - rss_before, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    width = max(len(k) for k in figures)
    print("large-data benchmark (lazy jsonl, line index cached beside the file)")
    for k, v in figures.items():
        print(f"  {k:<{width}}  {v}")
    (args.folder / "large_data_benchmark.json").write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
