"""Export a model to a transformers format, and import it back.

    python -m svlm.export ckpt=<model or run folder> out=<folder>
    python -m svlm.export from_llava=<exported folder> out=<model folder>

The exported folder loads with plain transformers, no code from here:

    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)

The projector decides the format (each maps our weights one to one, with
logits equal to ours):
- `model.projector.norm=true` (the default `tiny` and `base` models: patches
  merged by pixel shuffle, or not, then LayerNorm, Linear, GELU, Linear):
  InternVL (`InternVLForConditionalGeneration`, svlm/export/internvl.py);
- `model.projector.norm=false` with `compress=none` (Linear, GELU, Linear on
  every patch): LLaVA (`LlavaForConditionalGeneration`, svlm/export/llava.py).
Both carry DINOv2 as their vision tower, a Llama as their language model, and
LLaVA's processor with our tokenizer, chat template and image processor
(svlm/export/parts.py). Anything else has no counterpart and is refused with a
ConfigError that names the part and its config key (see `export_problems`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from svlm.atomic import new_folder
from svlm.config import PathsConfig
from svlm.data.chat import IMAGE_TOKEN, chat_template, without_our_content
from svlm.errors import ConfigError
from svlm.export import internvl, llava
from svlm.export.parts import check_out_folder, generation_config, lm_problems, processor
from svlm.model_folder import load_model, resolve_model, save_model
from svlm.models.vlm import VLM, VLMConfig
from svlm.tokenizer import load_tokenizer

FORMATS = {fmt.MODEL_TYPE: fmt for fmt in (llava, internvl)}


@dataclass
class ExportConfig:
    ckpt: str | None = None  # a model or run folder; None: the newest finished model under paths.outputs
    out: str | None = None  # the folder to write
    from_llava: str | None = None  # import instead: an exported folder (LLaVA or InternVL) -> our model folder `out`
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if self.out is None:
            raise ConfigError("out=<folder> is required: where to write the exported model")
        if self.from_llava is not None and self.ckpt is not None:
            raise ConfigError("ckpt and from_llava both set: export a model (ckpt=) or import one (from_llava=)")


# ------------------------------------------------------------------- the checks


def format_for(cfg: VLMConfig) -> ModuleType:
    """The transformers format whose projector is ours: InternVL with the norm, LLaVA without."""
    return internvl if cfg.projector.norm else llava


def export_problems(cfg: VLMConfig, num_register_tokens: int = 0) -> list[str]:
    """Every part of `cfg` that its format (format_for) cannot express, with its config key."""
    p = cfg.projector
    found = []
    if cfg.vision.tiles is not None:
        found.append(
            f"image tiles (model.vision.tiles={cfg.vision.tiles}): the exported processors give each image one "
            "view, without our tile grid and separators (InternVL's own tiling chooses and marks tiles otherwise)"
        )
    if num_register_tokens:
        found.append(
            f"a DINOv2 with {num_register_tokens} register tokens (model.vision.path): LLaVA's and InternVL's "
            "feature selection keeps or drops only the first token"
        )
    if p.kind != "mlp":
        found.append(
            f"the {p.kind} projector (model.projector.kind={p.kind}): LLaVA's and InternVL's projectors are "
            "MLPs on the patch grid; use model.projector.kind=mlp"
        )
    else:
        if p.compress == "avg_pool":
            found.append(
                "avg_pool token compression (model.projector.compress=avg_pool): LLaVA keeps every patch and "
                "InternVL merges them by pixel shuffle; use model.projector.compress=pixel_shuffle or none"
            )
        if p.hidden is not None and p.hidden != cfg.lm.d_model:
            found.append(
                f"a projector hidden width of {p.hidden} (model.projector.hidden): LLaVA's and InternVL's is the "
                f"language model's width ({cfg.lm.d_model}); use model.projector.hidden=null"
            )
        if p.pos_embed:
            found.append(
                "learned positions of the visual tokens (model.projector.pos_embed=true): LLaVA's and InternVL's "
                "projectors have none"
            )
        found += format_for(cfg).problems(cfg)
    return found + lm_problems(cfg.lm)


def check_exportable(cfg: VLMConfig, num_register_tokens: int = 0) -> ModuleType:
    """The format `cfg` exports to; a ConfigError listing every problem otherwise."""
    problems = export_problems(cfg, num_register_tokens)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        name = format_for(cfg).NAME if cfg.projector.kind == "mlp" else "LLaVA or InternVL"
        raise ConfigError(f"this model cannot be exported to transformers' {name} format:\n{lines}")
    return format_for(cfg)


# ---------------------------------------------------------------------- export


def export_model(model: VLM, tokenizer, out: str | Path) -> Path:
    """Write `model` and its processor in its transformers format; returns the folder."""
    fmt = check_exportable(model.cfg, model.vision.num_registers)
    config = fmt.hf_config(model, tokenizer)
    theirs = fmt.model_class()(config)
    ours = fmt.export_weights(model)
    expected = theirs.state_dict()
    if set(ours) != set(expected):
        raise RuntimeError(
            f"weight names differ: only ours {sorted(set(ours) - set(expected))[:5]}, "
            f"only {fmt.NAME}'s {sorted(set(expected) - set(ours))[:5]}"
        )
    theirs.load_state_dict(ours, strict=True)
    theirs.generation_config = generation_config(config.text_config)
    proc = processor(model, tokenizer, fmt.token_patch(model), "full" if model.cfg.vision.use_cls else "default")
    check_out_folder(Path(out))
    with new_folder(out) as tmp:
        theirs.save_pretrained(tmp)
        proc.save_pretrained(tmp)
    return Path(out)


# ---------------------------------------------------------------------- import


def import_model(folder: str | Path, out: str | Path) -> Path:
    """An exported folder (LLaVA or InternVL, as export_model writes) -> our
    model folder `out`, for `ckpt=` of eval.py and infer.py, or to export
    again. (Not yet for `init_from=`: training checks the model-config key that
    svlm.json holds, and an imported model has none.)"""
    from transformers import AutoConfig, AutoProcessor

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"from_llava={str(folder)!r}: no config.json there")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in FORMATS:
        raise ConfigError(f"from_llava={str(folder)!r} holds a {config.model_type!r} model, not llava or internvl")
    fmt = FORMATS[config.model_type]
    proc = AutoProcessor.from_pretrained(folder, local_files_only=True)
    cfg, dinov2_config = fmt.vlm_config(config, proc.image_processor)
    own = without_our_content(proc.chat_template)  # (the LM's template, placement), or None: ours
    cfg.image_placement = own[1] if own else "inline" if proc.chat_template == chat_template("inline") else "first"
    model = VLM(cfg, dinov2_config=dinov2_config)
    # transformers reads the weights (whatever key format the files use) into its modules.
    weights = fmt.model_class().from_pretrained(folder, dtype=torch.float32).state_dict()
    state = model.state_dict()  # a name with no counterpart (DINOv2's mask token) keeps its initial value
    state.update({name: weights[fmt.hf_name(name)] for name in state if fmt.hf_name(name) is not None})
    model.load_state_dict(state, strict=True)
    tokenizer = load_tokenizer(folder, "auto" if own else "ours")
    if own:
        tokenizer.chat_template, cfg.chat_format = own[0], "tokenizer"
        eos = config.text_config.eos_token_id
        cfg.stop_ids = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    if len(tokenizer) != cfg.lm.vocab_size:
        raise ConfigError(
            f"from_llava={str(folder)!r}: the tokenizer has {len(tokenizer)} tokens (with our chat tokens "
            f"{IMAGE_TOKEN}, ...) but the model's vocabulary is {cfg.lm.vocab_size}"
        )
    meta = {"stage": "import", "model": f"{fmt.MODEL_TYPE}-import", "source": str(folder.resolve()), "finished": True}
    return save_model(out, model, tokenizer, meta)


# ------------------------------------------------------------------------- CLI


def run(cfg: ExportConfig) -> Path:
    if cfg.from_llava is not None:
        return import_model(cfg.from_llava, cfg.out)
    folder = resolve_model(cfg.ckpt, cfg.paths.outputs)
    model, tokenizer, _ = load_model(folder)
    with torch.no_grad():
        out = export_model(model, tokenizer, cfg.out)
    kind = json.loads((out / "config.json").read_text())["model_type"]
    print(
        f"{FORMATS[kind].NAME} format ({kind}): load with transformers' AutoModelForImageTextToText and AutoProcessor"
    )
    return out
