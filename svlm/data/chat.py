"""The chat template, shared by training, evaluation and inference.

A conversation is a list of (role, text) turns, role "user" or "assistant":

    <|user|>\n{text}<|end|>\n<|assistant|>\n{text}<|end|>\n ...

Only the assistant's text and its end-of-turn token are supervised. A prompt
for generation ends with "<|assistant|>\n"; generation stops at "<|end|>".
Each `<image>` in a user turn expands to `num_image_tokens` placeholder ids
that the model fills with visual tokens; with tiles (svlm/models/tiles.py),
to its grid's layout: one run of slots a view, between separator texts.

Where the images go (`image_placement`, recorded with every model): `first`
puts a user turn's images before its text, one a line, whatever order the
data or a request gives them in:

    "What colour is it?\n<image>"  ->  "<image>\nWhat colour is it?"

That is how every model trained here so far has seen them (the shapes data
and LLaVA's data open a question with `<image>\n`), so a client that sends
its text part first (OpenAI's own vision example does) gets the answer the
model was trained to give. `inline` keeps the order as given, for models
trained on interleaved text and images.

The same template is also written, as Jinja, into the tokenizer folder
(`chat_template`), so other tools format prompts the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from svlm.models.tiles import Tiling, layout
from svlm.models.vlm import IGNORE_INDEX as IGNORE  # the label the loss skips: the model's own constant

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
END_TOKEN = "<|end|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS = [PAD_TOKEN, IMAGE_TOKEN, END_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]

ImagePlacement = Literal["first", "inline"]


def place_images(text: str, placement: ImagePlacement = "first") -> str:
    """A user turn's text with its <image> tags where the model expects them:
    `first`: every tag before the text, one a line, and the text's pieces
    between tags joined by newlines; `inline`: as given."""
    if placement == "inline" or IMAGE_TOKEN not in text:
        return text
    pieces = [piece.strip() for piece in text.split(IMAGE_TOKEN)]
    tags = "\n".join([IMAGE_TOKEN] * text.count(IMAGE_TOKEN))
    return tags + "".join(f"\n{piece}" for piece in pieces if piece)


# place(text): a user turn's text with its <image> tags placed (place_images, in Jinja).
_PLACE_MACRO = (
    "{%- macro place(text) -%}"
    "{%- if not images_first or '<image>' not in text -%}{{ text }}"
    "{%- else -%}"
    "{%- set ns = namespace(tags=[], rest='') -%}"
    "{%- for piece in text.split('<image>') -%}"
    "{%- if not loop.first %}{% set ns.tags = ns.tags + ['<image>'] %}{% endif -%}"
    "{%- if piece.strip() %}{% set ns.rest = ns.rest + '\\n' + piece.strip() %}{% endif -%}"
    "{%- endfor -%}"
    "{{ ns.tags | join('\\n') }}{{ ns.rest }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)
# text: a message's content as one string, its parts joined by newlines and an image part as <image>.
_TEXT_OF_MESSAGE = (
    "{%- if message['content'] is string %}{% set text = message['content'] -%}"
    "{%- else %}{% set ns = namespace(parts=[]) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' %}{% set ns.parts = ns.parts + ['<image>'] -%}"
    "{%- elif part['type'] == 'text' %}{% set ns.parts = ns.parts + [part['text']] %}{% endif -%}"
    "{%- endfor %}{% set text = ns.parts | join('\\n') %}{% endif -%}"
)


def chat_template(placement: ImagePlacement = "first") -> str:
    """The template as Jinja, for transformers' apply_chat_template: content is
    a string (with <image> tags) or a list of {"type": "image"} / {"type":
    "text", "text": ...} parts (joined by newlines, an image part as <image>,
    as the server joins OpenAI's parts); user turns then go through the same
    placement as place_images."""
    first = "true" if placement == "first" else "false"
    return (
        _PLACE_MACRO + f"{{%- set images_first = {first} -%}}"
        "{%- for message in messages -%}" + _TEXT_OF_MESSAGE + "{{ '<|' + message['role'] + '|>\\n' }}"
        "{{ place(text) if message['role'] == 'user' else text }}"
        "{{ '<|end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif -%}"
    )


def with_our_content(template: str, placement: ImagePlacement = "first") -> str:
    """A tokenizer's own template, made to read messages the way ours does
    (content parts joined, a user turn's images placed) before it renders
    them: what an exported model's processor carries."""
    first = "true" if placement == "first" else "false"
    return (
        _PLACE_MACRO + f"{{%- set images_first = {first} -%}}"
        "{%- set converted = namespace(messages=[]) -%}"
        "{%- for message in messages -%}" + _TEXT_OF_MESSAGE + "{%- set converted.messages = converted.messages + "
        "[{'role': message['role'], 'content': place(text) if message['role'] == 'user' else text}] -%}"
        "{%- endfor -%}"
        "{%- set messages = converted.messages -%}" + template
    )


def without_our_content(template: str) -> tuple[str, ImagePlacement] | None:
    """(the tokenizer's own template, placement) of a with_our_content template; None for any other."""
    for placement in ("first", "inline"):
        prelude = with_our_content("", placement)
        if template.startswith(prelude):
            return template[len(prelude) :], placement
    return None


JINJA_TEMPLATE = chat_template("first")


def render(
    turns: list[tuple[str, str]], add_generation_prompt: bool = False, image_placement: ImagePlacement = "first"
) -> str:
    """The conversation as one string (what the Jinja template also gives)."""
    text = "".join(
        f"<|{role}|>\n{place_images(content, image_placement) if role == 'user' else content}{END_TOKEN}\n"
        for role, content in turns
    )
    return text + (f"{ASSISTANT_TOKEN}\n" if add_generation_prompt else "")


ChatFormat = Literal["ours", "tokenizer"]
OUR_TEMPLATES = (chat_template("first"), chat_template("inline"))


def chat_format_of(tokenizer) -> ChatFormat:
    """ "tokenizer" when the tokenizer kept a chat template of its own (svlm.tokenizer.finish), else "ours"."""
    own = tokenizer.chat_template
    return "tokenizer" if own and own not in OUR_TEMPLATES else "ours"


class ChatEncoder:
    """Turns conversations into input ids and labels for one tokenizer, with our
    template or (chat_format "tokenizer") the tokenizer's own (svlm/data/lm_template.py)."""

    def __init__(
        self,
        tokenizer,
        num_image_tokens: int,
        image_placement: ImagePlacement = "first",
        chat_format: ChatFormat = "ours",
        stop_ids: tuple[int, ...] = (),
        tiling: Tiling | None = None,
    ) -> None:
        self.tok = tokenizer
        self.num_image_tokens = num_image_tokens  # slots of one view
        self.tiling = tiling  # None: every image is one view; else each comes with its grid
        self.image_placement = image_placement
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_id = tokenizer.pad_token_id
        self.template = None
        if chat_format == "tokenizer":
            from svlm.data.lm_template import LMTemplate

            self.template = LMTemplate(tokenizer, getattr(tokenizer, "name_or_path", "the tokenizer"))
            self.end_id = self.template.end_id
        else:
            self.end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
        # Generation stops at the end of a turn, and at the LM's own end-of-text ids (its generation_config).
        self.stop_ids = list(dict.fromkeys([self.end_id, *stop_ids]))
        # What an answer may never contain: the image slot, padding, and every
        # other special token that is not a stop (a new turn's start, BOS).
        added = getattr(tokenizer, "added_tokens_decoder", {})
        specials = {self.image_id, self.pad_id, *tokenizer.all_special_ids, *(i for i, t in added.items() if t.special)}
        self.banned_ids = sorted(i for i in specials if i is not None and i >= 0 and i not in self.stop_ids)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix = [bos] if bos is not None and self.template is None else []  # a template writes its own

    @classmethod
    def for_model(cls, tokenizer, model) -> ChatEncoder:
        """The encoder a VLM was trained with: its image slots, image placement and chat format."""
        cfg = model.cfg
        return cls(tokenizer, model.num_image_tokens, cfg.image_placement, cfg.chat_format, tuple(cfg.stop_ids),
                   cfg.vision.tiling)  # fmt: skip

    def image_ids(self, grid: tuple[int, int] = (1, 1)) -> list[int]:
        """What one <image> of this grid expands to: N slots a view, between its layout's separators."""
        out: list[int] = []
        for piece in layout(grid):
            out += (
                [self.image_id] * self.num_image_tokens
                if piece is None
                else self.tok.encode(piece, add_special_tokens=False)
            )
        return out

    def _ids(self, text: str, grids: Iterator[tuple[int, int]] | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        out: list[int] = []
        for i in ids:  # each <image> becomes N placeholder slots, or its grid's layout
            if i != self.image_id:
                out.append(i)
            elif self.tiling is None:
                out.extend([i] * self.num_image_tokens)
            else:
                grid = next(grids, None) if grids is not None else None
                if grid is None:
                    raise ValueError("with model.vision.tiles every image needs its grid (ImageProcessor.views)")
                out.extend(self.image_ids(grid))
        return out

    def encode(
        self, turns: list[tuple[str, str]], add_generation_prompt: bool = False, grids: list | None = None
    ) -> tuple[list[int], list[int]]:
        """-> (input_ids, labels); labels are IGNORE except on assistant text + the end-of-turn token.
        `grids`: each image's tile grid, in the order of its <image> tag (with tiles only)."""
        turns = [(role, place_images(text, self.image_placement) if role == "user" else text) for role, text in turns]
        grids = iter(grids or [])
        if self.template is not None:
            return self._encode_pieces(self.template.pieces(turns, add_generation_prompt), grids)
        ids, labels = list(self.prefix), [IGNORE] * len(self.prefix)
        for role, content in turns:
            head = self._ids(f"<|{role}|>\n")
            body = self._ids(content, grids) + [self.end_id]
            tail = self._ids("\n")
            ids += head + body + tail
            supervised = body if role == "assistant" else [IGNORE] * len(body)
            labels += [IGNORE] * len(head) + supervised + [IGNORE] * len(tail)
        if add_generation_prompt:
            head = self._ids(f"{ASSISTANT_TOKEN}\n")
            ids += head
            labels += [IGNORE] * len(head)
        return ids, labels

    def _encode_pieces(self, pieces: list[tuple[str, bool]], grids: Iterator) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for text, supervised in pieces:
            piece = self._ids(text, grids)
            ids += piece
            labels += piece if supervised else [IGNORE] * len(piece)
        return ids, labels

    def prompt(
        self,
        question: str,
        history: list[tuple[str, str]] | None = None,
        image: bool | int = True,
        grids: list | None = None,
    ) -> list[int]:
        """Ids of a generation prompt: history, then the user's question. `image`:
        how many images come with it (True: one), tagged before the question
        when neither it nor the history has tags; `grids`: theirs, with tiles."""
        n = int(image)
        if n and IMAGE_TOKEN not in question and not any(IMAGE_TOKEN in c for _, c in history or []):
            question = "\n".join([IMAGE_TOKEN] * n + [question])
        ids, _ = self.encode([*(history or []), ("user", question)], add_generation_prompt=True, grids=grids)
        return ids
