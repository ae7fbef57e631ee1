"""What every transformers format of an export shares: the language model as a
Llama, Qwen2 or Qwen3 (svlm/models/pretrained.py maps it), the processor (tokenizer, chat template, image processor), the
generation settings, and which folder an export may replace.

Our decoder is a Llama in all but names: RMSNorm, SwiGLU, GQA, tied or untied
head (with q/k/v biases a Qwen2, with q/k norms a Qwen3), and RoPE that rotates (first half, second half) pairs, which is
transformers' `rotate_half` convention, so q_proj and k_proj need no
permutation (that permutation is for Meta's interleaved checkpoints).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from svlm.data.chat import IMAGE_TOKEN, ChatEncoder, chat_template, with_our_content
from svlm.errors import ConfigError
from svlm.models.language_model import LMConfig
from svlm.models.pretrained import lm_config_of, text_config, their_name
from svlm.models.vision import VisionConfig
from svlm.models.vlm import VLM


def lm_problems(lm: LMConfig) -> list[str]:
    """What Llama, Qwen2 and Qwen3 cannot express of our language model, with the config keys."""
    problems = []
    if lm.d_in is not None:
        problems.append(
            f"the wide text embedding with its low-rank reducer (model.lm.d_in={lm.d_in}, "
            f"model.lm.rank={lm.rank}): Llama embeds at its width; use model.lm.d_in=null model.lm.rank=null"
        )
    if lm.norm != "rmsnorm":
        problems.append(f"{lm.norm} in the language model (model.lm.norm={lm.norm}): Llama uses RMSNorm")
    if lm.pos != "rope":
        problems.append(f"{lm.pos} positions (model.lm.pos={lm.pos}): Llama uses RoPE")
    if lm.mlp == "moe":
        problems.append("the mixture of experts (model.lm.mlp=moe): Llama's feed-forward is one SwiGLU")
    elif lm.mlp != "swiglu":
        problems.append(f"the {lm.mlp} feed-forward (model.lm.mlp={lm.mlp}): Llama's is SwiGLU")
    if lm.qk_norm and (lm.bias or lm.qkv_bias):
        problems.append("q/k norms with biases (model.lm.qk_norm=true, model.lm.bias/qkv_bias): Qwen3 has no biases")
    if lm.bias and lm.qkv_bias is False:
        problems.append("biases everywhere but on q/k/v (model.lm.bias=true, model.lm.qkv_bias=false)")
    return problems


def lm_name(rest: str) -> str:
    """Our `lm.<rest>` parameter -> its name in a transformers VLM with our LM inside."""
    theirs = their_name(rest)
    return theirs if theirs == "lm_head.weight" else "model.language_model." + theirs.removeprefix("model.")


def llm_config(model: VLM, tokenizer):
    """The language model's transformers config: Llama, Qwen2 or Qwen3 (models/pretrained.py),
    with the ids our generation stops at as its eos ids."""
    stops = ChatEncoder.for_model(tokenizer, model).stop_ids
    return text_config(
        model.cfg.lm,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops[0] if len(stops) == 1 else stops,
        pad_token_id=tokenizer.pad_token_id,
    )


def lm_config_from(tc, tie_embeddings: bool, what: str) -> LMConfig:
    """Our LMConfig for the `text_config` of an exported folder."""
    config = {**tc.to_dict(), "tie_word_embeddings": tie_embeddings}
    return lm_config_of(config, f"cannot import this {what} folder's language model")


def generation_config(text_config):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
        do_sample=False,
    )


def image_processor(vision: VisionConfig):
    """A transformers image processor doing what svlm.models.vision.ImageProcessor does."""
    from transformers import BitImageProcessorPil  # DINOv2's own processor class

    return BitImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"height": vision.image_size, "width": vision.image_size},
        resample=3,  # PIL bicubic
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(vision.image_mean),
        image_std=list(vision.image_std),
    )


def processor(model: VLM, tokenizer, token_patch: int, strategy: str):
    """LLaVA's processor: one <image> becomes (image_size / token_patch)^2 image
    tokens (+1 with strategy "full"), with no markers around them; the chat
    template formats as the model folder does: ours (svlm.data.chat.chat_template),
    or the tokenizer's own reading messages as ours does (with_our_content)."""
    from transformers import LlavaProcessor

    placement = model.cfg.image_placement
    if model.cfg.chat_format == "ours":
        template = chat_template(placement)
    else:
        template = with_our_content(tokenizer.chat_template, placement)
    tokenizer = copy.deepcopy(tokenizer)  # the caller's keeps its own
    tokenizer.chat_template = template
    # Harnesses stop generating at the tokenizer's eos (lmms-eval's llava_hf passes it to generate):
    # make it the end of a turn, where our generation stops.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ChatEncoder.for_model(tokenizer, model).end_id)
    return LlavaProcessor(
        image_processor=image_processor(model.cfg.vision),
        tokenizer=tokenizer,
        patch_size=token_patch,
        vision_feature_select_strategy=strategy,
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # DINOv2's CLS token
    )


def vision_from_processor(ip, what: str, **fields) -> VisionConfig:
    """Our VisionConfig from an exported image processor and the tower's `fields`."""
    square = ip.do_resize and ip.size.get("height") is not None and ip.size.get("height") == ip.size.get("width")
    if not square or ip.do_center_crop or getattr(ip, "do_pad", False) or ip.resample != 3:
        raise ConfigError(
            f"cannot import this {what} folder: its image processor does more than a bicubic resize to a square"
        )
    return VisionConfig(
        path=None,
        image_size=ip.size["height"],
        image_mean=[float(x) for x in ip.image_mean],
        image_std=[float(x) for x in ip.image_std],
        **fields,
    )


EXPORT_TYPES = ("llava", "internvl")


def check_out_folder(folder: Path) -> None:
    """An export replaces an earlier export, never a folder holding anything else."""
    if folder.exists() and any(folder.iterdir()):
        config = folder / "config.json"
        earlier = config.is_file() and json.loads(config.read_text()).get("model_type") in EXPORT_TYPES
        if not earlier:
            raise ConfigError(f"out={str(folder)!r} exists and is not an earlier export: choose another folder")
