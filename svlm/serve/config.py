"""The server's settings (conf/serve.yaml), checked at start like every other config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from svlm.config import HardwareConfig, PathsConfig
from svlm.errors import ConfigError
from svlm.typed import build, to_plain


@dataclass
class LimitsConfig:
    image_root: str | None = None  # local image paths are read only inside this folder; None: refused
    max_body_bytes: int = 20 * 2**20  # a request's JSON body
    max_image_bytes: int = 10 * 2**20  # one image, after base64 decoding
    max_image_pixels: int = 4096 * 4096  # width x height of one image, read from its header before decoding
    max_images: int = 4  # images in one request
    max_tokens: int = 1024  # the most new tokens a request may ask for (lmms-eval asks 1024 by default)
    default_max_tokens: int = 128  # when a request does not say
    max_batch: int = 8  # requests decoded together (continuous batching: svlm/serve/engine.py)
    max_queue: int = 8  # requests waiting for a place in the batch; one more gets 429
    api_key: str | None = None  # clients must send `Authorization: Bearer <key>`; None: no key asked
    system: Literal["prepend", "ignore", "reject"] = "prepend"  # what system messages do (README: Serve)
    allowed_hosts: list[str] | None = None  # Host headers accepted; None: localhost names on a loopback bind, else any

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_images", "max_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ConfigError(f"serve.max_queue must be >= 0, got {self.max_queue}")
        if not 1 <= self.default_max_tokens <= self.max_tokens:
            raise ConfigError(
                f"serve.default_max_tokens={self.default_max_tokens} must be between 1 and "
                f"serve.max_tokens={self.max_tokens}"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("serve.api_key is empty: give a key, or null to ask for none")


@dataclass
class ServeConfig:
    ckpt: str | None = None  # a model or run folder; None: the newest finished model
    host: str = "127.0.0.1"  # 0.0.0.0 serves every network the machine is on: only where you trust it
    port: int = 8000
    model_name: str = "svlm"  # the id /v1/models lists; requests may name any model
    serve: LimitsConfig = field(default_factory=LimitsConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")


def load_serve_config(cfg: Any) -> ServeConfig:
    return build(ServeConfig, to_plain(cfg))
