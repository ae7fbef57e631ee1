"""A conversation data set: records -> token ids, labels and (lazily) images,
or the images' cached encoder features (svlm/data/feature_cache.py)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, get_worker_info

from svlm.data.chat import IGNORE, IMAGE_TOKEN, ChatEncoder
from svlm.data.drawing import ATTRIBUTES, object_labels
from svlm.data.formats import BadSamples, DataError, Record, RecordReader, line_index, read_records
from svlm.data.hub import Table
from svlm.data.images import image_size, open_image
from svlm.models.vision import ImageProcessor
from svlm.models.vlm import target_positions


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    images: list  # Path or EmbeddedImage, in the order of their placeholder slots
    where: str
    meta: dict
    question: str = ""  # the first user turn's text, without image tags (what the sample grid shows)
    grids: list[tuple[int, int]] | None = None  # with tiles: each image's grid (svlm/models/tiles.py)


def encode_record(
    rec: Record, encoder: ChatEncoder, image_dir: Path, max_len: int, max_images: int = 8
) -> tuple[Example, bool]:
    """A record -> (Example, whether it was cut to max_len); a DataError when it cannot be used."""
    n_tags = sum(c.count(IMAGE_TOKEN) for r, c in rec.turns)
    turns = rec.turns
    if len(rec.images) > max_images:
        raise DataError(
            rec.where, "too many images", f"{len(rec.images)} images, more than data.max_images={max_images}"
        )
    if rec.images and n_tags == 0:  # images with no tag: they go before the first user text
        first = next(i for i, (r, _) in enumerate(turns) if r == "user")
        tags = "\n".join([IMAGE_TOKEN] * len(rec.images))
        turns = [*turns[:first], ("user", f"{tags}\n{turns[first][1]}"), *turns[first + 1 :]]
    elif n_tags and not rec.images:
        raise DataError(rec.where, "missing image", "<image> in the text but no 'image' key")
    elif n_tags != len(rec.images):
        raise DataError(rec.where, "image count", f"{n_tags} <image> tag(s) in the text for {len(rec.images)} images")
    images = [image_dir / im if isinstance(im, str) else im for im in rec.images]  # files, or EmbeddedImage
    for image in images:
        if isinstance(image, Path) and not image.is_file():
            raise DataError(rec.where, "missing image", str(image))
    grids = [encoder.tiling.grid(*image_size(im, rec.where)) for im in images] if encoder.tiling else None
    try:
        ids, labels = encoder.encode(turns, grids=grids)
    except ValueError as e:  # a tokenizer's own chat template refused or rewrote the conversation
        raise DataError(rec.where, "chat template", str(e)) from None
    cut = len(ids) > max_len
    if cut:
        slots = [i for i, t in enumerate(ids) if t == encoder.image_id]
        if slots and slots[-1] >= max_len:
            raise DataError(rec.where, "too long", f"{len(ids)} tokens and an image ends past max_len={max_len}")
        ids, labels = ids[:max_len], labels[:max_len]
        if all(lab == IGNORE for lab in labels[1:]):
            raise DataError(rec.where, "too long", f"no answer left within max_len={max_len}")
    if all(lab == IGNORE for lab in labels[1:]):
        raise DataError(rec.where, "no supervised token", "nothing to learn")
    question = next((text for role, text in rec.turns if role == "user"), "").replace(IMAGE_TOKEN, "").strip()
    return Example(ids, labels, images, rec.where, rec.meta, question, grids), cut


class _Conversations(Dataset):
    """What both data sets share: settings, bad-sample accounting, and turning an
    Example into a training item (image opened and preprocessed, or its cached
    features looked up once `use_features` was called)."""

    lazy = False  # records read as batches need them (bad ones found then)

    def __init__(
        self,
        source,
        image_dir: str | os.PathLike,
        encoder: ChatEncoder,
        processor: ImageProcessor,
        max_len: int,
        on_error: str = "skip",
        bad: BadSamples | None = None,
        max_images: int = 8,
        fmt: str = "auto",
    ) -> None:
        """`source`: what the data set reads (see `load`), records of format `fmt`
        (svlm/data/formats.py); image file names resolve under `image_dir`; bad
        records are skipped and counted in `bad`, or raised."""
        self.fmt = fmt
        self.encoder, self.processor, self.max_len, self.max_images = encoder, processor, max_len, max_images
        self.image_dir = Path(image_dir)
        self.on_error = on_error
        self.bad = bad if bad is not None else BadSamples()
        self.truncated: list[str] = []  # file:line of samples cut to max_len (kept: images and answers left)
        self.fetched = 0  # items asked for
        self.features = None  # a FeatureView: items carry vision_features instead of pixel_values
        self.load(source)

    def load(self, source) -> None:
        raise NotImplementedError

    def example(self, i: int) -> Example:
        raise NotImplementedError

    def image_files(self, indices: Iterable[int] | None = None) -> set[Path]:
        """The image files the samples `indices` (None: all) refer to (what the feature cache computes)."""
        raise NotImplementedError

    def use_features(self, view) -> None:
        """Yield the images' cached encoder features (a FeatureView) from now on."""
        self.features = view

    def __getitem__(self, i: int) -> dict | None:
        """The item for the collator, or None for a bad sample (reported and counted)."""
        self.fetched += 1
        try:
            return self.item(self.example(i))
        except DataError as e:
            return self.skip(e)

    def skip(self, err: DataError) -> dict | None:
        """A bad sample: raised (data.on_error=raise), or counted and None. In a data-loader
        worker (whose count would stay in its copy of the data set, and whose exception
        would reach the loop as a RuntimeError) {"bad": err} instead: the Collator puts it in
        batch["bad_samples"], and `take_bad` raises or counts it in the main process."""
        if get_worker_info() is not None:
            return {"bad": err, "fatal": self.on_error == "raise"}
        if self.on_error == "raise":
            raise err
        self.bad.add(err)
        return None

    def item(self, ex: Example) -> dict:
        """An Example's images opened and preprocessed, or their cached features looked up."""
        pixels = features = None
        if ex.images and self.features is not None:
            features = torch.stack([self.features.get(im, ex.where) for im in ex.images])  # (k, P, Dv) float16
        elif ex.images:  # (views, 3, S, S): one a picture, or each one's tiles and thumbnail
            pixels, _ = self.processor.all_views([open_image(im, ex.where) for im in ex.images])
        item = {"input_ids": ex.input_ids, "labels": ex.labels, "pixel_values": pixels, "n_images": len(ex.images)}
        if features is not None:
            item["vision_features"] = features
        if isinstance(
            ex.meta.get("objects"), list
        ):  # what the picture shows (svlm/data/drawing.py): an object head's labels
            item["objects"] = ex.meta["objects"]
        return item


class ChatDataset(_Conversations):
    """Every record of `files` (a list) encoded up front (files that fit in memory);
    images load lazily."""

    def load(self, files: list[str | os.PathLike]) -> None:
        self.examples: list[Example] = []
        for f in files:
            for rec in read_records(f, on_error=self.on_error, bad=self.bad, fmt=self.fmt):
                try:
                    example, cut = encode_record(rec, self.encoder, self.image_dir, self.max_len, self.max_images)
                except DataError as e:
                    if self.on_error == "raise":
                        raise
                    self.bad.add(e)
                    continue
                self.examples.append(example)
                if cut:
                    self.truncated.append(rec.where)
        if not self.examples:
            raise ValueError(f"no usable sample in {[str(f) for f in files]}\n{self.bad.summary()}")

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, i: int) -> Example:
        return self.examples[i]

    def image_files(self, indices: Iterable[int] | None = None) -> set[Path]:
        examples = self.examples if indices is None else (self.examples[i] for i in indices)
        return {image for e in examples for image in e.images}

    def split(self, fraction: float, seed: int) -> tuple[ChatDataset, ChatDataset]:
        """(rest, held out): about `fraction` of the samples held out, the same ones for the same seed."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        held = set(order[: max(1, round(fraction * len(self)))])
        rest, out = copy.copy(self), copy.copy(self)
        rest.examples = [e for i, e in enumerate(self.examples) if i not in held]
        out.examples = [e for i, e in enumerate(self.examples) if i in held]
        return rest, out

    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]


class LazyChatDataset(_Conversations):
    """A jsonl file too large to encode up front: a line index (built once, cached
    beside the file), and each record read, parsed and encoded when a batch needs
    it. Bad records are found then: reported, counted, and skipped (None) or raised."""

    lazy = True

    def load(self, file: str | os.PathLike) -> None:
        self.reader = RecordReader(file, self.fmt)
        self.index = line_index(file)  # (N, 2): byte offset, line number
        self.rows = np.arange(len(self.index))  # which lines this data set holds (a subset after split)
        if not len(self.rows):
            raise ValueError(f"no sample in {file}")

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, row: int) -> Record:
        """The record of line `row` of the index (parsed, not encoded)."""
        offset, lineno = self.index[row]
        return self.reader.read(offset, lineno)

    def example(self, i: int) -> Example:
        record = self.record(int(self.rows[i]))
        example, cut = encode_record(record, self.encoder, self.image_dir, self.max_len, self.max_images)
        if cut and len(self.truncated) < 1000:
            self.truncated.append(example.where)
        return example

    def image_files(self, indices: Iterable[int] | None = None) -> set:
        """The images the records name (no tokenizing); bad records are reported when their sample is read."""
        rows = self.rows if indices is None else self.rows[np.asarray(sorted(indices), dtype=np.int64)]
        found = set()
        for row in rows:
            try:
                images = self.record(int(row)).images
            except DataError:
                continue
            found.update(self.image_dir / im if isinstance(im, str) else im for im in images)
        return found

    def split(self, fraction: float, seed: int) -> tuple[LazyChatDataset, LazyChatDataset]:
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).numpy()
        held = np.zeros(len(self), dtype=bool)
        held[order[: max(1, round(fraction * len(self)))]] = True
        rest, out = copy.copy(self), copy.copy(self)
        rest.rows, out.rows = self.rows[~held], self.rows[held]
        return rest, out


class TableChatDataset(LazyChatDataset):
    """A parquet/Arrow source (svlm/data/hub.py): memory-mapped rows, each read,
    parsed and encoded when a batch needs it, its images decoded from their bytes then."""

    def load(self, table: Table) -> None:
        self.table = table
        self.rows = np.arange(len(table))
        if not len(self.rows):
            raise ValueError(f"no sample in {table.path}")

    def record(self, row: int) -> Record:
        return self.table.record(row)


class MixedDataset(ConcatDataset):
    """Several sources drawn in proportion to their weights (see EpochSampler in data/sampler.py)."""

    def __init__(self, datasets: list[Dataset], weights: list[float]) -> None:
        super().__init__(datasets)
        self.sizes = [len(d) for d in datasets]
        self.weights = list(weights)

    def locate(self, i: int) -> tuple[int, int]:
        """Sample i of the mixture -> (its source, its index there)."""
        k = int(np.searchsorted(self.cumulative_sizes, i, side="right"))
        return k, i - (self.cumulative_sizes[k - 1] if k else 0)

    def example(self, i: int) -> Example:
        k, j = self.locate(i)
        return self.datasets[k].example(j)

    def image_files(self, indices: Iterable[int] | None = None) -> set[Path]:
        if indices is None:
            return set().union(*(d.image_files() for d in self.datasets))
        parts: list[list[int]] = [[] for _ in self.datasets]
        for k, j in map(self.locate, indices):
            parts[k].append(j)
        return set().union(*(d.image_files(p) for d, p in zip(self.datasets, parts) if p))

    def use_features(self, view) -> None:
        for d in self.datasets:
            d.use_features(view)


def take_bad(batch: dict, bad: BadSamples | None) -> None:
    """The bad samples a data-loader worker found (batch["bad_samples"], see
    _Conversations.skip): the first raised when fatal, else counted in `bad`."""
    for err, fatal in batch.pop("bad_samples", []):
        if fatal:
            raise err
        if bad is not None:
            bad.add(err)


class Collator:
    """Pads to the longest sample in the batch (right padding: with a causal
    model, pads at the end never influence the real tokens). Images come as
    pixel_values (B_img, 3, S, S), every sample's in order, empty when there are
    none, and, from a data set with cached features, as vision_features
    (B_img, P, Dv) float16 instead. With object_grid g, object_targets
    (B_img, g * g, attributes): each visual token's object (svlm/data/drawing.py;
    -100 for pictures whose records do not list their objects)."""

    def __init__(self, pad_id: int, object_grid: int | None = None) -> None:
        self.pad_id = pad_id
        self.object_grid = object_grid

    def __call__(self, items: list[dict | None]) -> dict[str, torch.Tensor]:
        bad = [(it["bad"], it["fatal"]) for it in items if it is not None and "bad" in it]  # found in a worker
        items = [it for it in items if it is not None and "bad" not in it]
        T = max((len(it["input_ids"]) for it in items), default=1)
        ids = torch.full((len(items), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), T), IGNORE, dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            ids[b, :n] = torch.tensor(it["input_ids"])
            labels[b, :n] = torch.tensor(it["labels"])
        # Where the loss needs logits (positions followed by a supervised token), found
        # here on the CPU: the training step then never asks the GPU how many there are.
        return self.finish({"input_ids": ids, "labels": labels, "target_index": target_positions(labels)}, items, bad)

    def finish(self, batch: dict, items: list[dict], bad: list) -> dict:
        """Add the items' pictures (or cached features), in their order, their object
        targets, and the bad samples a worker found."""
        pixels = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        batch["pixel_values"] = torch.cat(pixels) if pixels else torch.zeros(0)
        features = [it["vision_features"] for it in items if it.get("vision_features") is not None]
        if features:
            batch["vision_features"] = torch.cat(features)
        if self.object_grid:
            batch["object_targets"] = self.object_targets(items)
        if bad:
            batch["bad_samples"] = bad
        return batch

    def object_targets(self, items: list[dict]) -> torch.Tensor:
        """(B_img, g * g, attributes): a one-picture item's objects, IGNORE for any other picture."""
        g, rows = self.object_grid, []
        for it in items:
            n = it.get("n_images", 0)
            if n == 1 and it.get("objects") is not None:
                rows.append(torch.tensor(object_labels(it["objects"], g)))
            else:
                rows += [torch.full((g * g, len(ATTRIBUTES)), IGNORE)] * n
        return torch.stack(rows) if rows else torch.zeros(0, g * g, len(ATTRIBUTES), dtype=torch.long)
