"""From an OpenAI chat-completions request to what the model takes: the
conversation as turns of our chat template (svlm/data/chat.py), its images,
and the sampling settings. Every problem raises an APIError, which the app
returns as OpenAI's error JSON with a 4xx status.

    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                 {"type": "text", "text": "What colour is the shape?"}]}
    -> ("user", "<image>\\nWhat colour is the shape?") and one image

Image parts become `<image>` tags where the request puts them; the chat
encoder then places them as the model was trained to see them (its
`image_placement`: first by default, so a text-first request reads as
`<image>\\n{text}` too).

Images come as data URLs, or as local paths / file:// URLs inside
`serve.image_root` only (symlinks and `..` resolved first). Remote URLs are
never fetched.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from svlm.data.chat import IMAGE_TOKEN, SPECIAL_TOKENS
from svlm.data.formats import DataError
from svlm.data.images import open_image
from svlm.serve.config import LimitsConfig


class APIError(Exception):
    """A request the server refuses, as OpenAI reports it."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    turns: list[tuple[str, str]]  # (role, text) with one <image> per image, in reading order
    images: list[Image.Image] = field(default_factory=list)
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


# Parameters of OpenAI's API this server does not implement, with the values that mean "not used".
UNSUPPORTED = {
    "n": (None, 1),
    "stop": (None, [], ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
}


def parse_chat_request(body: object, limits: LimitsConfig, image_root: Path | None) -> ChatRequest:
    """Check a decoded JSON body and turn it into a ChatRequest; `image_root` is resolved."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    if "model" in body and not isinstance(body["model"], str):
        raise APIError(400, "'model' must be a string", param="model")
    turns, refs = _conversation(body.get("messages"), limits)
    if len(refs) > limits.max_images:
        raise APIError(
            400,
            f"{len(refs)} images in one request; this server takes at most {limits.max_images}",
            param="messages",
            code="too_many_images",
        )
    images = [load_image(ref, param, limits, image_root) for ref, param in refs]

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = limits.default_max_tokens if max_tokens is None else _integer(max_tokens, param)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(400, f"'{param}' must be between 1 and {limits.max_tokens}, got {max_tokens}", param=param)
    temperature = _number(body.get("temperature"), "temperature", 0.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be between 0 and 2, got {temperature}", param="temperature")
    top_p = _number(body.get("top_p"), "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    top_k = 0 if body.get("top_k") is None else _integer(body["top_k"], "top_k")
    if top_k < 0:
        raise APIError(400, f"'top_k' must be >= 0, got {top_k}", param="top_k")
    seed = None if body.get("seed") is None else _integer(body["seed"], "seed")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return ChatRequest(
        turns=turns,
        images=images,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def _integer(value: object, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{param}' must be an integer, got {value!r}", param=param)
    return value


def _number(value: object, param: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{param}' must be a number, got {value!r}", param=param)
    return float(value)


# ------------------------------------------------------------ the conversation


def _conversation(messages: object, limits: LimitsConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """messages -> (turns, [(image reference, its param)]). System messages'
    text goes before the text of the user message that follows them
    (serve.system=prepend), or is dropped (ignore), or refused (reject)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", param="messages")
    turns: list[tuple[str, str]] = []
    refs: list[tuple[str, str]] = []
    system: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if role in ("system", "developer"):
            if limits.system == "reject":
                raise APIError(
                    400, "system messages are refused by this server (serve.system=reject)", param=f"{where}.role"
                )
            text, images = _content(message.get("content"), where, allow_images=False)
            if limits.system == "prepend":
                system.append(text)
        elif role in ("user", "assistant"):
            text, images = _content(message.get("content"), where, allow_images=role == "user")
            if role == "user" and system:
                text, system = "\n\n".join([*system, text]), []
            turns.append((role, text))
            refs += images
        else:
            raise APIError(
                400, f"{where}.role must be 'system', 'user' or 'assistant', got {role!r}", param=f"{where}.role"
            )
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "the last message must be a user message", param="messages")
    return turns, refs


def _content(content: object, where: str, allow_images: bool) -> tuple[str, list[tuple[str, str]]]:
    """A message's content (a string, or a list of text and image_url parts) ->
    (text with an <image> for each image, [(image reference, its param)])."""
    if isinstance(content, str):
        return _text(content, f"{where}.content"), []
    if not isinstance(content, list) or not content:
        raise APIError(400, f"{where}.content must be a string or a non-empty list of parts", param=f"{where}.content")
    texts, refs = [], []
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(_text(part["text"], param))
        elif kind == "image_url":
            if not allow_images:
                raise APIError(400, f"{param}: images are only taken in user messages", param=param)
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise APIError(400, f"{param}.image_url.url must be a string", param=param)
            texts.append(IMAGE_TOKEN)
            refs.append((url, param))
        else:
            raise APIError(
                400, f"{param} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', ...}}", param=param
            )
    return "\n".join(texts), refs


def _text(text: str, param: str) -> str:
    for token in SPECIAL_TOKENS:
        if token in text:
            raise APIError(
                400, f"{param}: the text may not contain {token!r} (send images as image_url parts)", param=param
            )
    return text


# -------------------------------------------------------------------- images

DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)


def load_image(ref: str, param: str, limits: LimitsConfig, image_root: Path | None) -> Image.Image:
    """A data URL, or a local path / file:// URL inside image_root -> a decoded PIL image."""
    if ref.startswith("data:"):
        data = _data_url(ref, param, limits)
    elif ref.startswith(("http://", "https://")):
        raise APIError(
            400,
            f"{param}: remote image URLs are not fetched; send the image as a data URL",
            param=param,
            code="invalid_image_url",
        )
    else:
        data = _local_file(ref, param, limits, image_root)
    return decode_image(data, param, limits)


def _data_url(ref: str, param: str, limits: LimitsConfig) -> bytes:
    m = DATA_URL.fullmatch(ref)
    if m is None or ";base64" not in m["params"]:
        raise APIError(
            400, f"{param}: a data URL must look like data:image/png;base64,...", param=param, code="invalid_image_url"
        )
    b64 = "".join(m["data"].split())
    if len(b64) // 4 * 3 > limits.max_image_bytes:
        raise _too_large(param, f"over serve.max_image_bytes={limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(
            400, f"{param}: the data URL is not valid base64 ({e})", param=param, code="invalid_image"
        ) from e


def _local_file(ref: str, param: str, limits: LimitsConfig, image_root: Path | None) -> bytes:
    if image_root is None:
        raise APIError(
            403,
            f"{param}: local image paths are refused: the server was started without serve.image_root",
            type="permission_error",
            param=param,
            code="image_root_unset",
        )
    path = ref
    if ref.startswith("file:"):
        url = urlparse(ref)
        if url.netloc not in ("", "localhost"):
            raise APIError(
                400, f"{param}: only file:///path URLs of this machine are read", param=param, code="invalid_image_url"
            )
        path = unquote(url.path)
    full = (image_root / path).resolve()  # an absolute path replaces the root; symlinks and .. resolved
    if not full.is_relative_to(image_root):
        raise APIError(
            403,
            f"{param}: the image is outside serve.image_root",
            type="permission_error",
            param=param,
            code="image_outside_root",
        )
    if not full.is_file():
        raise APIError(400, f"{param}: no such image file under serve.image_root", param=param, code="image_not_found")
    if full.stat().st_size > limits.max_image_bytes:
        raise _too_large(param, f"over serve.max_image_bytes={limits.max_image_bytes} bytes")
    return full.read_bytes()


def decode_image(data: bytes, param: str, limits: LimitsConfig) -> Image.Image:
    """Image bytes -> a decoded image. The size is read from the header and
    checked against serve.max_image_pixels before any pixel is decoded; then
    svlm.data.images.open_image decodes with its decompression-bomb guard."""
    if len(data) > limits.max_image_bytes:
        raise _too_large(param, f"over serve.max_image_bytes={limits.max_image_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(param, str(e)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise APIError(400, f"{param}: not an image PIL can read", param=param, code="invalid_image") from e
    if width * height > limits.max_image_pixels:
        raise _too_large(param, f"{width}x{height} is over serve.max_image_pixels={limits.max_image_pixels} pixels")
    try:
        return open_image(io.BytesIO(data), where=param)  # type: ignore[arg-type]  (PIL opens file objects too)
    except DataError as e:
        if e.reason == "image too large":
            raise _too_large(param, e.detail) from e
        raise APIError(400, f"{param}: {e.reason}", param=param, code="invalid_image") from e


def _too_large(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: image too large: {why}", param=param, code="image_too_large")
