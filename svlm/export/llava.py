"""transformers' LLaVA format (`LlavaForConditionalGeneration`), for models
whose projector is Linear, GELU, Linear on every patch (no merging, no norm).

- vision: our Dinov2Model as the `vision_tower` (its Dinov2Config is the
  `vision_config`). LLaVA reads `hidden_states[vision_feature_layer]`, a
  layer's output BEFORE DINOv2's final LayerNorm, so only models trained with
  `model.vision.feature_layer` set (e.g. -1) are expressible. Strategy
  "default" drops the CLS token (`model.vision.use_cls=false`), "full" keeps
  it (`use_cls=true`).
- projector: our `mlp` projector (fc1, GELU, fc2) as `multi_modal_projector`
  (linear_1, GELU, linear_2).
- language model: a Llama (svlm/export/parts.py).
"""

from __future__ import annotations

from svlm.errors import ConfigError
from svlm.export.parts import llm_config, lm_config_from, lm_name, vision_from_processor
from svlm.models.projector import ProjectorConfig
from svlm.models.vlm import VLM, VLMConfig

MODEL_TYPE, NAME = "llava", "LLaVA"


def problems(cfg: VLMConfig) -> list[str]:
    """What LLaVA cannot express of a model with an mlp projector without a norm."""
    v, p = cfg.vision, cfg.projector
    found = []
    if v.feature_layer is None:
        found.append(
            "vision features taken after DINOv2's final LayerNorm (model.vision.feature_layer=null) with a "
            "projector without a norm (model.projector.norm=false): LLaVA reads a layer's output before that "
            "norm; train with model.vision.feature_layer=-1, or with model.projector.norm=true (InternVL format)"
        )
    if p.compress == "pixel_shuffle":
        found.append(
            "pixel_shuffle token compression (model.projector.compress=pixel_shuffle) without the projector's "
            "LayerNorm (model.projector.norm=false): LLaVA gives one visual token per patch, and InternVL's "
            "projector, which merges patches, always normalises; use model.projector.norm=true"
        )
    return found


def hf_name(name: str) -> str | None:
    """Our parameter name -> LlavaForConditionalGeneration's."""
    head, _, rest = name.partition(".")
    if head == "vision":
        return "model.vision_tower." + rest.removeprefix("dinov2.")
    if head == "projector":
        return "model.multi_modal_projector." + rest.replace("fc1.", "linear_1.").replace("fc2.", "linear_2.")
    if head == "lm":
        return lm_name(rest)
    if head == "object_head":  # a training aid (svlm/models/object_head.py): no counterpart
        return None
    raise KeyError(f"no LLaVA name for {name}")


def export_weights(model: VLM) -> dict:
    """Our weights under LLaVA's names."""
    return {hf_name(k): v for k, v in model.state_dict().items() if hf_name(k) is not None}


def hf_config(model: VLM, tokenizer):
    from transformers import LlavaConfig

    cfg = model.cfg
    return LlavaConfig(
        vision_config=model.vision.dinov2.config.to_dict(),
        text_config=llm_config(model, tokenizer).to_dict(),
        image_token_index=cfg.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",  # exact (erf) GELU, as F.gelu
        vision_feature_select_strategy="full" if cfg.vision.use_cls else "default",
        vision_feature_layer=cfg.vision.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=cfg.lm.tie_embeddings,
    )


def model_class():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def token_patch(model: VLM) -> int:
    """The pixels on a side of one visual token: one patch."""
    return model.vision.dinov2.config.patch_size


def vlm_config(config, image_processor) -> tuple[VLMConfig, object]:
    """Our config for a LLaVA config an export could have written, and the
    DINOv2 config of its tower."""
    vc = config.vision_config
    problems = []
    if vc.model_type != "dinov2":
        problems.append(f"a {vc.model_type} vision tower: only DINOv2 is ours")
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"several vision feature layers ({config.vision_feature_layer})")
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        problems.append("a projector other than Linear (with bias), exact GELU, Linear")
    if problems:
        raise ConfigError("cannot import this LLaVA folder: " + "; ".join(problems))
    vision = vision_from_processor(
        image_processor,
        "LLaVA",
        patch_size=vc.patch_size,
        hidden_size=vc.hidden_size,
        num_layers=vc.num_hidden_layers,
        num_heads=vc.num_attention_heads,
        mlp_ratio=int(vc.mlp_ratio),
        use_cls=config.vision_feature_select_strategy == "full",
        feature_layer=config.vision_feature_layer,
    )
    lm = lm_config_from(config.text_config, bool(config.tie_word_embeddings), "LLaVA")
    projector = ProjectorConfig(kind="mlp", compress="none", norm=False)
    return VLMConfig(vision=vision, projector=projector, lm=lm, image_token_id=config.image_token_id), vc
