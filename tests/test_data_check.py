"""Every kind of bad input, as the data checker and the training loader see it."""

import json
from pathlib import Path

import pytest
from PIL import Image

from svlm.data.check.__main__ import main as check_main
from svlm.data.formats import BadSamples, DataError
from svlm.data.images import open_image


def _line(image: str | None, answer: str = "red", question: str = "<image>\nWhat colour?") -> dict:
    rec = {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


@pytest.fixture
def messy(tmp_path) -> Path:
    """A data folder with one good sample a line, and every kind of bad one."""
    root = tmp_path / "messy"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 20, 20)).save(root / "images" / "good.jpg")
    Image.new("RGB", (1, 1), (20, 200, 20)).save(root / "images" / "tiny.png")  # valid: simply resized
    Image.new("L", (2000, 1500), 128).save(root / "images" / "big.png")  # valid: within PIL's pixel limit
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "images" / "cut.jpg")
    data = (root / "images" / "cut.jpg").read_bytes()
    (root / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "text.jpg").write_text("this is not a picture")
    lines = [
        json.dumps(_line("good.jpg")),  # 1
        json.dumps(_line("tiny.png")),  # 2
        json.dumps(_line("big.png")),  # 3
        '{"conversations": [',  # 4 malformed JSON
        json.dumps({"image": "good.jpg"}),  # 5 missing key
        json.dumps({"conversations": [{"role": "robot", "content": "hi"}]}),  # 6 unknown role
        json.dumps({"conversations": [{"role": "user", "content": "hi"}]}),  # 7 no assistant turn
        json.dumps(_line("nowhere.jpg")),  # 8 missing image
        json.dumps(_line("cut.jpg")),  # 9 truncated JPEG
        json.dumps(_line("empty.jpg")),  # 10 empty file
        json.dumps(_line("text.jpg")),  # 11 a text file named .jpg
        json.dumps(_line("good.jpg", answer="long " * 300)),  # 12 longer than max_len: cut, kept
        json.dumps(_line(None, question="<image>\n" + "word " * 300)),  # 13 no 'image' but <image>
        json.dumps(_line("good.jpg", question="word " * 400 + "<image>")),  # 14 image past max_len
    ]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _check(root: Path, tmp_path: Path, capsys, *extra: str) -> tuple[int, dict, str]:
    code = check_main([
        "data.kind=files", f"data.root={root}", "data.train_file=train.jsonl", "data.val_file=null",
        "data.test_file=null", "stage=stage1", "data.max_len=256", "tokenizer.vocab_size=300",
        f"paths.cache={tmp_path}/cache", f"paths.run_dir={tmp_path}/check", f"paths.outputs={tmp_path}/outputs", *extra,
    ])  # fmt: skip
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "check" / "report.json").read_text())
    return code, report, out


def test_checker_reports_every_bad_input(messy, tmp_path, capsys):
    code, report, out = _check(messy, tmp_path, capsys)
    assert code == 1
    (r,) = report["files"]
    train = messy / "train.jsonl"
    expected = {
        "malformed JSON": [4], "missing key": [5], "unknown role": [6], "no assistant turn": [7],
        "missing image": [8, 13], "unreadable image": [9, 10, 11], "too long": [14],
    }  # fmt: skip
    assert r["bad_by_reason"] == {reason: len(lines) for reason, lines in expected.items()}
    for reason, lines in expected.items():
        found = " ".join(r["bad_examples"][reason])
        for line in lines:
            assert f"{train}:{line}:" in found, (reason, line, found)
    assert r["good"] == 4 and r["bad"] == 10  # lines 1, 2, 3 and 12 (cut to max_len, kept)
    assert r["truncated"] == 1 and r["truncated_examples"] == [f"{train}:12"]
    assert 0 < r["supervised_share"] < 1 and r["histogram"]
    assert f"{train}:9" in out and "unreadable image: 3" in out and "10 bad sample(s)" in out


def test_checker_passes_clean_data(shapes_root, tmp_path, capsys):
    root = tmp_path / "clean"
    root.mkdir()
    (root / "images").symlink_to(shapes_root / "images")
    (root / "train.jsonl").write_text((shapes_root / "pretrain_train.jsonl").read_text())
    code, report, out = _check(root, tmp_path, capsys)
    assert code == 0 and report["files"][0]["bad"] == 0 and "OK: no bad samples" in out


def test_checker_config_error(tmp_path, capsys):
    code = check_main(
        [
            "data.kind=files",
            f"data.root={tmp_path}/nowhere",
            f"paths.run_dir={tmp_path}/c",
            f"paths.outputs={tmp_path}/outputs",
        ]
    )
    assert code == 2 and "data.root" in capsys.readouterr().err


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("L", (400, 300)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 120,000 pixels is over the limit
    with pytest.raises(DataError, match="image too large") as err:
        open_image(tmp_path / "bomb.png", "data.jsonl:7")
    assert err.value.where == "data.jsonl:7"


def test_training_loader_skips_or_raises(messy, make_train_cfg):
    from svlm.training.loop import train

    overrides = [f"data.root={messy}", "data.kind=files", "data.train_file=train.jsonl", "data.val_file=null",
                 "data.test_file=null", "data.max_len=256"]  # fmt: skip
    with pytest.raises(DataError, match=r"train.jsonl:4: malformed JSON"):
        train(make_train_cfg(*overrides, "data.on_error=raise", stage="stage1", steps=1))
    with pytest.raises(DataError, match="too many bad samples"):  # 7 of 11 bad at encoding time
        train(make_train_cfg(*overrides, stage="stage1", steps=1))
    cfg = make_train_cfg(*overrides, "data.max_bad_fraction=0.9", stage="stage1", steps=2, base=None)
    train(cfg)  # the 3 unreadable images are met (and skipped) while batching
    report = json.loads((Path(cfg.paths.run_dir) / "stage1" / "bad_samples.json").read_text())
    assert report["counts"]["malformed JSON"] == 1 and report["total"] >= 8


def test_bad_samples_summary_names_lines():
    bad = BadSamples()
    bad.add(DataError("a.jsonl:3", "malformed JSON", "oops"))
    assert "a.jsonl:3" in bad.summary() and bad.total == 1
