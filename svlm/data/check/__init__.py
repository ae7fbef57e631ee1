"""Check a data set without training:

    python -m svlm.data.check data=svlm data.root=Svlmdata tokenizer.path=llava-1.5-7b-hf [model=svlm] [stage=...]

Takes the same overrides as train.py. For every file the chosen stages read
(train, validation, test) -- jsonl/JSON files or tables (parquet, arrow,
save_to_disk and hub repository folders) of any format -- it parses every
record, tokenizes it with the chat template, opens and decodes every image
(embedded bytes too), and reports: good and bad samples by reason with the
first examples (file:line, or file:row of a table), samples cut to
data.max_len, a histogram of token lengths, and the share of supervised
(answer) tokens. The report is printed and written to
outputs/check/<time>/report.json. Exit code 1 when anything is bad.
"""

from __future__ import annotations

from collections import Counter

from svlm.config import TrainConfig
from svlm.data.chat import IGNORE, ChatEncoder, chat_format_of
from svlm.data.dataset import ChatDataset, TableChatDataset
from svlm.data.formats import BadSamples, DataError
from svlm.data.images import open_image
from svlm.data.source import DataFile, data_root, split_file, train_files
from svlm.errors import ConfigError
from svlm.models.projector import count_tokens
from svlm.models.vision import sync_with_checkpoint
from svlm.tokenizer import tokenizer_for_data


def histogram(lengths: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """Text bars of a length distribution."""
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((n - lo) // step for n in lengths)
    top = max(counts.values())
    return [
        f"  {lo + i * step:>6}-{lo + (i + 1) * step - 1:<6} {counts[i]:>8}  {'#' * max(1, round(width * counts[i] / top)) if counts[i] else ''}"
        for i in range((hi - lo) // step + 1)
    ]


def check_file(file: DataFile, encoder: ChatEncoder, max_len: int, max_images: int = 8) -> dict:
    """Every record of one source parsed, encoded and its images decoded (bad ones counted by reason)."""
    bad = BadSamples()
    examples = []
    if file.is_table:  # rows read one at a time
        ds = TableChatDataset(file.table(), file.images, encoder, None, max_len, "skip", bad, max_images, file.fmt)
        for i in range(len(ds)):
            try:
                examples.append(ds.example(i))
            except DataError as e:
                bad.add(e)
    else:
        try:
            ds = ChatDataset([file.path], file.images, encoder, None, max_len, "skip", bad, max_images, file.fmt)
            examples = ds.examples
        except ValueError:  # no usable sample at all: the reasons are in `bad`
            ds = None
    truncated = ds.truncated if ds is not None else []
    decoded = []
    for ex in examples:  # every image, fully decoded
        try:
            for image in ex.images:
                open_image(image, ex.where)
            decoded.append(ex)
        except DataError as e:
            bad.add(e)
    examples = decoded
    lengths = [len(ex.input_ids) for ex in examples]
    supervised = sum(sum(lab != IGNORE for lab in ex.labels) for ex in examples)
    return {
        "file": str(file.path) + (f" (subset {file.subset}, split {file.split})" if file.subset else ""),
        "good": len(examples),
        "bad": bad.total,
        "bad_by_reason": dict(bad.counts),
        "bad_examples": bad.examples,
        "truncated": len(truncated),
        "truncated_examples": truncated[:5],
        "tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)} if lengths else {},
        "supervised_share": supervised / max(1, sum(lengths)),
        "histogram": histogram(lengths) if lengths else [],
        "images_per_sample": dict(sorted(Counter(len(ex.images) for ex in examples).items())),
        "tile_grids": dict(sorted(Counter(f"{r}x{c}" for ex in examples for r, c in ex.grids or []).items())),
    }


def check(cfg: TrainConfig) -> dict:
    root = data_root(cfg.data, cfg.paths.cache)
    tasks = list(dict.fromkeys(s.task for s in cfg.stages()))
    tokenizer = tokenizer_for_data(cfg.tokenizer, train_files(cfg.data, root, tasks[0]))
    vision = sync_with_checkpoint(cfg.model.vision) if cfg.model.vision.path else cfg.model.vision
    grid = vision.image_size // vision.patch_size
    n_slots = count_tokens(cfg.model.projector, grid * grid + vision.use_cls)
    encoder = ChatEncoder(tokenizer, n_slots, cfg.model.image_placement, chat_format_of(tokenizer),
                          tiling=vision.tiling)  # fmt: skip
    max_len = min(cfg.data.max_len, cfg.model.lm.max_seq_len)
    reports = []
    seen = set()
    for task in tasks:
        files = train_files(cfg.data, root, task)
        for split in ("val", "test"):
            try:
                file = split_file(cfg.data, root, split, task)
            except ConfigError as e:
                print(f"note: {e}")
                continue
            if file is not None:
                files.append(file)
        for file in files:
            if file not in seen:
                seen.add(file)
                reports.append(check_file(file, encoder, max_len, cfg.data.max_images))
    return {"data": cfg.data.name, "root": str(root), "max_len": max_len,
            "image_tokens": encoder.num_image_tokens, "files": reports}  # fmt: skip


def print_report(report: dict) -> None:
    print(f"data={report['data']} root={report['root']} (max_len {report['max_len']}, "
          f"{report['image_tokens']} image tokens a picture)")  # fmt: skip
    for r in report["files"]:
        print(f"\n{r['file']}: {r['good']} good, {r['bad']} bad, {r['truncated']} cut to max_len")
        for reason, n in sorted(r["bad_by_reason"].items(), key=lambda kv: -kv[1]):
            print(f"  {reason}: {n}")
            for ex in r["bad_examples"][reason][:3]:
                print(f"    {ex}")
        for where in r["truncated_examples"][:3]:
            print(f"  cut to max_len: {where}")
        if r["tokens"]:
            t = r["tokens"]
            print(f"  tokens a sample: min {t['min']}, mean {t['mean']:.1f}, max {t['max']}; "
                  f"supervised share {r['supervised_share']:.1%}")  # fmt: skip
            print("\n".join(r["histogram"]))
        if r["images_per_sample"]:
            counts = ", ".join(f"{n}: {k}" for n, k in r["images_per_sample"].items())
            print(f"  samples by number of images: {counts}")
        if r["tile_grids"]:
            grids = ", ".join(f"{g}: {k}" for g, k in r["tile_grids"].items())
            print(f"  images by tile grid (rows x columns): {grids}")
    total_bad = sum(r["bad"] for r in report["files"])
    print(f"\n{'OK: no bad samples' if not total_bad else f'{total_bad} bad sample(s)'}")
