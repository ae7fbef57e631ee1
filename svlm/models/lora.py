"""LoRA on our language model, through peft: low-rank adapters beside the
linear layers of the LM blocks a stage trains (`stage.lora`), the blocks'
own weights frozen.

    y = W x + (alpha / r) * B (A dropout(x))      A: (r, in), B: (out, r), B starts at 0

peft's `inject_adapter_in_model` swaps each targeted nn.Linear of our own
modules for its LoRA layer (the Linear kept as `.base_layer`); no peft model
wraps ours. Adapters live only while training:

- a finished model folder holds W + (alpha / r) B A, merged: it loads, serves
  and exports with no peft installed;
- a checkpoint holds W unchanged plus the adapters (`lora.safetensors`, and
  `lora.json` for r, alpha, dropout and targets), so a resume continues
  exactly; loading one for inference merges them here, in plain torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from svlm.errors import ConfigError

ADAPTERS = "lora.safetensors"
SETTINGS = "lora.json"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    r: int = 0  # the adapters' rank; 0: no LoRA (the LM's blocks train whole)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05  # on the adapters' input
    targets: list[str] = field(default_factory=lambda: ATTENTION + MLP)  # linear layers of a block, by name

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ConfigError(f"stage.lora.r is the adapters' rank (0: no LoRA), got {self.r}")
        if self.r and not self.targets:
            raise ConfigError("stage.lora.targets is empty: name the linear layers to adapt, e.g. [q_proj, v_proj]")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"stage.lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def add_lora(lm: nn.Module, cfg: LoraConfig, layers: list[int]) -> None:
    """Adapters on the `cfg.targets` linear layers of the blocks `layers` of `lm`."""
    import peft

    known = {name.rsplit(".", 1)[-1] for name, m in lm.layers.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(cfg.targets) - known)
    if unknown:
        raise ConfigError(f"stage.lora.targets: no {unknown} linear layer in an LM block; they have {sorted(known)}")
    blocks = "|".join(str(i) for i in layers)
    pattern = rf"layers\.({blocks})\..*\b({'|'.join(cfg.targets)})"  # peft matches a string in full
    settings = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern)
    peft.inject_adapter_in_model(settings, lm)


def is_adapter(name: str) -> bool:
    """Whether a parameter or state-dict name is an adapter's (lora_A / lora_B)."""
    return ".lora_" in name


def has_lora(model: nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in model.named_parameters())


def scale_of(model: nn.Module) -> float:
    """alpha / r of the model's adapters (peft's LoRA layers keep it as `scaling`)."""
    return next(m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict))


def split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A state dict with adapters -> (the plain model's, with W under its own
    name, and the adapters' own)."""
    plain, adapters = {}, {}
    for name, t in state.items():
        if is_adapter(name):
            adapters[name] = t
        else:
            plain[name.replace(".base_layer.", ".")] = t
    return plain, adapters


def merge(plain: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """W + scale * B A for every adapted weight of `plain` (a new dict; W's dtype kept)."""
    merged = dict(plain)
    for name, a in adapters.items():
        if ".lora_A." not in name:
            continue
        layer = name.split(".lora_A.")[0]  # lm.layers.3.attn.q_proj
        b = adapters[name.replace(".lora_A.", ".lora_B.")]
        w = plain[f"{layer}.weight"]
        merged[f"{layer}.weight"] = (w.float() + scale * (b.float() @ a.float()).to(w.device)).to(w.dtype)
    return merged


def save_adapters(folder: Path, adapters: dict[str, torch.Tensor], cfg: LoraConfig) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, str(folder / ADAPTERS))
    (folder / SETTINGS).write_text(json.dumps(asdict(cfg), indent=2))


def load_adapters(folder: Path) -> tuple[dict[str, torch.Tensor], LoraConfig] | None:
    """A checkpoint's adapters and their settings; None when it has none."""
    if not (folder / ADAPTERS).is_file():
        return None
    from safetensors.torch import load_file

    try:
        cfg = LoraConfig(**json.loads((folder / SETTINGS).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{folder / SETTINGS}: the adapters' settings cannot be read ({e})") from None
    return load_file(str(folder / ADAPTERS)), cfg
