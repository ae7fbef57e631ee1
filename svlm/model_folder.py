"""Model folders: weights (safetensors), model config, tokenizer, and a small
`svlm.json` saying what produced them. Written atomically (a temporary folder
renamed into place), so a folder that exists is complete.

    <folder>/model.safetensors   weights
    <folder>/config.json         the VLMConfig (with image_placement: how prompts place images)
    <folder>/vision_config.json  the DINOv2 config (so loading needs no DINOv2 download)
    <folder>/svlm.json           stage, model name and key, step, finished_at, metrics
    <folder>/tokenizer.json ...  the tokenizer, with its chat template (ours, or with
                                 chat_format "tokenizer" the pretrained LM's own)
    <folder>/lora.safetensors    a checkpoint's LoRA adapters, kept apart to resume
    <folder>/lora.json           (and their r, alpha, dropout, targets); finished folders are merged
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from transformers import Dinov2Config

from svlm.atomic import new_folder
from svlm.data.chat import chat_template
from svlm.models.lora import LoraConfig, has_lora, load_adapters, merge, save_adapters, scale_of, split
from svlm.models.vlm import VLM, VLMConfig
from svlm.tokenizer import load_tokenizer

META = "svlm.json"


# Model settings added after models were trained, with the value that means
# "as before": left out of the key at that value, so older models keep their key.
LATER_KEYS = {
    ("vision", "feature_layer"): None,
    ("image_placement",): "first",
    ("lm", "path"): None,
    ("lm", "rope_scaling"): None,
    ("lm", "head_size"): None,
    ("lm", "qkv_bias"): None,
    ("lm", "qk_norm"): False,
}


def model_key(model_cfg: dict) -> str:
    """A short hash of a model config: stage 2 only starts from a stage 1 of the same model."""
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in model_cfg.items()}
    for (*groups, name), default in LATER_KEYS.items():
        node = cfg
        for group in groups:
            node = node.get(group) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node and node[name] == default:
            del node[name]
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def save_model(
    folder: str | os.PathLike,
    model: VLM,
    tokenizer,
    meta: dict,
    extra: dict[str, object] | None = None,
    extra_dirs: dict[str, Path] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapters: LoraConfig | None = None,
) -> Path:
    """Write a model folder atomically. `extra` maps file names to objects saved
    with torch.save in the same folder (the trainer state of a checkpoint);
    `extra_dirs` maps names to folders moved into it; `state_dict` holds the
    weights when the model's own are sharded over processes (FSDP, DeepSpeed).
    A model with LoRA adapters is saved merged, or with `adapters` (its LoRA
    settings) unmerged beside them, as a checkpoint (svlm/models/lora.py)."""
    with new_folder(folder) as tmp:
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        for name, src in (extra_dirs or {}).items():
            shutil.move(str(src), str(tmp / name))
        if state_dict is None and not has_lora(model):
            save_safetensors(model, str(tmp / "model.safetensors"))
        else:
            plain, lora = split(state_dict if state_dict is not None else model.state_dict())
            if adapters is not None and lora:
                save_adapters(tmp, lora, adapters)
            elif lora:
                plain = merge(plain, lora, scale_of(model))
            tied = model.lm.lm_head.weight is model.lm.embed_tokens.weight
            weights = {
                k: v.detach().cpu().contiguous() for k, v in plain.items() if not (tied and k == "lm.lm_head.weight")
            }  # fmt: skip  (one copy, as save_safetensors keeps)
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
        model.vision.dinov2.config.to_json_file(tmp / "vision_config.json")
        if model.cfg.chat_format == "ours":
            tokenizer.chat_template = chat_template(model.cfg.image_placement)
        tokenizer.save_pretrained(tmp)
        (tmp / META).write_text(json.dumps({**meta, "finished_at": time.time()}, indent=2))
    return Path(folder)


MODEL_FILES = ("model.safetensors", "config.json", "vision_config.json", META)


def is_model_folder(folder: Path) -> bool:
    return all((folder / f).is_file() for f in MODEL_FILES)


def find_models(root: str | os.PathLike) -> list[tuple[float, Path, dict]]:
    """Every finished model folder under root, newest first."""
    found = []
    for meta_path in Path(root).glob(f"**/{META}"):
        folder = meta_path.parent
        if folder.name.startswith(".") or not is_model_folder(folder):
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("finished") is False:  # a periodic checkpoint (stage.save_every), not a finished model
            continue
        found.append((meta.get("finished_at", 0.0), folder, meta))
    return sorted(found, key=lambda t: t[0], reverse=True)


def resolve_model(
    path: str | os.PathLike | None,
    outputs: str | os.PathLike,
    key: str = "ckpt",
    stage: str | None = None,
    model: str | None = None,
) -> Path:
    """A model folder from a model folder, a run folder (its newest model), or
    None (the newest finished model under `outputs`, optionally of one stage
    and model key)."""
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{key}={str(path)!r}: no such file or folder")
        if p.is_dir() and is_model_folder(p):
            return p
        if p.is_dir():
            models = find_models(p)
            if models:
                return models[0][1]
        raise FileNotFoundError(
            f"{key}={str(path)!r} is not a model folder ({', '.join(MODEL_FILES)}) and holds no finished model"
        )
    models = [
        (t, f, m)
        for t, f, m in find_models(outputs)
        if (stage is None or m.get("stage") == stage) and (model is None or m.get("model_key") == model)
    ]
    if not models:
        what = f"finished {stage} model" if stage else "finished model"
        if model:
            what += f" of this model config (key {model})"
        raise FileNotFoundError(f"no {what} under {str(outputs)!r}: train one first, or set {key}=<folder>")
    return models[0][1]


def load_model(
    folder: str | os.PathLike, device: str | torch.device = "cpu", merge_adapters: bool = True
) -> tuple[VLM, object, dict]:
    """-> (model in eval mode, tokenizer, meta). A checkpoint's LoRA adapters are
    merged into its weights (`merge_adapters=False`: left out, for a resume to add)."""
    folder = Path(folder)
    if not is_model_folder(folder):
        raise FileNotFoundError(f"{folder}: not a model folder (needs {', '.join(MODEL_FILES)})")
    cfg = VLMConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = VLM(cfg, dinov2_config=Dinov2Config.from_json_file(folder / "vision_config.json"))
    adapters = load_adapters(folder) if merge_adapters else None
    if adapters is None:
        missing, unexpected = load_safetensors(model, str(folder / "model.safetensors"), strict=False)
    else:
        state = merge(load_file(str(folder / "model.safetensors")), adapters[0], adapters[1].scale)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm.lm_head.weight" or not cfg.lm.tie_embeddings]
    if missing or unexpected:
        raise ValueError(
            f"{folder}/model.safetensors does not match its config.json: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    tokenizer = load_tokenizer(folder, "auto" if cfg.chat_format == "tokenizer" else "ours")
    if cfg.chat_format == "ours":
        tokenizer.chat_template = chat_template(cfg.image_placement)
    meta = json.loads((folder / META).read_text())
    return model.to(device).eval(), tokenizer, meta
