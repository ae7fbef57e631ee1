"""Packing on mixed-length data: padding and training samples/s, a row a sample against packed.

    python benchmarks/packing.py --folder /tmp/mixed            # writes the data once, then runs svlm.bench

Writes (once) --samples records in the svlm layout into --folder: one 64x64
picture each and an answer of a length drawn uniformly so that whole
samples (picture slots, question and answer, as the chat template encodes
them) run from about 30 to about 1,500 tokens, as real instruction data mixes
short captions and long chats. Then runs `python -m svlm.bench` on it
(model=tiny with a 2,048-token context, data.max_len=2048, batches of 32 in
micro-batches of 16) with bench.data_steps: the padding share of an epoch's
micro-batches both ways, and samples/s of training steps on the same samples
both ways. Extra arguments go to svlm.bench (e.g. hardware=cpu).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("red blue green circle square triangle left right top bottom small large shape picture colour "
         "the a of and is in on with there near far above below").split()  # fmt: skip


def write_data(folder: Path, samples: int, seed: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "mixed.jsonl"
    if data.exists():
        return data
    rng = random.Random(seed)
    (folder / "images").mkdir(exist_ok=True)
    with data.open("w") as f:
        for k in range(samples):
            name = f"{k:05d}.png"
            colour = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (64, 64), colour).save(folder / "images" / name)
            words = rng.randint(2, 1200)  # our 512-token BPE spends about 1.2 tokens a word here
            answer = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"image": name, "conversations": [
                {"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": answer}]}) + "\n")  # fmt: skip
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4, help="training steps timed each way")
    args, extra = ap.parse_known_args()
    data = write_data(args.folder, args.samples, args.seed)
    command = [sys.executable, "-m", "svlm.bench", "data=llava", f"data.root={args.folder}",
               f"data.train_file={data.name}", "data.image_dir=images", "data.val_fraction=0", "data.max_len=2048",
               "model.lm.max_seq_len=2048", "stage=stage2", "stage.batch_size=32", "hardware.micro_batch_size=16",
               f"paths.cache={args.folder / 'cache'}", f"paths.outputs={args.folder / 'outputs'}",
               "bench.steps=1", "bench.rounds=1", "bench.warmup=1", "bench.gen_tokens=0", "bench.data_images=50",
               f"bench.data_steps={args.steps}", *extra]  # fmt: skip
    sys.exit(subprocess.run(command, cwd=REPO).returncode)


if __name__ == "__main__":
    main()
