"""What a benchmark task is, and reading its questions from a local copy of its
hub repository (`git clone https://huggingface.co/datasets/<repo>`).

A task (svlm/benchmarks/tasks.py) names its repository, configuration, split
and columns as lmms-eval 0.7.3 reads them, and defines, as lmms-eval does:
the prompt of a question (`prompt`, with the task's default pre/post prompt),
how a reply is read and scored (`score`: the answer parsed, right or not, and
what the aggregation needs), and the metrics over all scored questions
(`aggregate`). Questions are read with `datasets` (svlm/data/hub.py): the
repository's card or file names say where each split is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from svlm.data.hub import CellImages, open_parts
from svlm.data.images import EmbeddedImage, open_image
from svlm.errors import ConfigError


@dataclass(frozen=True)
class Task:
    name: str
    repo: str  # the hub data set, as lmms-eval's dataset_path
    split: str
    columns: tuple[str, ...]  # what every row must have
    subset: str | None = None  # the repository's configuration (lmms-eval's dataset_name)
    max_new_tokens: int = 1024  # lmms-eval's generation_kwargs (1024: its models' default)
    measures: str = ""  # one line, for the README's table
    id_column: str | None = None  # the question's id in the data set
    headline: tuple[str, float] = ("exact_match", 1.0)  # the metric drawn in a run's curves, and its best value

    @property
    def folder(self) -> str:
        """The folder `git clone` makes (what paths.benchmarks holds)."""
        return self.repo.split("/")[1]

    @property
    def layout(self) -> str:
        """The expected layout, in words (for errors)."""
        config = f"configuration {self.subset!r}, " if self.subset else ""
        return (f"a local copy of the {self.repo} data set ({config}split {self.split!r}, columns "
                f"{', '.join(self.columns)}): git clone https://huggingface.co/datasets/{self.repo}")  # fmt: skip

    def prompt(self, doc: dict) -> str:
        raise NotImplementedError

    def score(self, doc: dict, reply: str) -> dict:
        """{"parsed": the answer read from the reply, "correct": bool, ...what `aggregate` needs}."""
        raise NotImplementedError

    def aggregate(self, scored: list[dict]) -> dict[str, float]:
        raise NotImplementedError


class Questions:
    """The rows of a task's split in a local copy of its repository, one at a time."""

    def __init__(self, task: Task, path: str | Path) -> None:
        self.task, self.path = task, Path(path)
        if not self.path.exists():
            raise ConfigError(f"benchmark.path={str(path)!r}: no such folder; expected {task.layout}")
        try:
            self.parts = open_parts(self.path, task.subset, task.split)
        except ConfigError as e:
            raise ConfigError(f"benchmark.path={str(path)!r}: {e}; expected {task.layout}") from None
        for name, ds in self.parts:
            missing = [c for c in task.columns if c not in ds.column_names]
            if missing:
                raise ConfigError(
                    f"benchmark.path={str(path)!r}: {name} has no column {missing[0]!r} (its columns: "
                    f"{', '.join(ds.column_names)}); expected {task.layout}"
                )
        self.index = [(k, row) for k, (_, ds) in enumerate(self.parts) for row in range(len(ds))]

    def __len__(self) -> int:
        return len(self.index)

    def where(self, i: int) -> str:
        k, row = self.index[i]
        return f"{self.parts[k][0]}:{row}"

    def doc(self, i: int) -> dict:
        """Row i, its image cells as they are stored (decode them with `images`)."""
        k, row = self.index[i]
        return self.parts[k][1].data.table.slice(row, 1).to_pylist()[0]

    def images(self, doc: dict, i: int) -> list[Image.Image]:
        """The question's picture (lmms-eval's doc_to_visual: none when the cell is empty), as RGB."""
        cell = doc.get("image")
        if cell is None:
            return []
        ref = EmbeddedImage(CellImages([cell], self.path), i, "image", 0, f"{self.where(i)}#0")
        return [open_image(ref, self.where(i)).convert("RGB")]  # a DataError naming the row if it does not decode
