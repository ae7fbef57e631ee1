"""`python -m svlm.tokenizer files=[a.jsonl,b.jsonl] vocab_size=6400 out=<folder>`: train
a byte-level BPE on the text of data files (settings: conf/tokenizer.yaml; the
tokenizers: svlm/tokenizer/__init__.py). `tokenizer.path=<folder>` loads it."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from omegaconf import DictConfig

from svlm.cli import command
from svlm.config import PathsConfig
from svlm.errors import ConfigError
from svlm.typed import build, to_plain


@dataclass
class TrainTokenizerConfig:
    files: list[str] = field(default_factory=list)  # jsonl/json files or tables, of any data format
    vocab_size: int = 6400
    out: str | None = None  # the folder to write
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if not self.files:
            raise ConfigError("files=[<file>,...] is required: the jsonl or json files whose text the BPE learns")
        if self.out is None:
            raise ConfigError("out=<folder> is required: where to write the tokenizer")


@command("tokenizer", free_text=("out",))
def main(cfg: DictConfig) -> None:
    from svlm.tokenizer import texts_of, train_bpe

    settings = build(TrainTokenizerConfig, to_plain(cfg))
    tok = train_bpe(texts_of(settings.files), settings.vocab_size)
    tok.save_pretrained(settings.out)
    print(json.dumps({"out": settings.out, "vocab_size": len(tok)}))


if __name__ == "__main__":
    sys.exit(main())
