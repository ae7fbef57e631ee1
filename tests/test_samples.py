"""Sample grids (svlm/evaluation/samples.py): wrapping, labels and layout of the tiles, the
PNG itself, the font fallback, and the grids a tiny training writes at its
validations (and logs to wandb offline)."""

import json
import warnings
from pathlib import Path

import pytest
from conftest import compose, path_overrides, tiny_train_overrides
from PIL import Image, ImageFont

from svlm.config import ConfigError, load_train_config
from svlm.evaluation import samples
from svlm.evaluation.samples import (
    HEADER,
    RIGHT,
    TILE_WIDTH,
    WRONG,
    Sample,
    draw_grid,
    layout,
    load_font,
    pick_indices,
    tile_lines,
    wrap,
)
from svlm.training.loop import train

WIDTH = 150


# Every font-dependent test runs with the font this machine gives, with the
# fallback a fresh machine without CJK fonts gets (DejaVu Sans from
# matplotlib), and with PIL's own font (no DejaVu either). Expectations are
# derived from the font's metrics, never from one machine's glyph widths.
FONTS = ["system", "dejavu", "pil"]


@pytest.fixture(params=FONTS)
def font_source(request, monkeypatch):
    """Which font load_font finds, for the whole test (draw_grid loads its own)."""
    if request.param != "system":
        monkeypatch.setattr(samples, "_cjk_font_files", lambda: [])
    if request.param == "pil":  # no font file opens (PIL's own font is read from memory)
        truetype = ImageFont.truetype

        def no_files(font, *args, **kwargs):
            if isinstance(font, (str, Path)):
                raise OSError(f"hidden by the test: {font}")
            return truetype(font, *args, **kwargs)

        monkeypatch.setattr(ImageFont, "truetype", no_files)
    load_font.cache_clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "sample grids: no font with Chinese characters")
        yield request.param
    load_font.cache_clear()


@pytest.fixture
def font(font_source):
    return load_font(13)


def test_the_fallbacks_are_the_fonts_they_claim(font_source):
    font = load_font(13)
    name = font.getname()[0] if isinstance(font, ImageFont.FreeTypeFont) else "PIL bitmap"
    if font_source == "dejavu":
        assert name == "DejaVu Sans"
    elif font_source == "pil":
        assert name != "DejaVu Sans"


def test_pick_indices_are_fixed_distinct_and_mixed():
    picked = pick_indices(8, 300)
    assert picked == pick_indices(8, 300) == sorted(set(picked)) and len(picked) == 8
    assert all(0 <= i < 300 for i in picked)
    assert {i % 2 for i in pick_indices(8, 16)} == {0, 1}  # both languages of the alternating shapes data
    assert pick_indices(5, 3) == [0, 1, 2]  # fewer samples than asked for: all of them
    assert pick_indices(0, 10) == []


def test_wrap_english_at_spaces(font):
    text = "A large green triangle in the top right of the picture, next to a small red cross."
    lines = wrap(text, font, WIDTH, max_lines=10)
    assert len(lines) > 1
    assert all(font.getlength(line) <= WIDTH for line in lines)
    assert " ".join(lines) == text


def test_wrap_chinese_between_characters_not_before_punctuation(font):
    text = "左下方有一个小的蓝色圆形。右上方有一个大的红色三角形。中间有一个绿色的正方形。"
    lines = wrap(text, font, WIDTH, max_lines=10)
    assert len(lines) > 1
    assert all(font.getlength(line) <= WIDTH for line in lines)
    assert "".join(lines) == text
    assert not any(line.startswith("。") for line in lines)


def test_wrap_cuts_long_words_and_limits_lines(font):
    word = "x" * 200
    assert font.getlength(word) > 2 * WIDTH  # three lines at least, whatever the font
    lines = wrap(word, font, WIDTH, max_lines=len(word))  # room for every piece: nothing is cut off
    assert "".join(lines) == word and all(font.getlength(line) <= WIDTH for line in lines)
    assert all(font.getlength(line + "x") > WIDTH for line in lines[:-1])  # each cut as late as it fits
    short = wrap(word, font, WIDTH, max_lines=2)
    assert len(short) == 2 and short[-1].endswith("...") and font.getlength(short[-1]) <= WIDTH
    assert wrap("", font, WIDTH) == [""]


def test_tile_lines_label_question_answer_and_reference(font):
    def expected(*fields):  # each field on one line where the font fits it, else as wrap breaks it
        return [(line, colour) for text, colour in fields for line in wrap(text, font, 224)]

    right = tile_lines(Sample("What colour is the shape?", "red", "Red."), font, 224)
    fields = [("Q: What colour is the shape?", samples.INK), ("model: red", RIGHT), ("reference: Red.", samples.GREY)]
    assert right == expected(*fields)
    if all(font.getlength(text) <= 224 for text, _ in fields):
        assert right == fields
    wrong = tile_lines(Sample("这个形状是什么颜色？", "", "蓝色"), font, 224)
    fields = [("Q: 这个形状是什么颜色？", samples.INK), ("model: (nothing)", WRONG), ("reference: 蓝色", samples.GREY)]
    assert wrong == expected(*fields)
    assert {colour for _, colour in wrong} == {samples.INK, WRONG, samples.GREY}


def test_layout_rows_of_columns_under_a_header():
    grid = layout(8, (100, 60), columns=4, header=20)
    assert grid.size == (400, 20 + 2 * 60)
    assert grid.boxes[0] == (0, 20, 100, 80) and grid.boxes[5] == (100, 80, 200, 140)
    assert len(set(grid.boxes)) == 8
    assert layout(3, (100, 60), columns=4, header=20).size == (300, 80)  # one short row: as wide as its tiles
    assert layout(5, (100, 60), columns=4, header=20).size == (400, 140)


def test_grid_png_has_a_tile_per_sample_framed_by_correctness(tmp_path, font_source):
    picture = Image.new("RGB", (64, 64), (200, 220, 240))
    batch = [
        Sample("What colour is the shape?", "red", "red", picture),
        Sample("这个形状在哪里？", "左上", "右下", picture),
        Sample(
            "What is in this picture?",
            "A large green triangle in the top right.",
            "A large green triangle in the top right.",
            None,
        ),
        Sample("你看到了什么？", "左下方有一个小的蓝色圆形。", "左下方有一个小的蓝色圆形。", picture.convert("L")),
        Sample("Where is the shape?", "", "top right", picture),
    ]
    path = tmp_path / "grid.png"
    draw_grid(batch, "stage2 step 100").save(path)
    with Image.open(path) as im:
        width, height = im.size
        assert width == 4 * TILE_WIDTH and (height - HEADER) % 2 == 0  # 5 tiles: 2 rows of 4
        grid = layout(5, (TILE_WIDTH, (height - HEADER) // 2))
        assert grid.size == im.size
        rgb = im.convert("RGB")
        for sample, (left, top, _, bottom) in zip(batch, grid.boxes):
            frame = rgb.getpixel((left + 2, (top + bottom) // 2))
            assert frame == (RIGHT if sample.correct else WRONG)
        empty = grid.boxes[4][2] + 5, grid.boxes[4][1] + 20  # right of the last tile: nothing drawn
        assert rgb.getpixel(empty) == (255, 255, 255)


def test_without_a_cjk_font_one_warning_and_no_crash(monkeypatch):
    monkeypatch.setattr(samples, "_cjk_font_files", lambda: [])
    load_font.cache_clear()
    samples._warn_no_cjk_font.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no font with Chinese characters") as caught:
            fonts = [load_font(11), load_font(12), load_font(11)]
            draw_grid([Sample("这是什么形状？", "圆形", "圆形", None)], "no CJK font")
        assert len(caught) == 1 and all(f is not None for f in fonts)
    finally:
        load_font.cache_clear()
        samples._warn_no_cjk_font.cache_clear()


def test_sample_grid_config(make_train_cfg):
    cfg = make_train_cfg("stage.sample_grid=0")
    assert [s.sample_grid for s in cfg.stages()] == [0, 0]
    cfg = make_train_cfg("stage.stage2.sample_grid=3")
    assert [s.sample_grid for s in cfg.stages()] == [8, 3]
    with pytest.raises(ConfigError, match="stage.sample_grid"):
        make_train_cfg("stage.sample_grid=-1", stage="stage1")


def _losses(run: Path, stage: str) -> list[float]:
    lines = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [m["train/loss"] for m in lines if "train/loss" in m]


def test_training_writes_a_grid_at_each_validation(tmp_path, cache_dir, shapes_root):
    def run(name: str, grid: int) -> Path:
        overrides = [*tiny_train_overrides("both", steps=4), *path_overrides(tmp_path / name, cache_dir),
                     "stage.stage1.eval_every=2", "stage.stage2.eval_every=2", "stage.stage1.log_every=1",
                     "stage.stage2.log_every=1", f"stage.sample_grid={grid}"]  # fmt: skip
        cfg = load_train_config(compose("train", overrides))
        train(cfg)
        return Path(cfg.paths.run_dir)

    with_grid = run("grid", 3)
    for stage in ("stage1", "stage2"):
        pngs = sorted((with_grid / stage / "samples").iterdir())
        assert [p.name for p in pngs] == ["step-0000002.png", "step-0000004.png"]
        for png in pngs:
            with Image.open(png) as im:
                assert im.width == 3 * TILE_WIDTH and im.height > HEADER + samples.PICTURE
    # Drawing samples changes nothing in training: no random numbers drawn, train mode restored.
    without = run("none", 0)
    assert not (without / "stage1" / "samples").exists()
    for stage in ("stage1", "stage2"):
        assert _losses(with_grid, stage) == _losses(without, stage)


def test_wandb_logs_the_grid_offline(make_train_cfg, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables wandb for every other test
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = make_train_cfg("logger=wandb", "stage.sample_grid=2", stage="stage1", steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)
    stage_dir = Path(cfg.paths.run_dir) / "stage1"
    (run,) = (stage_dir / "wandb").glob("offline-run-*")
    media = list((run / "files" / "media" / "images").rglob("*.png"))
    assert len(media) == 1 and "samples" in media[0].name
    assert (stage_dir / "samples" / "step-0000002.png").is_file()
