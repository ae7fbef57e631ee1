"""A tokenizer's own chat template (a pretrained LM's: ChatML, Llama 3, ...),
used the way svlm/data/chat.py uses ours: what to feed, and what to supervise.

A template is Jinja that turns a whole conversation into one string, so
which characters are the assistant's is not said anywhere. We find out by
rendering the conversation once with each assistant text swapped for a
marker no text contains, and splitting there:

    <|im_start|>user\\n<image>\\nWhat colour?<|im_end|>\\n<|im_start|>assistant\\n  [MARK 1]  <|im_end|>\\n ...
    '--------------------------- fed, not supervised ----------------------'  answer 1   end of turn

Each assistant text is supervised together with the template's own
end-of-turn token, the special token the template writes right after an
answer (found once, from a probe conversation): that is where generation
stops. Everything else (system prompt, role headers, the generation prompt)
is fed but not supervised. Templates that rewrite or drop an assistant
text (keeping only the last one, say) cannot be split this way: they are
refused with a message naming the folder, and `tokenizer.chat_template=ours`
is the way out.
"""

from __future__ import annotations

import re

from svlm.errors import ConfigError

_MARK = "\u2063svlm-answer-{}\u2063"  # U+2063 (invisible separator) around it: no real text has this


class LMTemplate:
    """Renders conversations with `tokenizer.chat_template` and cuts them into
    (text, supervised) pieces."""

    def __init__(self, tokenizer, where: str) -> None:
        self.tok, self.where = tokenizer, where
        probe = self._render([("user", "Hi"), ("assistant", _MARK.format(1))], False)
        after = probe.split(_MARK.format(1), 1)[-1]
        gap = re.match(r"[ \t]*", after).group()  # Llama 2 writes " </s>" after an answer
        specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)
        end = next((s for s in specials if s and after[len(gap) :].startswith(s)), None)
        if _MARK.format(1) not in probe or end is None:
            raise ConfigError(
                f"{where}: its chat template writes no special token right after an answer "
                f"(it writes {after[:30]!r}), so there is no end-of-turn token to stop at; "
                "use tokenizer.chat_template=ours"
            )
        self.end_token, self.after_answer = end, gap + end
        self.end_id = tokenizer.convert_tokens_to_ids(end)

    def _render(self, turns: list[tuple[str, str]], add_generation_prompt: bool) -> str:
        messages = [{"role": role, "content": text} for role, text in turns]
        try:  # enable_thinking=False: Qwen3's generation prompt then holds the empty <think></think> its
            # template writes before a last answer, so a prompt is exactly what training fed before one
            return self.tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=False
            )
        except Exception as e:  # the template's own raise_exception(...), or a Jinja error
            raise ValueError(f"the chat template of {self.where} refused the conversation: {e}") from e

    def pieces(self, turns: list[tuple[str, str]], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The conversation as (text, supervised) pieces, in order; joined, the
        texts are what the template renders. Raises ValueError when it cannot be split."""
        marked = [(role, _MARK.format(i) if role == "assistant" else text) for i, (role, text) in enumerate(turns)]
        rest = self._render(marked, add_generation_prompt)
        out: list[tuple[str, bool]] = []
        for i, (role, text) in enumerate(turns):
            if role != "assistant":
                continue
            mark = _MARK.format(i)
            if rest.count(mark) != 1 or not rest.split(mark, 1)[1].startswith(self.after_answer):
                raise ValueError(
                    f"the chat template of {self.where} does not write the answer of turn {i + 1} as given, followed by "
                    f"{self.after_answer!r}; use tokenizer.chat_template=ours"
                )
            before, rest = rest.split(mark, 1)
            out += [(before, False), (text + self.after_answer, True)]
            rest = rest[len(self.after_answer) :]
        return [*out, (rest, False)]
