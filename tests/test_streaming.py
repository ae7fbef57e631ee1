"""data.streaming=true (svlm/data/streaming.py): parquet shards read a few row
groups at a time, dealt to processes and workers without overlap, and resumed
exactly (every row of an epoch once, none twice)."""

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_hub_data import as_layout, shapes_rows
from test_reliability import StopAfter, losses
from torch.utils.data import DataLoader

from svlm.data.chat import ChatEncoder
from svlm.data.source import DataFile
from svlm.data.streaming import StreamingChatDataset
from svlm.errors import ConfigError

GROUP = 5  # rows per row group


@pytest.fixture(scope="module")
def shards(shapes_root, tmp_path_factory):
    """The shapes sft rows as two cauldron-layout parquet shards with row groups of GROUP rows."""
    root = tmp_path_factory.mktemp("stream")
    rows = shapes_rows(shapes_root, "sft_train.jsonl")
    half = len(rows) // 2 + 3  # shards of unequal size
    for i, part in enumerate((rows[:half], rows[half:])):
        table = as_layout(part, shapes_root / "images", "cauldron").data.table
        pq.write_table(table, root / f"train-{i:05d}-of-00002.parquet", row_group_size=GROUP)
    val = as_layout(shapes_rows(shapes_root, "sft_val.jsonl"), shapes_root / "images", "cauldron")
    val.to_parquet(str(root / "val.parquet"))
    return root


class WhereStream(StreamingChatDataset):
    """Items are the rows' file:row, to follow which row went where."""

    def item(self, example):
        return example.where


def stream(shards, tokenizer, rank=0, world=1, workers=0, micro=3, buffer=8) -> WhereStream:
    files = [DataFile(Path(shards / "train-*.parquet"), shards)]
    encoder = ChatEncoder(tokenizer, num_image_tokens=4, image_placement="inline")
    ds = WhereStream(files, shards, encoder, None, 512, "raise", None, 8)
    ds.shard_for(rank, world, workers, micro, seed=7, shuffle=True, buffer=buffer)
    return ds


def first_epoch(ds, reader: int) -> list[str]:
    out = []
    for rec, epoch in ds.records(reader, 0):
        if epoch:
            return out
        out.append(rec.where)


def test_readers_share_an_epoch_without_overlap(shards, tokenizer):
    ds = stream(shards, tokenizer, world=2, workers=2)
    assert len(ds) == 64 and ds.readers == 4
    seen = Counter(w for r in range(4) for w in first_epoch(ds, r))
    assert len(seen) == 64 and set(seen.values()) == {1}  # every row of the epoch once
    names = {w.rsplit(":", 1)[0] for w in seen}
    assert names == {str(shards / "train-00000-of-00002.parquet"), str(shards / "train-00001-of-00002.parquet")}
    one = first_epoch(ds, 0)
    assert one != sorted(one, key=lambda w: (w.rsplit(":", 1)[0], int(w.rsplit(":", 1)[1])))  # shuffled
    again = stream(shards, tokenizer, world=2, workers=2)
    assert first_epoch(again, 0) == one  # the same seed, the same order


def test_skipping_rows_continues_the_same_order(shards, tokenizer):
    ds = stream(shards, tokenizer)
    whole = [rec.where for rec, _ in zip((r for r, _ in ds.records(0, 0)), range(150))]  # past two epochs
    for skip in (0, 1, 7, 8, 63, 64, 70):
        part = [rec.where for rec, _ in zip((r for r, _ in ds.records(0, skip)), range(20))]
        assert part == whole[skip : skip + 20], skip


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_gives_the_batches_that_would_have_come(shards, tokenizer, workers):
    """Two processes (ranks built here one by one) with `workers` data-loader workers:
    stop after 5 micro-batches, resume, and the next ones are those of an uninterrupted run."""
    for rank in (0, 1):
        ds = stream(shards, tokenizer, rank=rank, world=2, workers=workers)
        full = [b for b, _ in zip(DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=list), range(30))]
        resumed = stream(shards, tokenizer, rank=rank, world=2, workers=workers)
        resumed.start_at(0, 5 * 3 * 2)  # 5 micro-batches of 3 on each of 2 processes
        rest = [b for b, _ in zip(DataLoader(resumed, batch_size=3, num_workers=workers, collate_fn=list), range(25))]
        assert rest == full[5:]
        # what the loader drew is each of the rank's readers' own order, batch by batch
        readers = [rank * max(1, workers) + w for w in range(max(1, workers))]
        orders = {r: [rec.where for rec, _ in zip((x for x, _ in ds.records(r, 0)), range(100))] for r in readers}
        for b, batch in enumerate(full):
            r, nth = readers[b % len(readers)], b // len(readers)
            assert batch == orders[r][nth * 3 : nth * 3 + 3]


def test_too_few_row_groups_for_the_readers(shards, tokenizer):
    with pytest.raises(ConfigError, match="row group\\(s\\) in 2 shard\\(s\\) for 40 readers"):
        stream(shards, tokenizer, world=4, workers=10)


def streaming_data(shards) -> list[str]:
    return ["data.kind=files", f"data.root={shards}", "data.train_file='train-*.parquet'", "data.val_file=val.parquet",
            "data.test_file=null", "data.streaming=true", "data.shuffle_buffer=8", "data.on_error=raise"]  # fmt: skip


def test_streamed_training_resumes_exactly(shards, make_train_cfg, tmp_path, monkeypatch):
    from svlm.training import loop
    from svlm.training.checkpoint import checkpoints, load_trainer_state
    from svlm.training.signals import TrainingStopped

    extra = [*streaming_data(shards), "stage.log_every=1", "stage.eval_every=3", "stage.sample_grid=0"]
    full = make_train_cfg(*extra, stage="stage1", steps=6, run_dir=tmp_path / "full")
    loop.train(full)
    cut = make_train_cfg(*extra, stage="stage1", steps=6, run_dir=tmp_path / "cut")
    monkeypatch.setattr(loop, "StopRequested", StopAfter)
    with pytest.raises(TrainingStopped):
        loop.train(cut)
    monkeypatch.undo()
    (ckpt,) = checkpoints(tmp_path / "cut" / "stage1")
    state = load_trainer_state(ckpt)
    assert state["stream"] == {"readers": 1, "micro": 8, "seed": 0, "rows": 64}
    loop.train(make_train_cfg(*extra, f"resume={tmp_path / 'cut'}", stage="stage1", steps=6))
    a, b = losses(tmp_path / "full", "stage1"), losses(tmp_path / "cut", "stage1")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [b[s] for s in a] == pytest.approx([a[s] for s in a], rel=1e-5)
    with pytest.raises(ConfigError, match="exact resume of data.streaming needs the same"):
        loop.train(make_train_cfg(*extra, f"resume={ckpt}", "hardware.num_workers=2", stage="stage1", steps=6,
                                  run_dir=tmp_path / "other"))  # fmt: skip
    bad = json.loads((tmp_path / "cut" / "stage1" / "bad_samples.json").read_text())
    assert bad["total"] == 0


def test_streaming_config_errors(shards, make_train_cfg):
    with pytest.raises(ConfigError, match="cannot hold out data.val_fraction"):
        make_train_cfg(*streaming_data(shards), "data.val_file=null", "data.val_fraction=0.1")
    with pytest.raises(ConfigError, match="data.feature_cache=true caches one view .* which data.streaming=true"):
        from svlm.data.feature_cache import cache_applies

        cache_applies(True, False, "stage2", "data.streaming=true")
    assert cache_applies("auto", False, "stage2", "data.streaming=true") is False  # images not known ahead
