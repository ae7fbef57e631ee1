"""Export a model to transformers' LLaVA format, and import it back.

    python -m svlm.export ckpt=<model or run folder> out=<folder>
    python -m svlm.export from_llava=<exported folder> out=<model folder>

The exported folder loads with plain transformers, no code from here:

    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)

What maps to what:
- vision: our Dinov2Model as LLaVA's `vision_tower` (its Dinov2Config is the
  `vision_config`). LLaVA reads `hidden_states[vision_feature_layer]`, a layer's
  output BEFORE DINOv2's final LayerNorm, so only models trained with
  `model.vision.feature_layer` set (e.g. -1) are expressible. Strategy
  "default" drops the CLS token (`model.vision.use_cls=false`), "full" keeps
  it (`use_cls=true`).
- projector: our `mlp` projector (Linear, GELU, Linear) as LLaVA's
  `multi_modal_projector` (linear_1, GELU, linear_2).
- language model: a Llama (LlamaConfig `text_config`): RMSNorm, SwiGLU, GQA,
  tied or untied lm head. Our RoPE rotates (first half, second half) pairs,
  which is Llama's `rotate_half` convention in transformers, so q_proj and
  k_proj need no permutation (that permutation is for Meta's interleaved
  checkpoints).
- processor: our tokenizer (tokenizer.json), the chat template (plain-string
  content as in svlm/data/chat.py, or LLaVA's list of {"type": "image"} and
  {"type": "text"} parts), and an image processor that does what our
  ImageProcessor does: RGB, bicubic resize to a square of image_size, /255,
  our mean and std.

Anything else has no LLaVA counterpart and is refused with a ConfigError that
names the part and its config key (see `export_problems`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svlm.checkpoint import load_model, replace_folder, resolve_model, save_model
from svlm.config import PathsConfig, build
from svlm.data.chat import END_TOKEN, IMAGE_TOKEN, PAD_TOKEN
from svlm.errors import ConfigError
from svlm.models.language_model import LMConfig
from svlm.models.projector import ProjectorConfig
from svlm.models.vision import VisionConfig
from svlm.models.vlm import VLM, VLMConfig
from svlm.tokenizer import load_tokenizer

# The chat template of svlm/data/chat.py, also accepting LLaVA-style content
# (a list of {"type": "image"} / {"type": "text", "text": ...} parts; an image
# part becomes "<image>\n", as ChatEncoder.prompt puts it).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Our block's parts -> Llama's (lm.layers.<i>.<part>.<rest>).
_LM_PARTS = {"attn_norm": "input_layernorm", "attn": "self_attn", "mlp_norm": "post_attention_layernorm", "mlp": "mlp"}


@dataclass
class ExportConfig:
    ckpt: str | None = None  # a model or run folder; None: the newest finished model under paths.outputs
    out: str | None = None  # the folder to write
    from_llava: str | None = None  # import instead: an exported LLaVA folder -> our model folder `out`
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if self.out is None:
            raise ConfigError("out=<folder> is required: where to write the exported model")
        if self.from_llava is not None and self.ckpt is not None:
            raise ConfigError("ckpt and from_llava both set: export a model (ckpt=) or import one (from_llava=)")


# ------------------------------------------------------------------- the checks


def export_problems(cfg: VLMConfig, num_register_tokens: int = 0) -> list[str]:
    """Every part of `cfg` that LLaVA + Llama cannot express, with its config key."""
    v, p, lm = cfg.vision, cfg.projector, cfg.lm
    problems = []
    if v.feature_layer is None:
        problems.append(
            "vision features taken after DINOv2's final LayerNorm (model.vision.feature_layer=null): "
            "LLaVA reads a layer's output before it; train with model.vision.feature_layer=-1"
        )
    if num_register_tokens:
        problems.append(
            f"a DINOv2 with {num_register_tokens} register tokens (model.vision.path): LLaVA's feature "
            "selection keeps or drops only the first token"
        )
    if p.kind != "mlp":
        problems.append(
            f"the {p.kind} projector (model.projector.kind={p.kind}): LLaVA's projector is Linear, GELU, "
            "Linear on every patch; use model.projector.kind=mlp"
        )
    else:
        if p.compress != "none":
            problems.append(
                f"{p.compress} token compression (model.projector.compress={p.compress}): LLaVA gives "
                "one visual token per patch; use model.projector.compress=none"
            )
        if p.norm:
            problems.append(
                "the projector's LayerNorm (model.projector.norm=true): LLaVA's projector has no norm; "
                "use model.projector.norm=false"
            )
        if p.hidden is not None and p.hidden != lm.d_model:
            problems.append(
                f"a projector hidden width of {p.hidden} (model.projector.hidden): LLaVA's is the "
                f"language model's width ({lm.d_model}); use model.projector.hidden=null"
            )
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
    return problems


def check_exportable(cfg: VLMConfig, num_register_tokens: int = 0) -> None:
    problems = export_problems(cfg, num_register_tokens)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"this model cannot be exported to transformers' LLaVA format:\n{lines}")


# --------------------------------------------------------------- weight names


def llava_name(name: str) -> str:
    """Our parameter name -> LlavaForConditionalGeneration's."""
    head, _, rest = name.partition(".")
    if head == "vision":
        return "model.vision_tower." + rest.removeprefix("dinov2.")
    if head == "projector":
        return "model.multi_modal_projector." + rest.replace("fc1.", "linear_1.").replace("fc2.", "linear_2.")
    if head == "lm":
        if rest == "lm_head.weight":
            return rest
        parts = rest.split(".")
        if parts[0] == "layers":  # layers.<i>.<part>.<rest>
            parts[2] = _LM_PARTS[parts[2]]
        return "model.language_model." + ".".join(parts)
    raise KeyError(f"no LLaVA name for {name}")


# ----------------------------------------------------------------- the configs


def llava_config(model: VLM, tokenizer):
    from transformers import LlamaConfig, LlavaConfig

    cfg, lm = model.cfg, model.cfg.lm
    text = LlamaConfig(
        vocab_size=lm.vocab_size,
        hidden_size=lm.d_model,
        intermediate_size=lm.d_ff,
        num_hidden_layers=lm.n_layers,
        num_attention_heads=lm.n_heads,
        num_key_value_heads=lm.n_kv_heads,
        head_dim=lm.head_dim,
        hidden_act="silu",
        max_position_embeddings=lm.max_seq_len,
        rms_norm_eps=lm.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta},
        attention_bias=lm.bias,
        mlp_bias=lm.bias,
        tie_word_embeddings=lm.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(END_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )
    return LlavaConfig(
        vision_config=model.vision.dinov2.config.to_dict(),
        text_config=text.to_dict(),
        image_token_index=cfg.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",  # exact (erf) GELU, as F.gelu
        vision_feature_select_strategy="full" if cfg.vision.use_cls else "default",
        vision_feature_layer=cfg.vision.feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=lm.tie_embeddings,
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


# ---------------------------------------------------------------------- export


def export_llava(model: VLM, tokenizer, out: str | os.PathLike) -> Path:
    """Write `model` and its processor as a LLaVA folder; returns the folder."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

    check_exportable(model.cfg, model.vision.num_registers)
    config = llava_config(model, tokenizer)
    llava = LlavaForConditionalGeneration(config)
    ours = {llava_name(k): v for k, v in model.state_dict().items()}
    theirs = llava.state_dict()
    if set(ours) != set(theirs):
        raise RuntimeError(
            f"weight names differ: only ours {sorted(set(ours) - set(theirs))[:5]}, "
            f"only LLaVA's {sorted(set(theirs) - set(ours))[:5]}"
        )
    llava.load_state_dict(ours, strict=True)
    llava.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    tokenizer = copy.deepcopy(tokenizer)  # the caller's keeps its own template
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=image_processor(model.cfg.vision),
        tokenizer=tokenizer,
        patch_size=model.vision.dinov2.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # DINOv2's CLS token
    )
    return _write_atomically(Path(out), lambda tmp: (llava.save_pretrained(tmp), processor.save_pretrained(tmp)))


def _write_atomically(folder: Path, write) -> Path:
    """Write into a temporary sibling, then move it into place; replaces an
    earlier export, never a folder holding anything else."""
    if folder.exists() and any(folder.iterdir()):
        config = folder / "config.json"
        earlier = config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"
        if not earlier:
            raise ConfigError(f"out={str(folder)!r} exists and is not an earlier LLaVA export: choose another folder")
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    return replace_folder(tmp, folder)


# ---------------------------------------------------------------------- import


def vlm_config_from_llava(config, image_processor) -> VLMConfig:
    """Our config for a LLaVA config that an export could have written."""
    vc, tc = config.vision_config, config.text_config
    problems = []
    if vc.model_type != "dinov2":
        problems.append(f"a {vc.model_type} vision tower: only DINOv2 is ours")
    if tc.model_type != "llama":
        problems.append(f"a {tc.model_type} language model: only Llama is expressible here")
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"several vision feature layers ({config.vision_feature_layer})")
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        problems.append("a projector other than Linear (with bias), exact GELU, Linear")
    if tc.model_type == "llama" and (tc.hidden_act != "silu" or tc.attention_bias != tc.mlp_bias):
        problems.append("a Llama whose activation is not SiLU or whose attention and MLP biases differ")
    rope = getattr(tc, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling ({rope.get('rope_type')})")
    if problems:
        raise ConfigError("cannot import this LLaVA folder: " + "; ".join(problems))
    ip = image_processor
    square = ip.do_resize and ip.size.get("height") is not None and ip.size.get("height") == ip.size.get("width")
    if not square or ip.do_center_crop or getattr(ip, "do_pad", False) or ip.resample != 3:
        raise ConfigError(
            "cannot import this LLaVA folder: its image processor does more than a bicubic resize to a square"
        )
    vision = VisionConfig(
        path=None,
        image_size=ip.size["height"],
        patch_size=vc.patch_size,
        hidden_size=vc.hidden_size,
        num_layers=vc.num_hidden_layers,
        num_heads=vc.num_attention_heads,
        mlp_ratio=int(vc.mlp_ratio),
        use_cls=config.vision_feature_select_strategy == "full",
        feature_layer=config.vision_feature_layer,
        image_mean=[float(x) for x in ip.image_mean],
        image_std=[float(x) for x in ip.image_std],
    )
    lm = LMConfig(
        vocab_size=tc.vocab_size,
        d_model=tc.hidden_size,
        n_layers=tc.num_hidden_layers,
        n_heads=tc.num_attention_heads,
        n_kv_heads=tc.num_key_value_heads,
        d_ff=tc.intermediate_size,
        max_seq_len=tc.max_position_embeddings,
        norm_eps=tc.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        bias=tc.attention_bias,
        tie_embeddings=bool(config.tie_word_embeddings),
    )
    if lm.head_dim != (tc.head_dim or tc.hidden_size // tc.num_attention_heads):
        raise ConfigError("cannot import this LLaVA folder: its head size is not hidden_size / heads")
    return VLMConfig(
        vision=vision,
        projector=ProjectorConfig(kind="mlp", compress="none", norm=False),
        lm=lm,
        image_token_id=config.image_token_id,
    )


def import_llava(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A LLaVA folder (as export_llava writes) -> our model folder `out`, for
    `ckpt=` of eval.py and infer.py, or to export again. (Not yet for
    `init_from=`: training checks the model-config key that svlm.json holds,
    and an imported model has none.)"""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"from_llava={str(folder)!r}: no config.json there")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type != "llava":
        raise ConfigError(f"from_llava={str(folder)!r} holds a {config.model_type!r} model, not llava")
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    cfg = vlm_config_from_llava(config, processor.image_processor)
    model = VLM(cfg, dinov2_config=config.vision_config)
    # transformers reads the weights (whatever key format the files use) into LLaVA's modules.
    weights = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).state_dict()
    state = {name: weights[llava_name(name)] for name in model.state_dict()}
    model.load_state_dict(state, strict=True)
    tokenizer = load_tokenizer(folder)
    if len(tokenizer) != cfg.lm.vocab_size:
        raise ConfigError(
            f"from_llava={str(folder)!r}: the tokenizer has {len(tokenizer)} tokens (with our chat tokens "
            f"{IMAGE_TOKEN}, {END_TOKEN}, ...) but the model's vocabulary is {cfg.lm.vocab_size}"
        )
    meta = {"stage": "import", "model": "llava-import", "source": str(folder.resolve()), "finished": True}
    return save_model(out, model, tokenizer, meta)


# ------------------------------------------------------------------------- CLI


def run(cfg: ExportConfig) -> Path:
    if cfg.from_llava is not None:
        return import_llava(cfg.from_llava, cfg.out)
    folder = resolve_model(cfg.ckpt, cfg.paths.outputs)
    model, tokenizer, _ = load_model(folder)
    with torch.no_grad():
        return export_llava(model, tokenizer, cfg.out)


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from svlm.cli import command

    def body(args: list[str]) -> int:
        out = run(build(ExportConfig, OmegaConf.to_container(OmegaConf.from_dotlist(args))))
        print(f"wrote {out}")
        return 0

    return command(__doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
