"""Hub-format data sets (svlm/data/hub.py): parquet shards with the images
embedded as bytes, in the_cauldron's, LLaVA-OneVision's and the messages
layout, a save_to_disk folder and a hub repository's local copy, made here
from the shapes data (PNG, JPEG and grayscale pictures), trained on, checked
and scored."""

import io
import json
import re

import datasets
import pytest
from PIL import Image

from svlm.data.chat import ChatEncoder
from svlm.data.formats import BadSamples, DataError
from svlm.data.hub import Table
from svlm.data.images import EmbeddedImage, open_image
from svlm.errors import ConfigError

IMAGE = datasets.Image()
CAULDRON = datasets.Features({
    "images": datasets.List(IMAGE),
    "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                            "source": datasets.Value("string")}),
})  # fmt: skip
ONEVISION = datasets.Features({
    "id": datasets.Value("string"),
    "image": IMAGE,
    "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
    "data_source": datasets.Value("string"),
})  # fmt: skip
PART = {"type": datasets.Value("string"), "text": datasets.Value("string"), "index": datasets.Value("int64")}
MESSAGES = datasets.Features({
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(PART)}),
    "images": datasets.List(IMAGE),
})  # fmt: skip


def picture_bytes(path, i: int) -> bytes:
    """The shapes picture as PNG, JPEG or grayscale PNG, by row."""
    im = Image.open(path).convert("RGB")
    out = io.BytesIO()
    if i % 3 == 1:
        im.save(out, "JPEG", quality=90)
    else:
        (im.convert("L") if i % 3 == 2 else im).save(out, "PNG")
    return out.getvalue()


def shapes_rows(shapes_root, name: str) -> list[dict]:
    return [json.loads(line) for line in (shapes_root / name).read_text().splitlines()]


def as_layout(rows: list[dict], images, layout: str) -> datasets.Dataset:
    """Shapes records (role/content, one image) -> a table of `layout`."""
    out = []
    for i, r in enumerate(rows):
        img = {"bytes": picture_bytes(images / r["image"], i), "path": None}
        turns = [(t["role"], t["content"]) for t in r["conversations"]]
        if layout == "cauldron":  # no <image> tag: the images go before the first question
            pairs = [{"user": u.replace("<image>", "").strip(), "assistant": a, "source": "shapes"}
                     for (_, u), (_, a) in zip(turns[::2], turns[1::2])]  # fmt: skip
            out.append({"images": [img], "texts": pairs})
        elif layout == "llava_onevision":
            conv = [{"from": {"user": "human", "assistant": "gpt"}[role], "value": text} for role, text in turns]
            out.append({"id": r["id"], "image": img, "conversations": conv, "data_source": "shapes"})
        else:
            messages = []
            for role, text in turns:
                parts = [{"type": "text", "text": text.replace("<image>", "").strip(), "index": None}]
                if "<image>" in text:
                    parts.insert(0, {"type": "image", "text": None, "index": 0})
                messages.append({"role": role, "content": parts})
            out.append({"messages": messages, "images": [img]})
    features = {"cauldron": CAULDRON, "llava_onevision": ONEVISION, "messages": MESSAGES}[layout]
    return datasets.Dataset.from_list(out, features=features)


@pytest.fixture(scope="module")
def tables(shapes_root, tmp_path_factory):
    """<root>/<layout>/{pretrain,sft}_{train,val}.parquet for each layout."""
    root = tmp_path_factory.mktemp("hub")
    for layout in ("cauldron", "llava_onevision", "messages"):
        for name in ("pretrain_train", "pretrain_val", "sft_train", "sft_val"):
            ds = as_layout(shapes_rows(shapes_root, f"{name}.jsonl"), shapes_root / "images", layout)
            ds.to_parquet(str(root / layout / f"{name}.parquet"))
    return root


def encoder_for(tokenizer):
    return ChatEncoder(tokenizer, num_image_tokens=4, image_placement="inline")


@pytest.mark.parametrize("layout", ["cauldron", "llava_onevision", "messages"])
def test_each_layout_reads_as_the_jsonl_does(tables, shapes_root, layout):
    """Detected from the columns; the same turns as the jsonl record; images decode from their bytes."""
    table = Table(tables / layout / "sft_val.parquet", shapes_root / "images")
    rows = shapes_rows(shapes_root, "sft_val.jsonl")
    assert table.fmt == layout and len(table) == len(rows)
    for i in (0, 1, 2):
        rec = table.record(i)
        assert rec.where == f"{tables / layout / 'sft_val.parquet'}:{i}"
        expected = [(t["role"], t["content"]) for t in rows[i]["conversations"]]
        if layout == "cauldron":
            expected = [(r, c.replace("<image>", "").strip()) for r, c in expected]
        assert [(r, c.replace("\n", " ").strip()) for r, c in rec.turns] == [
            (r, c.replace("\n", " ").strip()) for r, c in expected
        ]
        (image,) = rec.images
        assert isinstance(image, EmbeddedImage) and str(image) == f"{rec.where}#0"
        decoded = open_image(image, rec.where)
        assert decoded.mode == ("L" if i % 3 == 2 else "RGB")  # grayscale bytes stay grayscale until the processor
        assert decoded.size == Image.open(shapes_root / "images" / rows[i]["image"]).size


def test_save_to_disk_and_hub_repository_folders(tables, shapes_root, tmp_path):
    rows = shapes_rows(shapes_root, "sft_val.jsonl")
    ds = as_layout(rows, shapes_root / "images", "cauldron")
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(4))}).save_to_disk(str(tmp_path / "saved"))
    assert len(Table(tmp_path / "saved", tmp_path, split="validation")) == 4
    with pytest.raises(ConfigError, match="has splits \\['train', 'validation'\\], not 'test'"):
        Table(tmp_path / "saved", tmp_path, split="test")
    # A hub repository's layout: one folder per configuration, declared in its README's card.
    repo = tmp_path / "the_cauldron"
    for subset, n in (("ai2d", 6), ("vqav2", 10)):
        ds.select(range(n)).to_parquet(str(repo / subset / "train-00000-of-00001.parquet"))
    card = ["---", "configs:"]
    for subset in ("ai2d", "vqav2"):
        card += [f"- config_name: {subset}", "  data_files:", "  - split: train", f"    path: {subset}/train-*"]
    (repo / "README.md").write_text("\n".join([*card, "---", "# a local copy"]) + "\n")
    table = Table(repo, tmp_path, subset="vqav2")
    assert len(table) == 10 and table.fmt == "cauldron"
    assert table.record(3).where == f"{repo / 'vqav2' / 'train-00000-of-00001.parquet'}:3"
    with pytest.raises(ConfigError, match="ai2d"):  # an unknown configuration: the known ones listed
        Table(repo, tmp_path, subset="nope")
    globbed = Table(str(tables / "messages" / "*_val.parquet"), tmp_path)  # a glob: two files, rows of each
    assert len(globbed) == 2 * len(rows) and globbed.record(len(rows)).where.endswith("sft_val.parquet:0")


def bad_rows(shapes_root, tmp_path):
    """A cauldron shard with four bad rows among good ones, and one without a 'texts' column."""
    rows = shapes_rows(shapes_root, "sft_val.jsonl")[:6]
    ds = as_layout(rows, shapes_root / "images", "cauldron").to_list()
    ds[1]["images"][0]["bytes"] = b"not a picture"  # undecodable
    ds[2]["texts"][0]["user"] = "<image> and <image>?"  # two tags, one image
    ds[3]["texts"][0]["assistant"] = "  "  # a turn without text
    ds[4]["texts"] = None  # a missing cell
    path = tmp_path / "bad" / "train.parquet"
    datasets.Dataset.from_list(ds, features=CAULDRON).to_parquet(str(path))
    datasets.Dataset.from_list([{"images": r["images"]} for r in ds], features=datasets.Features(
        {"images": datasets.List(IMAGE)})).to_parquet(str(tmp_path / "bad" / "no_texts.parquet"))  # fmt: skip
    return path


def test_bad_rows_are_named_by_file_and_row(shapes_root, tmp_path, tokenizer):
    from svlm.data.dataset import TableChatDataset
    from svlm.models.vision import ImageProcessor, VisionConfig

    path = bad_rows(shapes_root, tmp_path)
    bad = BadSamples()
    processor = ImageProcessor(VisionConfig(image_size=32, patch_size=8))
    ds = TableChatDataset(Table(path, tmp_path), tmp_path, encoder_for(tokenizer), processor, 512, "skip", bad)
    items = [ds[i] for i in range(len(ds))]
    assert [i is None for i in items] == [False, True, True, True, True, False]
    assert dict(bad.counts) == {"unreadable image": 1, "image count": 1, "empty turn": 1, "missing key": 1}
    for row, reason in ((1, "unreadable image"), (2, "image count"), (3, "empty turn"), (4, "missing key")):
        assert any(e.startswith(f"{path}:{row}") for e in bad.examples[reason]), bad.examples[reason]
    assert items[0]["pixel_values"].shape == (1, 3, 32, 32)
    strict = TableChatDataset(Table(path, tmp_path), tmp_path, encoder_for(tokenizer), processor, 512, "raise")
    with pytest.raises(DataError, match=f"{path}:1"):
        strict[1]
    with pytest.raises(DataError, match="missing column.*'images'.*expected one of"):
        Table(tmp_path / "bad" / "no_texts.parquet", tmp_path)
    with pytest.raises(ConfigError, match="no 'texts' column for format cauldron"):
        Table(tmp_path / "bad" / "no_texts.parquet", tmp_path, fmt="cauldron")


def test_the_checker_reads_tables(shapes_root, tmp_path, cache_dir, capsys):
    from conftest import DATA_OVERRIDES, MODEL_OVERRIDES, TOKENIZER_OVERRIDES, compose, path_overrides

    from svlm.config import load_train_config
    from svlm.data.check import check, print_report

    path = bad_rows(shapes_root, tmp_path)
    overrides = [*DATA_OVERRIDES, *MODEL_OVERRIDES, *TOKENIZER_OVERRIDES, "stage=stage2", "data.kind=files",
                 f"data.root={tmp_path}", "data.train_file=bad/train.parquet", "data.val_file=null",
                 "data.test_file=null", *path_overrides(tmp_path, cache_dir)]  # fmt: skip
    report = check(load_train_config(compose("train", overrides)))
    (r,) = report["files"]
    assert r["good"] == 2 and r["bad"] == 4 and r["images_per_sample"] == {1: 2}
    print_report(report)
    out = capsys.readouterr().out
    assert f"{path}:1#0" in out and f"{path}:4: missing key" in out


def hub_data(tables, layout: str, *extra: str) -> list[str]:
    where = f"{tables / layout}"
    return ["data.kind=files", f"data.root={where}", "data.train_file='{task}_train.parquet'",
            "data.val_file='{task}_val.parquet'", "data.test_file=sft_val.parquet", "data.on_error=raise", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def saved(shapes_root, tables):
    """<tables>/saved/{task}: save_to_disk folders of the messages layout, splits train and validation."""
    for task in ("pretrain", "sft"):
        splits = {split: as_layout(shapes_rows(shapes_root, f"{task}_{name}.jsonl"), shapes_root / "images", "messages")
                  for split, name in (("train", "train"), ("validation", "val"))}  # fmt: skip
        datasets.DatasetDict(splits).save_to_disk(str(tables / "saved" / task))
    return tables / "saved"


@pytest.mark.parametrize(("layout", "stage"), [("cauldron", "both"), ("llava_onevision", "llava"),
                                               ("messages", "both"), ("saved", "both")])  # fmt: skip
def test_both_stages_train_on_each_layout(tables, saved, layout, stage, make_train_cfg, tmp_path, cache_dir):
    """stage=llava keeps the encoder frozen: embedded images go through the feature cache.
    "saved": save_to_disk folders, each split chosen by data.splits."""
    from conftest import compose, path_overrides

    from svlm.config import load_eval_config
    from svlm.evaluation.evaluate import evaluate
    from svlm.training.loop import train

    data = hub_data(tables, layout)
    if layout == "saved":
        data = ["data.kind=files", f"data.root={saved}", "data.train_file='{task}'", "data.val_file='{task}'",
                "data.test_file=sft", "data.splits.test=validation", "data.on_error=raise"]  # fmt: skip
    cfg = make_train_cfg(*data, stage=stage, steps=2, run_dir=tmp_path / "run")
    stage1, stage2 = train(cfg)
    for s in ("stage1", "stage2"):
        assert json.loads((tmp_path / "run" / s / "bad_samples.json").read_text())["total"] == 0
        lines = (tmp_path / "run" / s / "metrics.jsonl").read_text().splitlines()
        assert any("val/loss" in json.loads(line) for line in lines)
    where = path_overrides(tmp_path / "scored", cache_dir)
    scores = evaluate(load_eval_config(compose("eval", [f"ckpt={stage2}", *where, "max_test=4", "max_new_tokens=4",
                                                        "hardware=cpu"])))  # fmt: skip
    assert scores["val_loss"] > 0 and 0.0 <= scores["accuracy"] <= 1.0


def test_parquet_and_jsonl_sources_mix(tables, shapes_root, make_train_cfg, tmp_path):
    from svlm.training.loop import train

    sources = (f"data.sources=[{{file: {tables}/cauldron/sft_train.parquet, weight: 1}},"
               f"{{file: {shapes_root}/sft_train.jsonl, weight: 2, image_dir: {shapes_root}/images}}]")  # fmt: skip
    cfg = make_train_cfg("data.kind=files", f"data.root={tmp_path}", sources, "data.val_file=null",
                         "data.val_fraction=0.1", "data.test_file=null", "data.on_error=raise",
                         stage="both", steps=2, run_dir=tmp_path / "run")  # fmt: skip
    for folder in train(cfg):
        assert json.loads((folder.parent / "bad_samples.json").read_text())["total"] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_training_skips_bad_rows_and_names_them(shapes_root, tables, make_train_cfg, tmp_path, workers):
    """Bad rows of a table: skipped and listed as file:row in bad_samples.json, each once over two
    epochs, also when data-loader workers find them; fatal with on_error=raise."""
    from svlm.training.loop import train

    path = bad_rows(shapes_root, tmp_path)
    data = ["data.kind=files", f"data.root={tmp_path}", "data.train_file=bad/train.parquet",
            f"data.val_file={tables}/cauldron/sft_val.parquet", "data.test_file=null", "data.max_bad_fraction=0.9",
            f"hardware.num_workers={workers}"]  # fmt: skip
    train(make_train_cfg(*data, "stage.epochs=2", "stage.max_steps=null", "stage.batch_size=2", stage="stage1",
                         run_dir=tmp_path / "run"))  # fmt: skip
    bad = json.loads((tmp_path / "run" / "stage1" / "bad_samples.json").read_text())
    assert bad["total"] == 4 and bad["counts"] == {"unreadable image": 1, "image count": 1, "empty turn": 1,
                                                      "missing key": 1}  # fmt: skip
    named = [e for examples in bad["examples"].values() for e in examples]
    assert sorted(e.split(": ")[0] for e in named) == [f"{path}:{row}" for row in (1, 2, 3, 4)]
    assert f"{path}:1: unreadable image: {path}:1#0: cannot identify image file" in "\n".join(named)
    with pytest.raises(DataError, match=re.escape(str(path)) + ":[1-4]: "):  # the first bad row drawn
        train(make_train_cfg(*data, "data.on_error=raise", "stage.epochs=1", "stage.max_steps=null",
                             "stage.batch_size=2", stage="stage1", run_dir=tmp_path / "strict"))  # fmt: skip


def test_bad_samples_travel_and_count_once():
    import pickle

    err = DataError("a.parquet:3", "empty turn", "turn 1 (assistant) has no text")
    back = pickle.loads(pickle.dumps(err))  # from a data-loader worker or another process
    assert (back.where, back.reason, str(back)) == (err.where, err.reason, str(err))
    one, two = BadSamples(), BadSamples()
    one.add(err)
    one.add(err)  # drawn again in a later epoch
    two.add(err)
    two.add(DataError("a.parquet:5", "missing key", "no texts"))
    one.merge(two)  # another process saw row 3 too
    assert one.total == 2 and dict(one.counts) == {"empty turn": 1, "missing key": 1}
