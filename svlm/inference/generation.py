"""Text generation with the KV cache: greedy by default, or sampling with
temperature, top-k and top-p. Stops at the end-of-turn token (and at any other
stop id the model has: a pretrained LM's end-of-text)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from svlm.models.language_model import KVCache
from svlm.models.vlm import VLM


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


@torch.no_grad()
def generate(
    model: VLM,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    stop_ids: int | Sequence[int],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    on_token: Callable[[list[int]], None] | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt of `input_ids` (B, T): prompts of one batch have the
    same length (no padding). Returns the new ids of each row, up to and
    excluding the first stop token (one of `stop_ids`). `on_token` sees row 0's ids so far (streaming)."""
    model.eval()
    B = input_ids.shape[0]
    room = model.cfg.lm.max_seq_len - input_ids.shape[1]
    max_new_tokens = min(max_new_tokens, room)
    cache = KVCache() if use_cache else None
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    stops = torch.tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), device=input_ids.device)
    seq = input_ids
    logits = model(input_ids, pixel_values, cache=cache).logits[:, -1]  # (B, V)
    for _ in range(max_new_tokens):
        nxt = pick_next(logits, temperature, top_k, top_p, generator)  # (B,)
        done |= torch.isin(nxt, stops)
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
        if on_token is not None and not done[0]:
            on_token(out[0])
        if bool(done.all()):
            break
        if use_cache:
            logits = model(nxt[:, None], cache=cache).logits[:, -1]
        else:
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            logits = model(seq, pixel_values).logits[:, -1]
    return out


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
