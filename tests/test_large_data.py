"""Data larger than memory: line index, lazy reading, mixing sources by weight."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO

from svlm.data.chat import ChatEncoder
from svlm.data.dataset import ChatDataset, LazyChatDataset, MixedDataset
from svlm.data.formats import BadSamples, line_index
from svlm.data.sampler import EpochSampler
from svlm.models.vision import ImageProcessor, VisionConfig
from svlm.training.loop import train


@pytest.fixture
def encoder(tokenizer):
    return ChatEncoder(tokenizer, 4)


PROCESSOR = ImageProcessor(VisionConfig(image_size=32, patch_size=8))


def test_line_index_is_cached_and_invalidated(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    index = line_index(path)
    assert index.tolist() == [[0, 1], [10, 3]]  # byte offset, line number; the empty line is skipped
    assert (tmp_path / ".d.jsonl.svlm-index.npz").is_file()
    with open(path, "a") as f:
        f.write('{"c": 3}\n')
    assert line_index(path).tolist() == [[0, 1], [10, 3], [19, 4]]


def test_lazy_equals_eager(shapes_root, encoder):
    path = shapes_root / "sft_train.jsonl"
    eager = ChatDataset([path], shapes_root / "images", encoder, PROCESSOR, 256)
    lazy = LazyChatDataset(path, shapes_root / "images", encoder, PROCESSOR, 256)
    assert len(lazy) == len(eager)
    for i in range(len(eager)):
        a, b = eager[i], lazy[i]
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        assert (a["pixel_values"] == b["pixel_values"]).all()
    rest, held = lazy.split(0.25, seed=0)
    assert len(held) == 16 and len(rest) == 48 and not set(rest.rows) & set(held.rows)


def test_lazy_bad_lines_are_found_when_read(tmp_path, shapes_root, encoder):
    lines = (shapes_root / "pretrain_train.jsonl").read_text().splitlines()[:10]
    lines[3] = "{broken"
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    bad = BadSamples()
    lazy = LazyChatDataset(tmp_path / "d.jsonl", shapes_root / "images", encoder, PROCESSOR, 256, bad=bad)
    assert len(lazy) == 10  # nothing is parsed at start
    items = [lazy[i] for i in range(10)]
    assert items[3] is None and sum(i is None for i in items) == 1
    assert bad.counts["malformed JSON"] == 1 and f"{tmp_path / 'd.jsonl'}:4" in bad.examples["malformed JSON"][0]
    raising = LazyChatDataset(tmp_path / "d.jsonl", shapes_root / "images", encoder, PROCESSOR, 256, "raise")
    with pytest.raises(ValueError, match="d.jsonl:4: malformed JSON"):
        raising[3]


def test_weighted_sampler_shares():
    sampler = EpochSampler(110, seed=0, sizes=[10, 100], weights=[3, 1])
    sampler.set_epoch(0)
    order = list(sampler)
    by_source = Counter(i < 10 for i in order)
    assert by_source[True] == round(110 * 3 / 4) and by_source[False] == round(110 / 4)
    assert len(order) == len(sampler) and all(0 <= i < 110 for i in order)
    assert set(i for i in order if i < 10) == set(range(10))  # the small source is repeated, all of it
    sampler.set_epoch(1)
    assert list(sampler) != order  # a new draw each epoch


def test_training_on_lazy_mixed_sources(make_train_cfg, tmp_path, shapes_root):
    root = tmp_path / "mix"
    root.mkdir()
    (root / "images").symlink_to(shapes_root / "images")
    lines = (shapes_root / "pretrain_train.jsonl").read_text().splitlines()
    (root / "a.jsonl").write_text("\n".join(lines[:40]) + "\n")
    (root / "b.jsonl").write_text("\n".join(lines[40:]) + "\n")
    cfg = make_train_cfg(
        f"data.root={root}", "data.kind=files", "data.val_file=null", "data.val_fraction=0.1", "data.lazy=always",
        "data.sources=[{file: a.jsonl, weight: 1}, {file: b.jsonl, weight: 3}]", stage="stage1", steps=3,
    )  # fmt: skip
    assert [s.file for s in cfg.data.sources] == ["a.jsonl", "b.jsonl"]
    (model,) = train(cfg)
    meta = json.loads((model / "svlm.json").read_text())
    assert meta["step"] == 3 and meta["metrics"]["val/loss"] > 0


def test_mixed_dataset_example_lookup(shapes_root, encoder):
    path = shapes_root / "pretrain_train.jsonl"
    a = ChatDataset([path], shapes_root / "images", encoder, PROCESSOR, 256)
    b = LazyChatDataset(path, shapes_root / "images", encoder, PROCESSOR, 256)
    mix = MixedDataset([a, b], [1, 1])
    assert mix.example(len(a) + 5).input_ids == a.example(5).input_ids


def test_million_line_benchmark(tmp_path):
    """Builds a 1,000,000-line jsonl and prints start-up time and memory (figures, not asserted)."""
    r = subprocess.run(
        [sys.executable, "benchmarks/large_data.py", "--lines", "1000000", "--folder", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    figures = json.loads((tmp_path / "large_data_benchmark.json").read_text())
    assert figures["lines"] == 1_000_000
    for key in ("first_index_s", "start_with_cached_index_s", "rss_mb", "peak_rss_mb", "samples_per_s"):
        assert key in figures and f"  {key}" in r.stdout
    assert Path(tmp_path / ".big.jsonl.svlm-index.npz").is_file()


def test_length_grouping_cuts_padding(shapes_root, encoder):
    ds = ChatDataset([shapes_root / "sft_train.jsonl"], shapes_root / "images", encoder, PROCESSOR, 256)
    lengths = ds.lengths()

    def padding(sampler) -> float:
        sampler.set_epoch(0)
        order = list(sampler)
        assert sorted(order) == list(range(len(ds)))  # still every sample once an epoch
        pad = total = 0
        for start in range(0, len(order), 8):
            batch = [lengths[i] for i in order[start : start + 8]]
            pad += max(batch) * len(batch) - sum(batch)
            total += max(batch) * len(batch)
        return pad / total

    grouped = padding(EpochSampler(len(ds), 0, lengths=lengths, group=8))
    assert grouped < 0.10 and grouped < padding(EpochSampler(len(ds), 0))
    a, b = EpochSampler(len(ds), 0, lengths=lengths, group=8), EpochSampler(len(ds), 0, lengths=lengths, group=8)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b)  # deterministic by (seed, epoch): exact resume keeps working
