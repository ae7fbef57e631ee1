"""The chat template, shared by training, evaluation and inference.

A conversation is a list of (role, text) turns, role "user" or "assistant":

    <|user|>\n{text}<|end|>\n<|assistant|>\n{text}<|end|>\n ...

Only the assistant's text and its end-of-turn token are supervised. A prompt
for generation ends with "<|assistant|>\n"; generation stops at "<|end|>".
Each `<image>` in a user turn expands to `num_image_tokens` placeholder ids
that the model fills with visual tokens.

The same template is also written, as Jinja, into the tokenizer folder
(`chat_template`), so other tools format prompts the same way.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
END_TOKEN = "<|end|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS = [PAD_TOKEN, IMAGE_TOKEN, END_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]

JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

IGNORE = -100


def render(turns: list[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as one string (what the Jinja template also gives)."""
    text = "".join(f"<|{role}|>\n{content}{END_TOKEN}\n" for role, content in turns)
    return text + (f"{ASSISTANT_TOKEN}\n" if add_generation_prompt else "")


class ChatEncoder:
    """Turns conversations into input ids and labels for one tokenizer."""

    def __init__(self, tokenizer, num_image_tokens: int) -> None:
        self.tok = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
        self.pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix = [bos] if bos is not None else []

    def _ids(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        out: list[int] = []
        for i in ids:  # each <image> becomes N placeholder slots
            out.extend([i] * self.num_image_tokens if i == self.image_id else [i])
        return out

    def encode(self, turns: list[tuple[str, str]], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """-> (input_ids, labels); labels are IGNORE except on assistant text + <|end|>."""
        ids, labels = list(self.prefix), [IGNORE] * len(self.prefix)
        for role, content in turns:
            head = self._ids(f"<|{role}|>\n")
            body = self._ids(content) + [self.end_id]
            tail = self._ids("\n")
            ids += head + body + tail
            supervised = body if role == "assistant" else [IGNORE] * len(body)
            labels += [IGNORE] * len(head) + supervised + [IGNORE] * len(tail)
        if add_generation_prompt:
            head = self._ids(f"{ASSISTANT_TOKEN}\n")
            ids += head
            labels += [IGNORE] * len(head)
        return ids, labels

    def prompt(self, question: str, history: list[tuple[str, str]] | None = None, image: bool = True) -> list[int]:
        """Ids of a generation prompt: history, then the user's question."""
        if image and IMAGE_TOKEN not in question and not any(IMAGE_TOKEN in c for _, c in history or []):
            question = f"{IMAGE_TOKEN}\n{question}"
        ids, _ = self.encode([*(history or []), ("user", question)], add_generation_prompt=True)
        return ids
