"""The vision encoder: transformers' Dinov2Model, plus the image preprocessing
that matches it.

Two ways to build it:
- `path`: a local folder holding a DINOv2 checkpoint (config.json, weights and,
  optionally, preprocessor_config.json), loaded with `from_pretrained`;
- no path: a `Dinov2Config` of the given size with random weights (tiny models,
  tests, and training the encoder from scratch).

Images are resized to a square of `image_size` (bicubic), scaled to [0, 1]
and normalised once with the encoder's own mean and std.

Which features the projector sees (`feature_layer`):
- None (the default): `last_hidden_state`, the last layer's output after
  DINOv2's final LayerNorm;
- an index k: `hidden_states[k]`, a layer's output before that LayerNorm
  (0 is the patch embeddings, -1 the last layer, -2 the one before). This is
  how LLaVA reads its vision tower (`vision_feature_layer`), so a model
  whose projector has no norm exports to transformers' LLaVA format only when
  trained with an index (svlm/export/). The layers after k, and the final
  LayerNorm, are unused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from svlm.errors import ConfigError
from svlm.models.tiles import Tiling

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VisionConfig:
    path: str | None = None  # local DINOv2 folder; None: random init from the fields below
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    use_cls: bool = False  # prepend the CLS token to the patch tokens
    # None: features after the final LayerNorm (last_hidden_state); k: hidden_states[k],
    # before it, as LLaVA's vision_feature_layer (-1: the last layer). See the module docstring.
    feature_layer: int | None = None
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # [R, C]: an image larger than image_size is cut into up to R x C tiles plus a
    # global thumbnail (svlm/models/tiles.py); None: one view of every image.
    tiles: list[int] | None = None

    @property
    def tiling(self) -> Tiling | None:
        return None if self.tiles is None else Tiling(self.tiles[0], self.tiles[1], self.image_size)

    def __post_init__(self) -> None:
        if self.tiles is not None and (len(self.tiles) != 2 or min(self.tiles) < 1):
            raise ValueError(f"model.vision.tiles is [rows, cols] of at least 1 each (or null), got {self.tiles}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.vision.image_size ({self.image_size}) must be a multiple of "
                f"model.vision.patch_size ({self.patch_size})"
            )
        n = self.num_layers
        if self.feature_layer is not None and not -(n + 1) <= self.feature_layer <= n:
            raise ValueError(
                f"model.vision.feature_layer={self.feature_layer} is out of range for an encoder of "
                f"{n} layers (model.vision.num_layers): use -{n + 1}..{n}, e.g. -1 for the last layer"
            )


def dinov2_config_of(cfg: VisionConfig) -> Dinov2Config:
    """The Dinov2Config of the encoder the fields of `cfg` describe (its path aside)."""
    return Dinov2Config(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        patch_size=cfg.patch_size,
        image_size=cfg.image_size,
    )


def load_dinov2(cfg: VisionConfig, config: Dinov2Config | None = None) -> Dinov2Model:
    """From `path` with its weights; else random weights from `config` (as saved
    with a trained model) or from the fields of `cfg`."""
    if config is not None:
        return Dinov2Model(config)
    if cfg.path is None:
        return Dinov2Model(dinov2_config_of(cfg))
    folder = Path(cfg.path)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.vision.path={cfg.path!r}: no DINOv2 checkpoint there (expected a folder with "
            "config.json and model.safetensors, e.g. a download of facebook/dinov2-base)"
        )
    config = Dinov2Config.from_pretrained(folder)
    if config.model_type != "dinov2":
        raise ConfigError(f"model.vision.path={cfg.path!r} holds a {config.model_type!r} model, not dinov2")
    return Dinov2Model.from_pretrained(folder, local_files_only=True)


def sync_with_checkpoint(cfg: VisionConfig) -> VisionConfig:
    """Fill patch size, width and image statistics from a local folder, so the
    config describes what is really loaded."""
    if cfg.path is None:
        return cfg
    folder = Path(cfg.path)
    if not (folder / "config.json").is_file():
        load_dinov2(cfg)  # raises the clear error
    config = json.loads((folder / "config.json").read_text())
    cfg.patch_size = config.get("patch_size", cfg.patch_size)
    cfg.hidden_size = config.get("hidden_size", cfg.hidden_size)
    cfg.num_layers = config.get("num_hidden_layers", cfg.num_layers)
    cfg.num_heads = config.get("num_attention_heads", cfg.num_heads)
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        stats = json.loads(pre.read_text())
        cfg.image_mean = list(stats.get("image_mean", cfg.image_mean))
        cfg.image_std = list(stats.get("image_std", cfg.image_std))
    cfg.__post_init__()
    return cfg


class ImageProcessor:
    """PIL image (any mode, any size) -> normalised float tensor (3, S, S); with
    tiles, `views` gives an image's tiles and thumbnail (V, 3, S, S) and its grid."""

    def __init__(self, cfg: VisionConfig) -> None:
        self.size = cfg.image_size
        self.tiling = cfg.tiling
        self.mean = np.asarray(cfg.image_mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(cfg.image_std, dtype=np.float32).reshape(3, 1, 1)

    @staticmethod
    def to_rgb(image: Image.Image) -> Image.Image:
        if image.mode == "RGB":
            return image
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: rescale to 8 bits
            arr = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if arr.max() > 255 else 255.0
            image = Image.fromarray((arr / peak * 255.0).clip(0, 255).astype(np.uint8))
        elif image.mode == "F":
            arr = np.asarray(image, dtype=np.float64)
            arr = (arr - arr.min()) / max(arr.max() - arr.min(), 1e-12)
            image = Image.fromarray((arr * 255).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self.to_rgb(image)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), resample=Image.Resampling.BICUBIC)
        arr = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, S, S)
        return torch.from_numpy((arr - self.mean) / self.std)

    def views(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """(views (V, 3, S, S), grid): the tiles row by row then the thumbnail, or the one view."""
        if self.tiling is None:
            return self(image).unsqueeze(0), (1, 1)
        views, grid = self.tiling.views(self.to_rgb(image))
        return torch.stack([self(v) for v in views]), grid

    def all_views(self, images: list[Image.Image]) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
        """(every image's views, in order, (V_total, 3, S, S), or None without images; their grids)."""
        views = [self.views(im) for im in images]
        return (torch.cat([v for v, _ in views]) if views else None), [g for _, g in views]


class VisionEncoder(nn.Module):
    """pixel_values (B, 3, S, S) -> patch features (B, P, Dv), P = (S/patch)^2 (+1 with CLS)."""

    def __init__(self, cfg: VisionConfig, dinov2_config: Dinov2Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.dinov2 = load_dinov2(cfg, dinov2_config)
        self.hidden_size = self.dinov2.config.hidden_size
        self.grid = cfg.image_size // self.dinov2.config.patch_size
        self.num_registers = getattr(self.dinov2.config, "num_register_tokens", 0) or 0

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.cfg.feature_layer is None:  # after the final LayerNorm
            hidden = self.dinov2(pixel_values=pixel_values).last_hidden_state  # (B, 1+R+P, Dv)
        else:  # one layer's output, before the final LayerNorm (LLaVA's vision_feature_layer)
            out = self.dinov2(pixel_values=pixel_values, output_hidden_states=True)
            hidden = out.hidden_states[self.cfg.feature_layer]  # (B, 1+R+P, Dv)
        patches = hidden[:, 1 + self.num_registers :]  # (B, P, Dv)
        if self.cfg.use_cls:
            patches = torch.cat([hidden[:, :1], patches], dim=1)  # (B, 1+P, Dv)
        return patches
