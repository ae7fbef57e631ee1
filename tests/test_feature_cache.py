"""The frozen-encoder feature cache (svlm/data/feature_cache.py): exact features,
the same training losses, reuse, keys that change with what they stand for, and
damaged files found and rebuilt."""

import json
import pickle
import shutil
import threading
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, compose, path_overrides, tiny_train_overrides
from PIL import Image

from svlm.config import ConfigError, load_train_config
from svlm.data.chat import ChatEncoder
from svlm.data.dataset import ChatDataset, Collator, LazyChatDataset
from svlm.data.feature_cache import FEATURES, INDEX, FeatureCache, attach, encoder_key
from svlm.data.formats import DataError
from svlm.data.images import open_image
from svlm.models.vision import ImageProcessor, VisionConfig, VisionEncoder
from svlm.training.loop import train

VISION = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_layers=1, num_heads=2)


@pytest.fixture
def vision() -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(VisionConfig(**VISION)).eval()


@pytest.fixture
def processor() -> ImageProcessor:
    return ImageProcessor(VisionConfig(**VISION))


@pytest.fixture
def images(shapes_root, tmp_path) -> list[Path]:
    """Copies of 6 pictures (the tests edit them) and one duplicate of the first."""
    folder = tmp_path / "images"
    folder.mkdir()
    files = [shutil.copy(p, folder) for p in sorted((shapes_root / "images").glob("train-*.png"))[:6]]
    shutil.copy(files[0], folder / "same-as-first.png")
    return [Path(f) for f in files] + [folder / "same-as-first.png"]


def encoder_output(vision, processor, files) -> torch.Tensor:
    with torch.no_grad():
        return vision(torch.stack([processor(open_image(f)) for f in files]))  # (n, P, Dv)


def cached(cache: FeatureCache, files) -> torch.Tensor:
    view = cache.view(cache.image_keys(files))
    return torch.stack([view.get(f, str(f)) for f in files])


def test_cached_features_equal_the_encoder_output(tmp_path, vision, processor, images):
    cache = FeatureCache(tmp_path / "features", vision, processor)
    keys = cache.image_keys(images)
    assert keys[images[0]] == keys[images[-1]]  # the same bytes: one image key, one row
    assert cache.fill(keys, vision, show_progress=False) == 6
    got = cached(cache, images)
    assert got.dtype == torch.float16 and got.shape == (7, 16, 32)
    torch.testing.assert_close(got.float(), encoder_output(vision, processor, images), atol=2e-3, rtol=1e-3)
    assert cache.fill(cache.image_keys(images), vision, show_progress=False) == 0  # nothing new
    meta = json.loads((cache.folder / "meta.json").read_text())
    assert meta["row_shape"] == [16, 32] and meta["dtype"] == "float16"


def test_keys_change_with_weights_settings_and_pixels(tmp_path, vision, processor, images):
    key = encoder_key(vision, processor)
    same = VisionEncoder(VisionConfig(**VISION))  # other random weights, then the same ones loaded
    assert encoder_key(same, processor) != key
    same.load_state_dict(vision.state_dict())
    assert encoder_key(same, processor) == key  # e.g. the encoder of a saved stage-1 model
    with torch.no_grad():
        same.dinov2.encoder.layer[0].mlp.fc1.weight[0, 0] += 1e-4
    assert encoder_key(same, processor) != key
    other_stats = ImageProcessor(VisionConfig(**VISION, image_mean=[0.5, 0.5, 0.5]))
    assert encoder_key(vision, other_stats) != key
    for change in ({"use_cls": True}, {"feature_layer": -1}):
        other = VisionEncoder(VisionConfig(**VISION, **change))
        other.load_state_dict(vision.state_dict())
        assert encoder_key(other, processor) != key, change

    # An image edited in place gets a new key: its features are computed again, never served stale.
    cache = FeatureCache(tmp_path / "features", vision, processor)
    cache.fill(cache.image_keys(images), vision, show_progress=False)
    before = cache.image_keys(images)[images[1]]
    Image.open(images[2]).save(images[1])  # same name, other picture
    keys = cache.image_keys(images)
    assert keys[images[1]] != before
    assert cache.fill(keys, vision, show_progress=False) == 0  # that content (images[2]) is cached already
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (1, 2, 3)).save(images[1])
    assert cache.fill(cache.image_keys(images), vision, show_progress=False) == 1
    torch.testing.assert_close(
        cached(cache, images[1:2]).float(), encoder_output(vision, processor, images[1:2]), atol=2e-3, rtol=1e-3
    )


@pytest.mark.parametrize("damage", ["truncated", "flipped", "bad index", "unfinished rows"])
def test_damaged_cache_is_found_and_rebuilt(tmp_path, vision, processor, images, damage):
    cache = FeatureCache(tmp_path / "features", vision, processor, log=lambda m: None)
    cache.fill(cache.image_keys(images), vision, show_progress=False)
    features, index = cache.folder / FEATURES, cache.folder / INDEX
    data = bytearray(features.read_bytes())
    if damage == "truncated":  # e.g. a full disk
        features.write_bytes(data[: len(data) // 2])
        expected = 6
    elif damage == "flipped":  # a damaged block in one row
        row = json.loads(index.read_text())["entries"][cache.image_keys(images[3:4])[images[3]]][0]
        data[row * cache.row_bytes + 10] ^= 0xFF
        features.write_bytes(bytes(data))
        expected = 1
    elif damage == "bad index":
        index.write_text('{"format": 1, "rows": 6, "entr')
        expected = 6
    else:  # a run killed after writing rows, before its index: rows nobody points to
        features.write_bytes(bytes(data) + b"\x00" * (cache.row_bytes + 7))
        expected = 0
    assert cache.fill(cache.image_keys(images), vision, show_progress=False) == expected
    torch.testing.assert_close(
        cached(cache, images).float(), encoder_output(vision, processor, images), atol=2e-3, rtol=1e-3
    )


def test_two_runs_filling_one_cache_take_turns(tmp_path, vision, processor, images):
    caches = [FeatureCache(tmp_path / "features", vision, processor) for _ in range(2)]
    computed = []
    threads = [
        threading.Thread(target=lambda c=c: computed.append(c.fill(c.image_keys(images), vision, False)))
        for c in caches
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(computed) == [0, 6]  # the second waited for the lock and found every row
    assert json.loads((caches[0].folder / INDEX).read_text())["rows"] == 6
    torch.testing.assert_close(
        cached(caches[1], images).float(), encoder_output(vision, processor, images), atol=2e-3, rtol=1e-3
    )


def test_data_sets_yield_cached_features(tmp_path, shapes_root, tokenizer, vision, processor):
    encoder = ChatEncoder(tokenizer, 4)
    path = shapes_root / "pretrain_val.jsonl"
    for ds in (
        ChatDataset([path], shapes_root / "images", encoder, processor, 256),
        LazyChatDataset(path, shapes_root / "images", encoder, processor, 256),
    ):
        plain = [ds[i] for i in range(4)]
        view, _ = attach(ds, vision, processor, tmp_path / "features", log=lambda m: None)
        assert len(view) == len(ds.image_files()) == 16
        items = [ds[i] for i in range(4)]
        assert all(it["pixel_values"] is None and it["vision_features"].shape == (1, 16, 32) for it in items)
        with torch.no_grad():
            expected = vision(torch.cat([it["pixel_values"] for it in plain]))
        batch = Collator(encoder.pad_id)(items)
        assert batch["pixel_values"].shape[0] == 0
        torch.testing.assert_close(batch["vision_features"].float(), expected, atol=2e-3, rtol=1e-3)
        worker_copy = pickle.loads(pickle.dumps(ds))  # what a data-loader worker gets: no array inside
        assert len(pickle.dumps(view)) < 10_000
        assert torch.equal(worker_copy[0]["vision_features"], items[0]["vision_features"])
    # an image that cannot be decoded is a bad sample, as without the cache
    with pytest.raises(DataError, match="missing image|unreadable"):
        view.get(tmp_path / "nothing.png", "x:1")


def _losses(run: Path, stage: str = "stage1", key: str = "train/loss") -> list[float]:
    lines = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [m[key] for m in lines if key in m]


def test_training_with_the_cache(tmp_path, cache_dir, shapes_root, capsys, monkeypatch):
    def run(name, *extra, stage="stage1"):
        overrides = [*tiny_train_overrides(stage), *path_overrides(tmp_path, cache_dir, tmp_path / name), *extra]
        train(load_train_config(compose("train", overrides)))
        return tmp_path / name

    frozen = ["stage.train_vision=false", "stage.log_every=1"]
    plain = _losses(run("plain", *frozen, "data.feature_cache=false"))
    assert "feature cache" not in capsys.readouterr().out
    shutil.rmtree(cache_dir / "features", ignore_errors=True)  # what earlier tests of the session cached
    with_cache = _losses(run("cached", *frozen, "data.feature_cache=true"))
    out = capsys.readouterr().out
    assert "training feature cache:" in out and "validation feature cache:" in out
    # 3 steps of 8 (and one batch to spare) read 32 of the 60 training pictures: only those are encoded
    assert "32 of 32 images cached (the ones this run reads, of 64 samples), 32 computed now" in out, out
    assert len(plain) == len(with_cache) == 3
    np.testing.assert_allclose(with_cache, plain, rtol=2e-3)
    # validation reads the cache too, and scores the same
    plain_val, cached_val = (_losses(tmp_path / name, key="val/loss") for name in ("plain", "cached"))
    assert len(plain_val) == len(cached_val) == 1
    np.testing.assert_allclose(cached_val, plain_val, rtol=2e-3)

    # A run reads what it encoded before; stage 2 (the same frozen encoder, from the stage-1 model)
    # uses the same cache, and a later run computes nothing.
    folders = [p for p in (cache_dir / "features").iterdir() if p.is_dir()]
    both = ["stage.stage1.train_vision=false", "stage.stage2.train_vision=false"]
    both += ["stage.stage1.sample_grid=0", "stage.stage2.sample_grid=0"]  # the grid reads its pictures,
    both += ["stage.stage1.skills=0", "stage.stage2.skills=0"]  # and so do the skill questions (blank ones too)
    run("both-first", *both, stage="both")
    out = capsys.readouterr().out
    assert out.count("feature cache:") == 4 and ", 0 computed now" in out, out  # stage 1 drew the same pictures
    assert [p for p in (cache_dir / "features").iterdir() if p.is_dir()] == folders  # one key for both stages
    stamps = {p: (p / FEATURES).stat().st_mtime_ns for p in folders}
    encoder_calls = []
    real_forward = VisionEncoder.forward

    def counted(self, x):
        where = traceback.format_stack()
        if not any("svlm/memory/__init__.py" in f for f in where):  # the planner measures its own small models
            encoder_calls.append("".join(where[-8:]))
        return real_forward(self, x)

    monkeypatch.setattr(VisionEncoder, "forward", counted)
    run("both", *both, stage="both")  # data.feature_cache=auto: on, the encoder is frozen
    out = capsys.readouterr().out
    assert out.count("feature cache:") == 4 and out.count(", 0 computed now") == 4, out  # 2 stages x train, val
    assert "val/loss" in (tmp_path / "both" / "stage2" / "metrics.jsonl").read_text()
    assert not encoder_calls, encoder_calls[0]  # training and validation read every feature from the cache
    assert {p: (p / FEATURES).stat().st_mtime_ns for p in folders} == stamps


def test_feature_cache_setting(make_train_cfg):
    cfg = make_train_cfg("data.feature_cache=true", stage="stage1")  # stage1 trains the encoder
    with pytest.raises(ConfigError, match=r"data\.feature_cache=true .*stage\.train_vision=true"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"data\.feature_cache"):
        make_train_cfg("data.feature_cache=sometimes")
    assert make_train_cfg().data.feature_cache == "auto"


@pytest.mark.parametrize(
    "sizes, lengths, resume",
    [(None, None, None), (None, None, (1, 12)), ([20, 17], None, (0, 8)), (None, list(range(37)), None)],
    ids=["shuffled", "resumed", "mixed", "by-length"],
)
def test_sampler_ahead_is_what_the_loader_draws(sizes, lengths, resume):
    """The samples a run will read (what the feature cache encodes) are the ones
    its loader draws: over epochs, after a resume, mixed sources, by length."""
    from torch.utils.data import DataLoader

    from svlm.data.sampler import EpochSampler

    weights = [1.0, 2.0] if sizes else None
    sampler = EpochSampler(37, seed=3, sizes=sizes, weights=weights, lengths=lengths, group=8, window=2)
    epoch = 0
    if resume:
        sampler.start_at(*resume)
        epoch = resume[0]
    for draws in (5, 36, 37, 80, 300):
        expected = sampler.ahead(epoch, draws, micro=4, drop_last=True)
        loader = DataLoader(range(37), batch_size=4, sampler=sampler, drop_last=True)
        drawn, e = [], epoch
        saved = sampler.resume
        while len(drawn) < draws:
            loader.sampler.set_epoch(e)
            drawn += [i for batch in loader for i in batch.tolist()]
            e += 1
        sampler.resume = saved  # iterating used it up; the next draw count starts from the same point
        assert expected == set(drawn[:draws]), draws
    assert sampler.ahead(epoch, 10**6, micro=4, drop_last=True) == set(range(37))  # everything, eventually


def test_a_stop_ends_the_fill_at_once(tmp_path, cache_dir, shapes_root, capsys, monkeypatch):
    """SIGTERM during the fill: it stops after the batch being encoded, keeps what
    was encoded, and the run ends before its first step; run again, it encodes the rest."""
    import os
    import signal

    from svlm.data import feature_cache
    from svlm.training.signals import TrainingStopped

    features = tmp_path / "cache"  # a cache of its own: the encoded rows are counted
    shutil.copytree(cache_dir / "data", features / "data")
    overrides = [*tiny_train_overrides("stage1", steps=6), *path_overrides(tmp_path, features, tmp_path / "run"),
                 "stage.train_vision=false", "data.feature_cache=true"]  # fmt: skip
    real_encode, calls = feature_cache.encode, []

    def encode_then_stop(vision, pixels):
        calls.append(len(pixels))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill <pid>` would, while the first batch is encoded
        return real_encode(vision, pixels)

    monkeypatch.setattr(feature_cache, "encode", encode_then_stop)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM during the feature cache fill") as stopped:
        train(load_train_config(compose("train", overrides)))
    assert stopped.value.exit_code == 0
    out = capsys.readouterr().out
    assert "feature cache: encoding 56 images at" in out and "about" in out  # the estimate, after the first batch
    assert "feature cache: stopped after 32 of 56 images (kept)" in out
    assert calls == [32]  # one batch, then the stop
    (folder,) = [p for p in (features / "features").iterdir() if p.is_dir()]
    assert json.loads((folder / INDEX).read_text())["rows"] == 32
    assert (
        not (tmp_path / "run" / "stage1" / "metrics.jsonl").exists()
        or "train/loss" not in (tmp_path / "run" / "stage1" / "metrics.jsonl").read_text()
    )  # no step was taken
    calls.clear()
    monkeypatch.setattr(feature_cache, "encode", lambda vision, pixels: calls.append(len(pixels)) or real_encode(
        vision, pixels))  # fmt: skip
    train(load_train_config(compose("train", [*overrides, f"resume={tmp_path / 'run'}"])))
    # the rest of the (6 + 1 spare) x 8 training pictures, then the validation ones the run reads
    # (stage.val_batches=1 batch of 8)
    assert sum(calls) == 56 - 32 + 8
    assert json.loads((folder / INDEX).read_text())["rows"] == 56 + 8
