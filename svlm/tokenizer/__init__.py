"""Tokenizers: our byte-level BPE trained from the data's text in seconds, or
any local Hugging Face tokenizer folder (a pretrained LM's). Both come out as
a transformers tokenizer with an <image> token and a chat template: ours
(svlm/data/chat.py, with its special tokens), or with `chat_template=auto`
the folder's own when it has one (svlm/data/lm_template.py).

    python -m svlm.tokenizer files=[data.jsonl,more.jsonl] vocab_size=6400 out=my-tokenizer
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from svlm.atomic import new_folder
from svlm.data.chat import IMAGE_TOKEN, JINJA_TEMPLATE, OUR_TEMPLATES, PAD_TOKEN, SPECIAL_TOKENS
from svlm.errors import ConfigError


@dataclass
class TokenizerConfig:
    path: str | None = None  # a local tokenizer folder; None: train our BPE on the data
    vocab_size: int = 512  # for our BPE
    # auto: a tokenizer folder's own chat template when it has one, else ours; ours: always ours
    chat_template: Literal["auto", "ours"] = "auto"


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) over `texts`: any Unicode text round-trips exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return finish(PreTrainedTokenizerFast(tokenizer_object=tok))


def finish(tok: PreTrainedTokenizerBase, chat_template: str = "ours") -> PreTrainedTokenizerBase:
    """Add the tokens the chat needs that are missing, and set the pad token and
    the template: ours, or with "auto" the tokenizer's own if it has one (then
    only <image>, and <pad> if it has no pad token, are added)."""
    own = chat_template == "auto" and bool(tok.chat_template) and tok.chat_template not in OUR_TEMPLATES
    needed = ([IMAGE_TOKEN] + ([] if tok.pad_token is not None else [PAD_TOKEN])) if own else SPECIAL_TOKENS
    missing = [t for t in needed if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if not own:
        tok.pad_token = PAD_TOKEN
        tok.chat_template = JINJA_TEMPLATE
    elif tok.pad_token is None:
        tok.pad_token = PAD_TOKEN
    return tok


def load_tokenizer(path: str | os.PathLike, chat_template: str = "ours") -> PreTrainedTokenizerBase:
    """The tokenizer of a local folder, finished (see `finish`)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer.path={str(path)!r}: no such folder")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConfigError(
            f"tokenizer.path={str(path)!r}: no tokenizer there (expected tokenizer.json or tokenizer.model)"
        )
    return finish(AutoTokenizer.from_pretrained(folder, local_files_only=True), chat_template)


def texts_of(files: Iterable, max_records: int | None = None) -> Iterable[str]:
    """Every turn's text in data sources (DataFile: jsonl/JSON files or tables of
    any format), from at most `max_records` records a source (bad records are
    skipped here; the data loader reports them). A plain path is a source of its own."""
    from svlm.data.source import DataFile

    for file in files:
        file = file if isinstance(file, DataFile) else DataFile(Path(file), Path(file).parent)
        for i, rec in enumerate(file.text_records(on_error="skip")):
            if max_records is not None and i >= max_records:
                break
            for _, content in rec.turns:
                yield content.replace(IMAGE_TOKEN, "")


def tokenizer_for_data(cfg: TokenizerConfig, train_files: list) -> PreTrainedTokenizerBase:
    """The configured tokenizer folder, or our BPE trained once on `train_files`
    (DataFile, svlm/data/source.py) and cached next to the first of them."""
    if cfg.path is not None:
        return load_tokenizer(cfg.path, cfg.chat_template)
    h = hashlib.sha256()
    for f in train_files:
        h.update(f.stamp().encode())
    h.update(f"vocab={cfg.vocab_size}".encode())
    folder = Path(train_files[0].path).parent / ".svlm" / f"tokenizer-bpe{cfg.vocab_size}-{h.hexdigest()[:10]}"
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    tok = train_bpe(texts_of(train_files, max_records=200_000), cfg.vocab_size)  # plenty for a BPE
    with new_folder(folder, replace=False) as tmp:  # another run may train the same one at once
        tok.save_pretrained(tmp)
    return load_tokenizer(folder)
