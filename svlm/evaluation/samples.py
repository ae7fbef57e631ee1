"""Sample grids: what the model answers, as a picture, at every validation.

A fixed set of `stage.sample_grid` validation samples (drawn with a fixed
seed, the same ones all run long) is answered greedily, and one PNG
shows a tile per sample: the picture, the first question, the model's answer
and the reference, framed green when they match (exact match after
normalising, as `eval.py` scores) and red when not. It is written to

    <run_dir>/<stage>/samples/step-0000100.png

and logged to wandb as an image (`val/samples`) when logger=wandb. Only the
main process draws; the others go on to the next step and meet it there.
Generation is bounded by the reference's length plus a margin, so a grid of 8
costs about as much as a few training steps.

Chinese text needs a font with CJK glyphs: the first one fontconfig
(`fc-list :lang=zh`) or matplotlib knows is used. Without one, DejaVu Sans
draws the Latin text, Chinese characters show as boxes, and one warning says
which package to install (Debian: fonts-noto-cjk, or the smaller
fonts-wqy-microhei).
"""

from __future__ import annotations

import math
import random
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from svlm.atomic import new_file
from svlm.data.chat import IGNORE, ChatEncoder
from svlm.data.formats import DataError
from svlm.data.images import open_image
from svlm.evaluation.answers import normalize
from svlm.inference.generation import generate
from svlm.models.vision import ImageProcessor
from svlm.models.vlm import VLM

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Colour = tuple[int, int, int]

RIGHT: Colour = (22, 128, 60)
WRONG: Colour = (200, 40, 40)
INK: Colour = (25, 25, 25)
GREY: Colour = (105, 105, 105)

TILE_WIDTH = 240  # pixels
PICTURE = 128  # the side of the picture in a tile (small images are scaled up, pixels kept sharp)
PAD = 8
BORDER = 3  # the green or red frame
FONT_SIZE = 13
HEADER = 26  # the title band above the tiles
MAX_LINES = 3  # a field wraps to at most this many lines, the last ending in "..."
COLUMNS = 4
MARGIN_TOKENS = 8  # an answer may run this many tokens past the reference's length

# Families of common CJK fonts, for when fontconfig is not there (macOS, Windows).
CJK_FAMILIES = ("Noto Sans CJK", "Noto Serif CJK", "Source Han", "WenQuanYi", "Droid Sans Fallback",
                "PingFang", "Hiragino Sans GB", "Heiti", "STHeiti", "Microsoft YaHei", "SimHei", "SimSun",
                "AR PL", "Arial Unicode")  # fmt: skip


@dataclass
class Sample:
    """One validation sample and the model's answer to its first question."""

    question: str
    answer: str
    reference: str
    image: Image.Image | None = None

    @property
    def correct(self) -> bool:
        return normalize(self.answer) == normalize(self.reference)


# --------------------------------------------------------------- the samples


def pick_indices(n: int, size: int) -> list[int]:
    """n indices of range(size), drawn with a fixed seed: the same ones at every
    validation and in every run on the same data. Not evenly spaced: a stride
    would follow any pattern in the file's order (the shapes data alternates
    English and Chinese)."""
    return sorted(random.Random(0).sample(range(size), min(n, size)))


@dataclass
class _Prompt:
    question: str
    prompt: list[int]  # ids up to the first answer
    reference: list[int]  # ids of the first answer, without the end-of-turn token
    image: Image.Image | None  # the first of its images, drawn in the grid
    pixels: torch.Tensor | None  # (views, 3, S, S): all of them (with tiles, each one's tiles and thumbnail)


def _first_question(ds, index: int, encoder: ChatEncoder, processor: ImageProcessor) -> _Prompt | None:
    """The prompt, question text and reference answer of a sample's first turn;
    None when its record or image cannot be read (the data loader reports those)."""
    try:
        ex = ds.example(index)
        images = [open_image(im, ex.where) for im in ex.images]
    except DataError:
        return None
    start = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)  # first answer token
    end = ex.labels.index(encoder.end_id, start) if encoder.end_id in ex.labels[start:] else len(ex.labels)
    prompt = ex.input_ids[:start]
    text = ex.question
    pixels, _ = processor.all_views(images)  # (views, 3, S, S)
    display = ImageProcessor.to_rgb(images[0]) if images else None
    return _Prompt(text, prompt, ex.labels[start:end], display, pixels)


@torch.no_grad()
def answer_samples(
    model: VLM,
    encoder: ChatEncoder,
    ds,
    indices: list[int],
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> list[Sample]:
    """Greedy answers to the first question of each sample `indices` names. The
    random state and the model's train/eval mode are as they were afterwards."""
    processor = ImageProcessor(model.cfg.vision)
    prompts = [p for p in (_first_question(ds, i, encoder, processor) for i in indices) if p is not None]
    device = next(model.parameters()).device
    views = [p.pixels for p in prompts if p.pixels is not None]
    budgets = [len(p.reference) + MARGIN_TOKENS for p in prompts]
    was_training = model.training
    with torch.random.fork_rng(devices=[]), autocast():  # every prompt together: a ragged batch
        outs = generate(model, [p.prompt for p in prompts], torch.cat(views).to(device) if views else None,
                        encoder.stop_ids, budgets, banned_ids=encoder.banned_ids)  # fmt: skip
    answers = dict(enumerate(outs))
    model.train(was_training)
    decode = encoder.tok.decode
    return [
        Sample(p.question, decode(answers[k], skip_special_tokens=True).strip(),
               decode(p.reference, skip_special_tokens=True).strip(), p.image)
        for k, p in enumerate(prompts)
    ]  # fmt: skip


# --------------------------------------------------------------------- fonts


def _cjk_font_files() -> list[str]:
    """Font files with Chinese glyphs that fontconfig or matplotlib know, regular sans first."""
    files: list[str] = []
    if shutil.which("fc-list"):
        try:
            out = subprocess.run(["fc-list", "-f", "%{file}\n", ":lang=zh"], capture_output=True, text=True,
                                 timeout=20).stdout  # fmt: skip
            files += [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    if not files:
        try:
            from matplotlib import font_manager

            files += [f.fname for f in font_manager.fontManager.ttflist if f.name.startswith(CJK_FAMILIES)]
        except Exception:  # matplotlib's font cache unreadable: no CJK font then
            pass

    def rank(path: str) -> tuple[bool, bool, bool]:
        name = Path(path).name.lower()
        return "sans" not in name and "hei" not in name, "bold" in name or "light" in name, "mono" in name

    return sorted(dict.fromkeys(files), key=rank)


@lru_cache(maxsize=1)
def _warn_no_cjk_font() -> None:
    warnings.warn(
        "sample grids: no font with Chinese characters was found (fc-list :lang=zh, matplotlib), so Chinese "
        "text is drawn as boxes; install one, e.g. `apt-get install fonts-wqy-microhei` or fonts-noto-cjk",
        stacklevel=3,
    )


@cache
def load_font(size: int = FONT_SIZE) -> Font:
    """A font that draws Chinese and Latin text; DejaVu Sans (Latin only, one
    warning) when the system has none; PIL's own font as the last resort."""
    for path in _cjk_font_files():
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    _warn_no_cjk_font()
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


# -------------------------------------------------------------------- layout

# A line breaks at spaces and between two CJK characters (Chinese has no
# spaces), but never before closing punctuation.
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_CLOSING = "。，、！？：；」』）》〉.,!?:;)"
_PIECES = re.compile(rf"\s+|[{_CJK}][{_CLOSING}]*|[^\s{_CJK}]+")


def _longest_fit(text: str, font: Font, width: float) -> int:
    """How many leading characters of `text` fit in `width` (at least one)."""
    k = 1
    while k < len(text) and font.getlength(text[: k + 1]) <= width:
        k += 1
    return k


def wrap(text: str, font: Font, width: float, max_lines: int = MAX_LINES) -> list[str]:
    """`text` as lines no wider than `width` pixels: breaks at spaces, between CJK
    characters, and inside a word only when the word alone is too wide; at most
    `max_lines`, the last ending in "..." when text was left out."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for piece in _PIECES.findall(paragraph):
            if font.getlength(line + piece) <= width:
                line += piece
            elif piece.isspace():  # the line ends here; the space goes
                lines.append(line)
                line = ""
            else:
                if line.strip():
                    lines.append(line.rstrip())
                while font.getlength(piece) > width:  # a word wider than a line: cut it
                    k = _longest_fit(piece, font, width)
                    lines.append(piece[:k])
                    piece = piece[k:]
                line = piece
        lines.append(line.rstrip())
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last.rstrip() + "..."]
    return lines


def tile_lines(sample: Sample, font: Font, width: float) -> list[tuple[str, Colour]]:
    """The text of a tile, wrapped, with the colour of each line: the question,
    the model's answer (green when right, red when wrong), the reference."""
    fields = [
        (f"Q: {sample.question}", INK),
        (f"model: {sample.answer or '(nothing)'}", RIGHT if sample.correct else WRONG),
        (f"reference: {sample.reference}", GREY),
    ]
    return [(line, colour) for text, colour in fields for line in wrap(text, font, width)]


@dataclass
class Layout:
    size: tuple[int, int]  # (width, height) of the whole picture
    boxes: list[tuple[int, int, int, int]]  # (left, top, right, bottom) of each tile, row by row


def layout(n: int, tile: tuple[int, int], columns: int = COLUMNS, header: int = HEADER) -> Layout:
    """n tiles of `tile` (width, height) in rows of `columns`, under a header band."""
    cols = max(1, min(columns, n))
    rows = math.ceil(n / cols)
    w, h = tile
    boxes = [(c * w, header + r * h, (c + 1) * w, header + (r + 1) * h) for r, c in (divmod(i, cols) for i in range(n))]
    return Layout((cols * w, header + rows * h), boxes)


def line_height(font: Font) -> int:
    top, bottom = font.getbbox("Ag中")[1::2]
    return int(bottom - top) + 5


def _picture(image: Image.Image | None, side: int) -> Image.Image:
    """The image fitted into a side x side square (kept sharp when scaled up)."""
    canvas = Image.new("RGB", (side, side), (235, 235, 235))
    if image is None:
        return canvas
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    fitted = image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)
    canvas.paste(fitted, ((side - size[0]) // 2, (side - size[1]) // 2))
    return canvas


def draw_grid(samples: list[Sample], title: str, columns: int = COLUMNS) -> Image.Image:
    """One tile per sample (see the module docstring), `title` above them."""
    font = load_font(FONT_SIZE)
    texts = [tile_lines(s, font, TILE_WIDTH - 2 * PAD) for s in samples]
    step = line_height(font)
    tile_height = PAD + PICTURE + PAD + max((len(t) for t in texts), default=0) * step + PAD
    grid = layout(len(samples), (TILE_WIDTH, tile_height), columns)
    image = Image.new("RGB", grid.size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, (HEADER - step) // 2 + 2), title, fill=INK, font=font)
    for sample, lines, (left, top, right, bottom) in zip(samples, texts, grid.boxes):
        colour = RIGHT if sample.correct else WRONG
        draw.rectangle((left + 1, top + 1, right - 2, bottom - 2), outline=colour, width=BORDER)
        image.paste(_picture(sample.image, PICTURE), (left + PAD, top + PAD))
        mark = "right" if sample.correct else "wrong"
        badge = (right - PAD - int(font.getlength(mark)) - 10, top + PAD, right - PAD, top + PAD + step + 2)
        draw.rectangle(badge, fill=colour)
        draw.text((badge[0] + 5, badge[1] + 2), mark, fill="white", font=font)
        y = top + PAD + PICTURE + PAD
        for text, fill in lines:
            draw.text((left + PAD, y), text, fill=fill, font=font)
            y += step
    return image


# ------------------------------------------------------------- the loop's call


@lru_cache(maxsize=1)
def _note_sharded() -> None:
    print("note: stage.sample_grid draws nothing with FSDP or DeepSpeed (sharded weights); eval.py scores the model")


def sample_grid(
    model: VLM,
    encoder: ChatEncoder,
    ds,
    n: int,
    out: Path,
    title: str,
    *,
    step: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    main: bool = True,
    sharded: bool = False,
    wandb_run=None,
) -> Path | None:
    """At a validation: answer `n` fixed samples of `ds`, draw the grid, write it
    to `out` (atomically) and log it to `wandb_run` when there is one. Only the
    main process does anything: `model` is the unwrapped model, so its forward
    passes need no other process. Returns the PNG's path (None when none was drawn)."""
    if n <= 0 or ds is None or not main:
        return None
    if sharded:  # every process holds only part of the weights: a forward pass needs them all
        _note_sharded()
        return None
    samples = answer_samples(model, encoder, ds, pick_indices(n, len(ds)), autocast)
    if not samples:
        return None
    right = sum(s.correct for s in samples)
    image = draw_grid(samples, f"{title}: {right}/{len(samples)} right (first question of each sample, greedy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with new_file(out) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    if wandb_run is not None:
        import wandb

        wandb_run.log({"val/samples": wandb.Image(image, caption=f"{title}: {right}/{len(samples)} right")}, step=step)
    tqdm.write(f"{title}: {right}/{len(samples)} samples right, grid {out}")
    return out
