"""Text generation with the KV cache: greedy by default, or sampling with
temperature, top-k and top-p. Stops at the end-of-turn token (and at any other
stop id the model has: a pretrained LM's end-of-text).

No path ever picks the image placeholder, or the `banned_ids` a caller
gives (ChatEncoder.banned_ids: padding, role tokens and every other special
token that is not a stop): their logits are set to -inf before any choice.

Prompts of different lengths decode together (a ragged batch): each row keeps
its own positions in the KV cache and sees only its own keys, so a row's
tokens are the ones it would get alone. `Batch` is the loop underneath:
streams join (one batched prefill) and leave (finished or cancelled) between
decode steps; `generate` drives it over a list of prompts, `batch_size` rows
at a time, and the server (svlm/serve/engine.py) drives it with requests as
they arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from svlm.hardware import THREADS
from svlm.models.kv_cache import KVCache
from svlm.models.vlm import VLM


@dataclass
class Sampling:
    """How one row picks its tokens: greedy at temperature 0."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None  # sampling rows: their own generator; None: the one generate was given


def pick_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) next token ids."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prepare_for_decoding(model: VLM, compile: bool = False) -> VLM:
    """What the inference commands (infer.py, eval.py's answers, benchmarks,
    the server) do to a loaded model: the decoding layout, and with
    hardware.compile each transformer block compiled (the decode step's many
    small operations fused; one graph serves every layer, so a few
    compilations, about 30 s on this CPU: it pays for long generations and
    the server, not for one question; figures in the README's "Speed
    benchmarks")."""
    decoding_layout(model)
    if compile:
        model.compile_blocks()
    return model


@torch.no_grad()
def decoding_layout(model: VLM) -> VLM:
    """The language model laid out for inference (eval.py, infer.py, the
    server; a model being trained keeps its layout), same values throughout:

    - the matrices that read the same input (q, k and v; SwiGLU's gate and
      up) fused, one matmul each instead of three and two;
    - on the CPU, the weight matrices stored column-major (transposed
      strides): a decode step of a small batch is a matrix-vector product
      per weight, and MKL's runs about 1.6x faster on weights stored so
      (x @ W.T reads W.T row by row).

    benchmarks/decode_speed.py measures the whole step."""
    for block in model.lm.layers:
        column_major = block.attn.q_proj.weight.device.type == "cpu"
        block.attn.fuse(column_major)
        if hasattr(block.mlp, "fuse"):
            block.mlp.fuse(column_major)
    for p in model.lm.parameters():
        if p.dim() == 2 and p.device.type == "cpu" and p.is_contiguous():
            p.data = p.data.t().contiguous().t()
    return model


@dataclass(eq=False)  # compared (and hashed) by identity
class Stream:
    """One prompt being continued: its ids, views, budget, stops and sampling;
    `ids` grows as it decodes, `finish` is set when it ends."""

    prompt: list[int]
    pixel_values: torch.Tensor | None  # (views, 3, S, S) of its images, or None
    max_new_tokens: int
    stop_ids: frozenset[int]
    sampling: Sampling = field(default_factory=Sampling)
    generator: torch.Generator | None = None
    on_token: Callable[[Stream], None] | None = None  # after each new token (streaming)
    ids: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" (a stop id), "length" (budget or context), "cancelled"

    def fit(self, context: int) -> None:
        """Cut the budget to the room the model's context leaves (finished
        at once when there is none); a ValueError when the prompt overflows it."""
        if len(self.prompt) > context:
            raise ValueError(f"a prompt of {len(self.prompt)} tokens is longer than model.lm.max_seq_len={context}")
        self.max_new_tokens = min(self.max_new_tokens, context - len(self.prompt))
        if self.max_new_tokens < 1:
            self.finish = "length"

    def take(self, token: int) -> None:
        """Record the token just picked; finished at a stop id or the budget."""
        if token in self.stop_ids:
            self.finish = "stop"
            return
        self.ids.append(token)
        if len(self.ids) >= self.max_new_tokens:
            self.finish = "length"
        if self.on_token is not None:
            self.on_token(self)


def banned_for(model: VLM, banned_ids: Sequence[int] = ()) -> torch.Tensor:
    """The ids no answer may contain: the model's image slot and `banned_ids`, on the model's device."""
    ids = sorted({model.cfg.image_token_id, *banned_ids} - {-1})
    return torch.tensor([i for i in ids if 0 <= i < model.cfg.lm.vocab_size], device=next(model.parameters()).device)


def choose(logits: torch.Tensor, streams: Sequence[Stream], banned: torch.Tensor | None = None) -> list[int]:
    """(B, V) logits -> each row's next id, each by its own sampling: one
    argmax for the greedy rows, one draw per sampling row from its generator;
    never a `banned` id."""
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned, float("-inf"))
    picked = logits.argmax(dim=-1)  # (B,)
    for b, s in enumerate(streams):
        if s.sampling.temperature > 0:
            picked[b] = pick_next(logits[b : b + 1], s.sampling.temperature, s.sampling.top_k, s.sampling.top_p,
                                  s.generator)[0]  # fmt: skip
    return picked.tolist()  # the step's one read from the device


class Batch:
    """Streams decoded together, one KV-cache row each (row i is streams[i]).

    Every method that touches the cache runs under torch.inference_mode: no
    autograd bookkeeping on any operation (views, in-place cache writes),
    which is about 8% of a decode step at bench.size=tiny on this CPU, same
    values. The cache then holds inference tensors, which may not be written
    outside that mode: hence add, step and cancel each enter it."""

    def __init__(self, model: VLM, banned_ids: Sequence[int] = ()) -> None:
        self.model, self.cache, self.streams = model, KVCache(), []
        self.device = next(model.parameters()).device
        self.banned = banned_for(model, banned_ids)
        self.pad = 0 if model.cfg.image_token_id != 0 else 1

    def __len__(self) -> int:
        return len(self.streams)

    @torch.inference_mode()
    def add(self, streams: Sequence[Stream]) -> list[Stream]:
        """Prefill `streams` together (right-padded to the longest), pick their
        first tokens and join them to the batch; returns those already done."""
        for s in streams:
            s.fit(self.model.cfg.lm.max_seq_len)
        streams = [s for s in streams if s.finish is None]
        if not streams:
            return []
        lengths = [len(s.prompt) for s in streams]
        T = max(lengths)
        ids = torch.tensor([s.prompt + [self.pad] * (T - len(s.prompt)) for s in streams], device=self.device)
        views = [s.pixel_values for s in streams if s.pixel_values is not None]
        pixels = torch.cat(views).to(self.device) if views else None  # every row's views, in row order
        cache = KVCache()
        cache.reserve(max(len(s.prompt) + s.max_new_tokens for s in streams))  # all these rows will need
        last = torch.tensor(lengths, device=self.device) - 1  # each row's last prompt token
        logits = self.model(ids, pixels, cache=cache, valid=lengths, logits_at=last).logits  # (B, V)
        for s, token in zip(streams, choose(logits, streams, self.banned)):
            s.take(token)
        self.cache.absorb(cache)
        self.streams += streams
        return self._retire()

    @torch.inference_mode()
    def step(self) -> list[Stream]:
        """One new token for every stream; returns (and removes) those that finished."""
        THREADS.follow()  # the thread count follows the host's free cores (svlm/hardware.py)
        last = torch.tensor([[s.ids[-1]] for s in self.streams], device=self.device)  # (B, 1)
        logits = self.model.lm(last, cache=self.cache).logits[:, -1]  # (B, V): no image slots to fill
        for s, token in zip(self.streams, choose(logits, self.streams, self.banned)):
            s.take(token)
        return self._retire()

    @torch.inference_mode()
    def cancel(self, stream: Stream) -> None:
        stream.finish = "cancelled"
        self._retire()

    def _retire(self) -> list[Stream]:
        done = []
        for row in reversed(range(len(self.streams))):
            if self.streams[row].finish is not None:
                done.append(self.streams[row])
                self.cache.drop(row)  # the last row moves into its place
                self.streams[row] = self.streams[-1]
                self.streams.pop()
        return done


def split_views(model: VLM, prompts: Sequence[Sequence[int]], pixel_values: torch.Tensor | None) -> list:
    """Each prompt's share of pixel_values (all rows' views in row order), by its image slots."""
    if pixel_values is None:
        return [None] * len(prompts)
    counts = [sum(t == model.cfg.image_token_id for t in p) // model.num_image_tokens for p in prompts]
    if sum(counts) != pixel_values.shape[0]:
        raise ValueError(f"the prompts have image slots for {sum(counts)} views; {pixel_values.shape[0]} were given")
    parts, start = [], 0
    for n in counts:
        parts.append(pixel_values[start : start + n] if n else None)
        start += n
    return parts


@torch.inference_mode()
def generate(
    model: VLM,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None,
    stop_ids: int | Sequence[int],
    max_new_tokens: int | Sequence[int] = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    on_token: Callable[[list[int]], None] | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    sampling: Sequence[Sampling] | None = None,
    banned_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Continue each prompt: `input_ids` (B, T), or B lists of any lengths;
    `pixel_values` every row's views in row order. Returns the new ids of each
    row, up to and excluding the first stop token (one of `stop_ids`), of at
    most `max_new_tokens` (one for all rows, or one a row). At most
    `batch_size` rows decode together (None: all); as one finishes the next
    prompt takes its place. `sampling` gives each row its own (else all rows
    share temperature, top_k, top_p and `generator`). `on_token` sees row 0's
    ids so far (streaming). No row ever picks the image slot or a `banned_ids` id."""
    model.eval()
    prompts = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else [list(p) for p in input_ids]
    stops = frozenset([stop_ids] if isinstance(stop_ids, int) else stop_ids)
    shared = Sampling(temperature, top_k, top_p)
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    streams = [
        Stream(p, views, budgets[i], stops, sampling[i] if sampling else shared, generator)
        for i, (p, views) in enumerate(zip(prompts, split_views(model, prompts, pixel_values)))
    ]
    for s in streams:
        if s.sampling.seed is not None:
            s.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(s.sampling.seed)
    if on_token is not None and streams:
        streams[0].on_token = lambda s: on_token(s.ids)
    if not use_cache:
        for s in streams:
            decode_without_cache(model, s, banned_ids)
        return [s.ids for s in streams]
    # Shortest prompts first: a prefill pads its prompts to the longest, so
    # neighbours in length join together. Rows join once half the batch is
    # free (or nothing else runs): prefills stay batched.
    batch, waiting = Batch(model, banned_ids), sorted(streams, key=lambda s: len(s.prompt))
    size = batch_size or len(streams)
    while waiting or len(batch):
        free = size - len(batch)
        if waiting and (free >= max(size // 2, 1) or not len(batch)):
            joining, waiting = waiting[:free], waiting[free:]
            batch.add(joining)
        if len(batch):
            batch.step()
    return [s.ids for s in streams]


def decode_without_cache(model: VLM, s: Stream, banned_ids: Sequence[int] = ()) -> None:
    """The reference path: every step runs the whole sequence again."""
    s.fit(model.cfg.lm.max_seq_len)
    device, banned = next(model.parameters()).device, banned_for(model, banned_ids)
    pixels = None if s.pixel_values is None else s.pixel_values.to(device)
    while s.finish is None:
        seq = torch.tensor([s.prompt + s.ids], device=device)
        s.take(choose(model(seq, pixels).logits[:, -1], [s], banned)[0])


class TextStreamer:
    """Prints the decoded text of a growing id list as it grows, holding back
    an incomplete multi-byte character."""

    def __init__(self, tokenizer, write: Callable[[str], None]) -> None:
        self.tok, self.write, self.printed = tokenizer, write, ""

    def __call__(self, ids: list[int]) -> None:
        text = self.tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if text.startswith(self.printed):
            self.write(text[len(self.printed) :])
            self.printed = text
