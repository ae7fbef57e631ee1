"""transformers' InternVL format (`InternVLForConditionalGeneration`), for
models whose projector normalises, optionally after merging patches: the
default `tiny` and `base` models.

- vision: DINOv2 is a ViT that InternVL's own vision tower
  (`InternVLVisionModel`) expresses exactly: CLS + patches with absolute
  positions, pre-norm blocks with layer scale (lambda_1, lambda_2), GELU MLP,
  a final LayerNorm. The weights are renamed, and the position embeddings are
  resampled once, with DINOv2's own interpolation, to `model.vision.image_size`,
  so nothing is interpolated at run time. InternVL's `vision_feature_layer`
  -1 reads `last_hidden_state`, after the final LayerNorm: our
  `feature_layer=null`; our index k (before the norm) becomes the same
  layer's non-negative index. Strategy "default" drops the CLS token.
- projector: InternVL's pixel shuffle merges each r x r block of patches in
  the order ours does (row-major blocks; channels ordered (row in block,
  column in block, feature)), then LayerNorm, Linear, GELU, Linear: our `mlp`
  projector with `norm=true` and `compress=pixel_shuffle` (or `none`: r = 1).
- language model: a Llama (svlm/export/parts.py).
- processor: LLaVA's (svlm/export/parts.py), whose `<image>` expands to the
  visual tokens alone; InternVL's own processor wraps them in `<img>`...
  `</img>` tokens and tiles images, which these models were not trained with.
"""

from __future__ import annotations

import torch

from svlm.errors import ConfigError
from svlm.export.parts import llm_config, lm_config_from, lm_name, vision_from_processor
from svlm.models.projector import ProjectorConfig
from svlm.models.vlm import VLM, VLMConfig

MODEL_TYPE, NAME = "internvl", "InternVL"

# DINOv2's layer parts -> InternVL's vision layer parts.
_VISION_PARTS = {
    "norm1.": "layernorm_before.",
    "norm2.": "layernorm_after.",
    "attention.o_proj.": "attention.projection_layer.",
    "layer_scale1.lambda1": "lambda_1",
    "layer_scale2.lambda1": "lambda_2",
}
_PROJECTOR_PARTS = {"norm.": "layer_norm.", "fc1.": "linear_1.", "fc2.": "linear_2."}


def _shuffle_is_exact(r: int) -> bool:
    """InternVL computes the merge in floats (downsample_ratio = 1/r): true when
    that arithmetic gives r's integers back for every grid and width."""
    s = 1 / r
    grids = all(int(g * s) == g // r for g in range(r, 4097, r))
    widths = all(int(c / s) == c * r and int(c / s**2) == c * r * r for c in range(1, 8193))
    return int(1 / s) == r and grids and widths


def problems(cfg: VLMConfig) -> list[str]:
    """What InternVL cannot express of a model with an mlp projector with a norm."""
    v, p = cfg.vision, cfg.projector
    found = []
    if v.use_cls:
        found.append(
            "the CLS token among the visual tokens (model.vision.use_cls=true) with the projector's LayerNorm "
            "(model.projector.norm=true): InternVL's projector reads the patch grid only; use "
            "model.vision.use_cls=false"
        )
    if p.compress == "pixel_shuffle" and not _shuffle_is_exact(p.factor):
        found.append(
            f"a pixel shuffle by {p.factor} (model.projector.factor={p.factor}): InternVL's merge computes with "
            f"1/{p.factor} in floating point, which does not come out exact; use a factor among "
            f"{', '.join(str(r) for r in range(2, 9) if _shuffle_is_exact(r))}"
        )
    return found


def hf_name(name: str) -> str | None:
    """Our parameter name -> InternVLForConditionalGeneration's (None: no counterpart)."""
    head, _, rest = name.partition(".")
    if head == "object_head":  # a training aid (svlm/models/object_head.py): no counterpart
        return None
    if head == "vision":
        rest = rest.removeprefix("dinov2.")
        if rest == "embeddings.mask_token":  # only for masked-image pretraining: unused here
            return None
        for ours, theirs in _VISION_PARTS.items():
            rest = rest.replace(ours, theirs)
        return "model.vision_tower." + rest
    if head == "projector":
        for ours, theirs in _PROJECTOR_PARTS.items():
            rest = rest.replace(ours, theirs)
        return "model.multi_modal_projector." + rest
    if head == "lm":
        return lm_name(rest)
    raise KeyError(f"no InternVL name for {name}")


def _feature_layer(cfg: VLMConfig) -> int:
    k, n = cfg.vision.feature_layer, cfg.vision.num_layers
    return -1 if k is None else k % (n + 1)  # -1: last_hidden_state; else hidden_states[k], k >= 0


def hf_config(model: VLM, tokenizer):
    from transformers import InternVLConfig, InternVLVisionConfig

    cfg, dc = model.cfg, model.vision.dinov2.config
    if getattr(dc, "use_swiglu_ffn", False):
        raise ConfigError("a DINOv2 with a SwiGLU feed-forward (model.vision.path): InternVL's vision MLP is GELU")
    vision = InternVLVisionConfig(
        hidden_size=dc.hidden_size,
        num_hidden_layers=dc.num_hidden_layers,
        num_attention_heads=dc.num_attention_heads,
        attention_bias=dc.qkv_bias,
        use_qk_norm=False,
        intermediate_size=int(dc.hidden_size * dc.mlp_ratio),
        hidden_act=dc.hidden_act,
        layer_norm_eps=dc.layer_norm_eps,
        image_size=cfg.vision.image_size,  # position embeddings resampled to it (see export_weights)
        patch_size=dc.patch_size,
        use_mask_token=False,
        use_absolute_position_embeddings=True,
        use_mean_pooling=False,  # the final LayerNorm, as DINOv2
        norm_type="layer_norm",
    )
    r = cfg.projector.factor if cfg.projector.compress == "pixel_shuffle" else 1
    return InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=llm_config(model, tokenizer).to_dict(),
        image_token_id=cfg.image_token_id,
        image_seq_length=model.num_image_tokens,
        downsample_ratio=1 / r,
        projector_hidden_act="gelu",  # exact (erf) GELU, as F.gelu
        vision_feature_layer=_feature_layer(cfg),
        vision_feature_select_strategy="default",
        tie_word_embeddings=cfg.lm.tie_embeddings,
    )


def export_weights(model: VLM) -> dict[str, torch.Tensor]:
    """Our weights under InternVL's names, the position embeddings resampled to
    the image size as DINOv2 does at every forward pass."""
    weights = {hf_name(k): v for k, v in model.state_dict().items() if hf_name(k) is not None}
    embeddings, size = model.vision.dinov2.embeddings, model.cfg.vision.image_size
    grid = size // model.vision.dinov2.config.patch_size
    dummy = torch.zeros(1, 1 + grid * grid, model.vision.hidden_size)
    weights["model.vision_tower.embeddings.position_embeddings"] = embeddings.interpolate_pos_encoding(
        dummy, size, size
    ).detach()
    return weights


def model_class():
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration


def token_patch(model: VLM) -> int:
    """The pixels on a side of one visual token: a block of r x r patches."""
    r = model.cfg.projector.factor if model.cfg.projector.compress == "pixel_shuffle" else 1
    return model.vision.dinov2.config.patch_size * r


def vlm_config(config, image_processor) -> tuple[VLMConfig, object]:
    """Our config for an InternVL config an export could have written, and the
    DINOv2 config of its tower."""
    from transformers import Dinov2Config

    vc = config.vision_config
    problems = []
    if vc.norm_type != "layer_norm" or vc.use_qk_norm or vc.use_mean_pooling or vc.hidden_act != "gelu":
        problems.append("a vision tower that is not a DINOv2-like ViT (layer norms, no q/k norm, GELU, final norm)")
    if vc.intermediate_size % vc.hidden_size or not vc.use_absolute_position_embeddings:
        problems.append("a vision MLP width that is not a multiple of its width, or no absolute positions")
    if not isinstance(config.vision_feature_layer, int) or config.vision_feature_select_strategy != "default":
        problems.append("several vision feature layers, or the CLS token kept")
    if config.projector_hidden_act != "gelu" or round(1 / config.downsample_ratio) * config.downsample_ratio != 1:
        problems.append("a projector other than pixel shuffle by a whole factor, LayerNorm, Linear, GELU, Linear")
    if problems:
        raise ConfigError("cannot import this InternVL folder: " + "; ".join(problems))
    image_size, patch = (v[0] if isinstance(v, (list, tuple)) else v for v in (vc.image_size, vc.patch_size))
    n, k = vc.num_hidden_layers, config.vision_feature_layer
    dinov2 = Dinov2Config(
        hidden_size=vc.hidden_size,
        num_hidden_layers=n,
        num_attention_heads=vc.num_attention_heads,
        mlp_ratio=vc.intermediate_size // vc.hidden_size,
        patch_size=patch,
        image_size=image_size,
        layer_norm_eps=vc.layer_norm_eps,
        qkv_bias=vc.attention_bias,
    )
    vision = vision_from_processor(
        image_processor,
        "InternVL",
        patch_size=patch,
        hidden_size=vc.hidden_size,
        num_layers=n,
        num_heads=vc.num_attention_heads,
        mlp_ratio=vc.intermediate_size // vc.hidden_size,
        feature_layer=None if k == -1 else (k - (n + 1) if k > 0 else k),
    )
    r = round(1 / config.downsample_ratio)
    merged = dict(compress="pixel_shuffle", factor=r) if r > 1 else dict(compress="none")
    projector = ProjectorConfig(kind="mlp", norm=True, **merged)
    lm = lm_config_from(config.text_config, bool(config.tie_word_embeddings), "InternVL")
    return VLMConfig(vision=vision, projector=projector, lm=lm, image_token_id=config.image_token_id), dinov2
