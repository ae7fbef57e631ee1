import collections
import filecmp
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from svlm.data.chat import IGNORE, ChatEncoder
from svlm.data.dataset import ChatDataset, Collator
from svlm.data.formats import BadSamples, DataError, parse_record, read_records
from svlm.data.images import open_image
from svlm.data.shapes import ShapesSpec, build_shapes
from svlm.models.vision import ImageProcessor, VisionConfig

SMALL = dict(n_train=6, n_val=2, n_test=3, image_size=32)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- shapes data


def test_build_is_deterministic(tmp_path):
    a = build_shapes(ShapesSpec(**SMALL), tmp_path / "a")
    b = build_shapes(ShapesSpec(**SMALL), tmp_path / "b")
    names = sorted(p.name for p in a.glob("*.jsonl"))
    assert names == ["pretrain_train.jsonl", "pretrain_val.jsonl", "sft_test.jsonl", "sft_train.jsonl", "sft_val.jsonl"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    images = sorted(p.name for p in (a / "images").iterdir())
    assert len(images) == 6 + 2 + 3
    match, mismatch, errors = filecmp.cmpfiles(a / "images", b / "images", images, shallow=False)
    assert not mismatch and not errors
    # another seed gives other data
    c = build_shapes(ShapesSpec(**SMALL, seed=1), tmp_path / "c")
    assert (c / "sft_train.jsonl").read_bytes() != (a / "sft_train.jsonl").read_bytes()


def test_build_is_cached(tmp_path):
    root = build_shapes(ShapesSpec(**SMALL), tmp_path)
    stamp = (root / "sft_train.jsonl").stat().st_mtime_ns
    assert build_shapes(ShapesSpec(**SMALL), tmp_path) == root
    assert (root / "sft_train.jsonl").stat().st_mtime_ns == stamp
    assert build_shapes(ShapesSpec(**{**SMALL, "n_train": 7}), tmp_path) != root


def test_file_format(shapes_root):
    for name, n in [("pretrain_train.jsonl", 64), ("sft_train.jsonl", 64), ("pretrain_val.jsonl", 16)]:
        records = read_jsonl(shapes_root / name)
        assert len(records) == n
        for rec in records:
            assert (shapes_root / "images" / rec["image"]).is_file()
            conv = rec["conversations"]
            assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
            assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in conv)
            assert conv[0]["content"].startswith("<image>\n")
            assert sum(m["content"].count("<image>") for m in conv) == 1
            assert rec["lang"] in ("en", "zh")
    test = read_jsonl(shapes_root / "sft_test.jsonl")
    assert len(test) == 16 * 4  # one question of each type a picture
    assert collections.Counter(r["type"] for r in test) == {t: 16 for t in ("colour", "kind", "size", "position")}
    with Image.open(shapes_root / "images" / test[0]["image"]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    # both languages, with Chinese text in the Chinese records
    zh = [r for r in test if r["lang"] == "zh"]
    assert zh and all(any("\u4e00" <= ch <= "\u9fff" for ch in r["conversations"][1]["content"]) for r in zh)


def test_many_shapes_add_count_and_exists(tmp_path):
    root = build_shapes(ShapesSpec(n_train=4, n_val=1, n_test=12, image_size=32, max_shapes=4), tmp_path)
    test = read_jsonl(root / "sft_test.jsonl")
    types = collections.Counter(r["type"] for r in test)
    assert types["count"] == 12 and types["exists"] == 12
    en = {"1", "2", "3", "4"}
    zh = {"一", "两", "三", "四"}
    for r in test:
        answer = r["conversations"][1]["content"]
        if r["type"] == "count":
            assert answer in (en if r["lang"] == "en" else zh)
        if r["type"] == "exists":
            assert answer in (("yes", "no") if r["lang"] == "en" else ("有", "没有"))
    assert len({r["conversations"][1]["content"] for r in test if r["type"] == "count" and r["lang"] == "en"}) > 1


def test_records_list_the_objects_drawn(tmp_path):
    """Each shape's attributes, and a centre in the quadrant its caption names, for the object head."""
    root = build_shapes(ShapesSpec(n_train=20, n_val=1, n_test=1, image_size=64, max_shapes=4), tmp_path)
    quadrants = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
    for rec in read_jsonl(root / "pretrain_train.jsonl"):
        text = rec["conversations"][1]["content"]
        if rec["lang"] != "en":
            continue
        assert 1 <= len(rec["objects"]) <= 4
        for o in rec["objects"]:
            (place,) = [p for p, (col, row) in quadrants.items() if int(o["x"] * 2) == col and int(o["y"] * 2) == row]
            assert f"{o['size']} {o['colour']} {o['kind']} in the {place}" in text
            assert 0.1 < o["r"] < 0.25


def test_questions_cannot_be_guessed(tmp_path):
    """The best answer that ignores the picture (the most frequent training answer to
    each question) must score poorly on the test set."""
    root = build_shapes(ShapesSpec(n_train=300, n_val=1, n_test=200, image_size=32), tmp_path)
    answers = collections.defaultdict(collections.Counter)
    for rec in read_jsonl(root / "sft_train.jsonl"):
        conv = rec["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            answers[q["content"].removeprefix("<image>\n")][a["content"]] += 1
    hits = total = 0
    for rec in read_jsonl(root / "sft_test.jsonl"):
        q, a = rec["conversations"]
        seen = answers[q["content"].removeprefix("<image>\n")]
        assert seen, f"test question never asked in training: {q['content']!r}"
        hits += seen.most_common(1)[0][0] == a["content"]
        total += 1
    assert total == 800
    assert hits / total < 0.35


def test_spec_validation():
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesSpec(max_shapes=5)
    with pytest.raises(ValueError, match="image_size"):
        ShapesSpec(image_size=16)
    with pytest.raises(ValueError, match="languages"):
        ShapesSpec(languages=("fr",))


# ---------------------------------------------------------- dataset, collator


@pytest.fixture
def encoder(tokenizer):
    return ChatEncoder(tokenizer, num_image_tokens=4)


@pytest.fixture
def processor():
    return ImageProcessor(VisionConfig(image_size=32, patch_size=8))


def test_dataset_and_collator(shapes_root, encoder, processor):
    ds = ChatDataset([shapes_root / "sft_train.jsonl"], shapes_root / "images", encoder, processor, max_len=512)
    assert len(ds) == 64 and ds.bad.total == 0
    lengths = ds.lengths()
    picks = [lengths.index(min(lengths)), lengths.index(max(lengths)), 5]
    items = [ds[i] for i in picks]
    batch = Collator(encoder.pad_id)(items)
    T = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, T)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == item["input_ids"]
        assert batch["labels"][b, :n].tolist() == item["labels"]
        assert (batch["input_ids"][b, n:] == encoder.pad_id).all()
        assert (batch["labels"][b, n:] == IGNORE).all()
        assert (batch["input_ids"][b] == encoder.image_id).sum() == 4
    assert (batch["labels"][0] == IGNORE).sum() > T - min(lengths)  # the shortest row is padded


def test_dataset_truncates_to_max_len(shapes_root, encoder, processor):
    ds = ChatDataset([shapes_root / "sft_train.jsonl"], shapes_root / "images", encoder, processor, max_len=24)
    assert max(ds.lengths()) <= 24


def test_collator_without_images():
    batch = Collator(0)([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "pixel_values": None}, None])
    assert batch["input_ids"].tolist() == [[5, 6, 7]]
    assert batch["pixel_values"].numel() == 0


# ------------------------------------------------------------------- formats


def test_llava_format(tmp_path):
    rec = {
        "id": "x1",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Black."},
        ],
    }
    (tmp_path / "llava.json").write_text(json.dumps([rec]))
    (tmp_path / "llava.jsonl").write_text(json.dumps(rec) + "\n")
    for name in ("llava.json", "llava.jsonl"):
        (r,) = list(read_records(tmp_path / name))
        assert r.turns == [
            ("user", "<image>\nWhat is this?"),
            ("assistant", "A cat."),
            ("user", "Colour?"),
            ("assistant", "Black."),
        ]
        assert r.images == ["a.png"] and r.meta == {"id": "x1"}
    assert list(read_records(tmp_path / "llava.json"))[0].where == f"{tmp_path / 'llava.json'}[0]"


def test_svlm_format_roles_case_insensitive():
    r = parse_record(
        {"conversations": [{"role": "User", "content": "hi"}, {"role": "ASSISTANT", "content": "yo"}]}, "f:1"
    )
    assert r.turns == [("user", "hi"), ("assistant", "yo")] and r.images == []


GOOD = {"image": "good.png", "conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}


@pytest.fixture
def messy(tmp_path):
    """A jsonl with one good record and one of each kind of problem."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "good.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    lines = [
        json.dumps(GOOD),  # 1
        '{"image": "good.png", "conversations": [',  # 2: malformed JSON
        "",  # 3: blank lines are fine
        json.dumps({**GOOD, "conversations": [{"role": "system", "content": "x"}, *GOOD["conversations"]]}),  # 4
        json.dumps({**GOOD, "image": "absent.png"}),  # 5: missing image
        json.dumps({**GOOD, "image": "corrupt.png"}),  # 6: corrupt image
        json.dumps({"conversations": [{"role": "user", "content": "<image>\nQ"}, GOOD["conversations"][1]]}),  # 7
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, images


def test_read_records_reports_file_and_line(messy):
    path, _ = messy
    bad = BadSamples()
    records = list(read_records(path, on_error="skip", bad=bad))
    assert [r.where for r in records] == [f"{path}:{n}" for n in (1, 5, 6, 7)]
    assert bad.counts == {"malformed JSON": 1, "unknown role": 1}
    assert bad.examples["unknown role"][0].startswith(f"{path}:4: unknown role")
    with pytest.raises(DataError) as e:
        list(read_records(path, on_error="raise"))
    assert e.value.where == f"{path}:2" and e.value.reason == "malformed JSON"


def test_dataset_skips_and_counts(messy, encoder, processor):
    path, images = messy
    bad = BadSamples()
    ds = ChatDataset([path], images, encoder, processor, max_len=64, on_error="skip", bad=bad)
    # line 1 and line 6 (its image is only opened when the sample is read)
    assert [e.where for e in ds.examples] == [f"{path}:1", f"{path}:6"]
    assert bad.counts == {"malformed JSON": 1, "unknown role": 1, "missing image": 2}
    assert any(ex.startswith(f"{path}:5: missing image") for ex in bad.examples["missing image"])
    assert any(ex.startswith(f"{path}:7: missing image") for ex in bad.examples["missing image"])
    assert ds[0]["pixel_values"].shape == (1, 3, 32, 32)  # (images, 3, S, S)
    assert ds[1] is None  # the corrupt image is skipped ...
    assert bad.counts["unreadable image"] == 1  # ... and counted
    assert f"{path}:6" in bad.examples["unreadable image"][0]
    assert "5 bad sample(s)" in bad.summary()
    # the collator drops the skipped sample
    batch = Collator(encoder.pad_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1


@pytest.mark.parametrize(
    ("drop", "where", "reason"),
    [
        ([], 2, "malformed JSON"),
        ([2], 4, "unknown role"),
        ([2, 4], 5, "missing image"),
        ([2, 4, 5], 7, "missing image"),
    ],
)
def test_dataset_raises(messy, encoder, processor, drop, where, reason):
    path, images = messy
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line if n not in drop else "" for n, line in enumerate(lines, 1)) + "\n")
    with pytest.raises(DataError) as e:
        ChatDataset([path], images, encoder, processor, max_len=64, on_error="raise")
    assert e.value.where == f"{path}:{where}" and e.value.reason == reason


def test_corrupt_image_raises(messy, encoder, processor):
    path, images = messy
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[5] + "\n")
    ds = ChatDataset([path], images, encoder, processor, max_len=64, on_error="raise")
    with pytest.raises(DataError) as e:
        ds[1]
    assert e.value.where == f"{path}:2" and e.value.reason == "unreadable image"
    assert "corrupt.png" in str(e.value)


def test_open_image_errors(tmp_path):
    with pytest.raises(DataError, match="missing image"):
        open_image(tmp_path / "nope.png", "f.jsonl:3")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        open_image(tmp_path / "bad.jpg", "f.jsonl:4")
    assert e.value.where == "f.jsonl:4"


def test_no_usable_sample(tmp_path, encoder, processor):
    path = tmp_path / "x.jsonl"
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="no usable sample"):
        ChatDataset([path], tmp_path, encoder, processor, max_len=64)


def test_dataset_pixels_match_processor(shapes_root, encoder, processor):
    ds = ChatDataset([shapes_root / "pretrain_val.jsonl"], shapes_root / "images", encoder, processor, max_len=512)
    item = ds[0]
    with Image.open(ds.examples[0].images[0]) as im:
        torch.testing.assert_close(item["pixel_values"], processor(im.convert("RGB"))[None])
