"""Pretrained language models from transformers checkpoint folders, loaded into
our own decoder (svlm/models/language_model.py), the way nanoGPT's
`GPT.from_pretrained` loads GPT-2: the shape is read from config.json, the
weights from the safetensors files, tensor by tensor, into our modules. No
transformers model object is built on the way, and the model is first made on
the meta device, so a checkpoint is in memory once.

Families (config.json `architectures`):
- LlamaForCausalLM: Llama 2 and 3.x (with `rope_type: llama3`), SmolLM/SmolLM2, TinyLlama;
- Qwen2ForCausalLM: Qwen2 and Qwen2.5 (biases on q/k/v);
- Qwen3ForCausalLM: per-head RMSNorm of queries and keys, its own head size;
- MistralForCausalLM: where its sliding window does not bind (none, or at
  least `max_seq_len`).

Our decoder rotates (first half, second half) pairs, transformers'
`rotate_half` convention, so q_proj and k_proj load as they are.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from svlm.errors import ConfigError
from svlm.models.language_model import LanguageModel, LMConfig
from svlm.models.rope import SCALINGS, rope_tables

FAMILIES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
MODEL_TYPES = dict(zip(("llama", "qwen2", "qwen3", "mistral"), FAMILIES))  # config model_type -> family
# LMConfig fields -> their config.json names, in every family.
FIELDS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "d_ff": "intermediate_size",
    "norm_eps": "rms_norm_eps",
}
# Our block's parts -> theirs (layers.<i>.<part>.<rest>).
PARTS = {"attn_norm": "input_layernorm", "attn": "self_attn", "mlp_norm": "post_attention_layernorm", "mlp": "mlp"}


def read_config(folder: str | Path) -> dict:
    """config.json of a causal-LM folder of a supported family, or a ConfigError naming the folder."""
    folder = Path(folder)
    file = folder / "config.json"
    if not file.is_file():
        raise ConfigError(f"model.lm.path={folder}: no config.json there (a transformers causal-LM folder is expected)")
    try:
        config = json.loads(file.read_text())
    except ValueError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    family = (config.get("architectures") or ["?"])[0]
    if family not in FAMILIES:
        raise ConfigError(
            f"model.lm.path={folder}: {family} (config.json architectures) is not a supported causal LM; "
            f"supported: {', '.join(FAMILIES)}"
        )
    return config


def rope_of(config: dict, where: str) -> tuple[float, dict | None]:
    """(theta, scaling) from either layout: transformers 5's `rope_parameters`,
    or the older `rope_theta` + `rope_scaling` of most hub folders."""
    params = dict(config.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in SCALINGS:
        raise ConfigError(f"{where}: rope_scaling type {kind!r} is not supported (supported: {SCALINGS})")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"rope_type": kind, **{k: scaling[k] for k in keys}}


def lm_config(folder: str | Path, max_seq_len: int | None = None) -> LMConfig:
    """Our LMConfig for a checkpoint folder. `max_seq_len`: the longest sequence
    to run (default: the folder's max_position_embeddings)."""
    return lm_config_of(read_config(folder), f"model.lm.path={folder}", max_seq_len)


def problems_of(config: dict, family: str, max_seq_len: int) -> list[str]:
    """What our decoder cannot do of a causal LM's config."""
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']} (SwiGLU needs silu)")
    attention_bias, mlp_bias = bool(config.get("attention_bias")), bool(config.get("mlp_bias"))
    if attention_bias != mlp_bias or (attention_bias and family == "Qwen3ForCausalLM"):
        problems.append(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (biases go on every layer or none)")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={config['partial_rotary_factor']}")
    longest = config.get("max_position_embeddings", max_seq_len)
    if max_seq_len > longest:
        problems.append(f"model.lm.max_seq_len={max_seq_len} is longer than max_position_embeddings={longest}")
    window = config.get("sliding_window") if config.get("use_sliding_window", family == "MistralForCausalLM") else None
    if window is not None and window < max_seq_len:
        problems.append(f"its sliding window ({window} tokens) is shorter than model.lm.max_seq_len={max_seq_len}")
    return problems


def lm_config_of(config: dict, where: str, max_seq_len: int | None = None) -> LMConfig:
    """Our LMConfig for a causal LM's config (a config.json, or an exported VLM's
    text_config as a dict); `where` names it in errors."""
    family = (config.get("architectures") or [None])[0]
    family = family if family in FAMILIES else MODEL_TYPES.get(config.get("model_type"))
    if family is None:
        raise ConfigError(f"{where}: a {config.get('model_type')} language model; supported: {', '.join(FAMILIES)}")
    max_seq_len = max_seq_len or config.get("max_position_embeddings")
    problems = problems_of(config, family, max_seq_len)
    if problems:
        raise ConfigError(f"{where} ({family}): " + "; ".join(problems))
    theta, scaling = rope_of(config, where)
    head_size = config.get("head_dim")
    if head_size and head_size * config["num_attention_heads"] == config["hidden_size"]:
        head_size = None  # the usual size: left implicit, as in our own configs
    return LMConfig(
        **{ours: config[theirs] for ours, theirs in FIELDS.items() if config.get(theirs) is not None},
        max_seq_len=max_seq_len,
        rope_theta=theta,
        rope_scaling=scaling,
        head_size=head_size,
        bias=bool(config.get("attention_bias")),
        qkv_bias=True if family == "Qwen2ForCausalLM" else None,
        qk_norm=family == "Qwen3ForCausalLM",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def text_config(lm: LMConfig, **token_ids):
    """The transformers config of our language model (export): Qwen3's with q/k
    norms, Qwen2's with biases on q/k/v alone, Llama's otherwise."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if lm.qk_norm and (lm.bias or lm.qkv_bias):
        raise ConfigError("model.lm.qk_norm=true with biases has no transformers counterpart (Qwen3 has neither)")
    rope = {"rope_type": "default", "rope_theta": lm.rope_theta, **(lm.rope_scaling or {})}
    common = {theirs: getattr(lm, ours) for ours, theirs in FIELDS.items()}
    common.update(max_position_embeddings=lm.max_seq_len, head_dim=lm.head_dim, hidden_act="silu",
                  rope_parameters=rope, tie_word_embeddings=lm.tie_embeddings, **token_ids)  # fmt: skip
    if lm.qk_norm:
        return Qwen3Config(**common, attention_bias=False)
    if lm.qkv_bias and not lm.bias:
        return Qwen2Config(**common, use_sliding_window=False)
    return LlamaConfig(**common, attention_bias=lm.bias, mlp_bias=lm.bias)


def their_name(ours: str) -> str:
    """Our LanguageModel parameter name -> its name in a transformers causal LM."""
    if ours == "lm_head.weight":
        return ours
    parts = ours.split(".")
    if parts[0] == "layers":  # layers.<i>.<part>.<rest>
        parts[2] = PARTS[parts[2]]
    return "model." + ".".join(parts)


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (sharded with an index, or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ConfigError(f"model.lm.path={folder}: shard {missing[0]} named in {index.name} is missing")
        return {name: folder / f for name, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model.lm.path={folder}: no *.safetensors weights (pytorch_model.bin is not read)")
    where = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    return where


def load_weights(model: LanguageModel, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Every tensor of `folder` into `model` (made on the meta device or not), in `dtype`."""
    folder = Path(folder)
    where = weight_files(folder)
    tied = model.cfg.tie_embeddings
    wanted = {n: p for n, p in model.state_dict().items() if not (tied and n == "lm_head.weight")}
    missing = [their_name(n) for n in wanted if their_name(n) not in where]
    if missing:
        raise ConfigError(f"model.lm.path={folder}: the weights lack {missing[0]} ({len(missing)} tensors missing)")
    loaded = {}
    for file in sorted(set(where[their_name(n)] for n in wanted)):  # each file opened once
        with safe_open(str(file), "pt") as f:
            for ours, param in wanted.items():
                name = their_name(ours)
                if where[name] != file:
                    continue
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ConfigError(f"model.lm.path={folder}: {name} has shape {tuple(tensor.shape)}, "
                                      f"its config.json says {tuple(param.shape)}")  # fmt: skip
                loaded[ours] = tensor.to(dtype)
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    cfg = model.cfg
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
    model.rope_cos, model.rope_sin = cos, sin  # the buffers are not in the checkpoint


def from_pretrained(
    folder: str | Path, max_seq_len: int | None = None, dtype: torch.dtype = torch.float32, cfg: LMConfig | None = None
) -> LanguageModel:
    """Our LanguageModel with a checkpoint folder's shape (or `cfg`, already
    synced with it) and weights."""
    cfg = cfg or lm_config(folder, max_seq_len)
    with torch.device("meta"):
        model = LanguageModel(cfg)
    load_weights(model, folder, dtype)
    return model


def grow_vocab(model: LanguageModel, vocab_size: int) -> None:
    """Make room for tokens added to a pretrained tokenizer (the image placeholder):
    each new row of the embedding, and of an untied head, starts at the mean of
    the existing rows, so the new tokens start where the others are on average."""
    old = model.cfg.vocab_size
    if vocab_size < old:
        raise ConfigError(f"a tokenizer of {vocab_size} tokens is smaller than the language model's {old}")
    if vocab_size == old:
        return

    def grown(weight: torch.Tensor) -> nn.Parameter:  # (old, d) -> (vocab_size, d)
        extra = weight.detach().mean(0, keepdim=True).expand(vocab_size - old, -1)
        return nn.Parameter(torch.cat([weight.detach(), extra]), requires_grad=weight.requires_grad)

    model.embed_tokens.weight = grown(model.embed_tokens.weight)
    model.embed_tokens.num_embeddings = vocab_size
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.lm_head.weight = grown(model.lm_head.weight)
    model.lm_head.out_features = vocab_size
    model.cfg.vocab_size = vocab_size


# What a checkpoint decides of an LMConfig; a config that sets one of them to
# something else than LMConfig's default contradicts the folder unless equal.
SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "norm_eps", "rope_theta", "rope_scaling",
              "head_size", "bias", "qkv_bias", "qk_norm", "tie_embeddings", "norm", "pos", "mlp", "d_in", "rank")  # fmt: skip


def sync_with_checkpoint(lm: LMConfig) -> LMConfig:
    """`lm` with the shape of its `path`'s checkpoint (its max_seq_len and dropout
    kept), read when a model is built or planned, as the vision encoder's is. A
    shape key set away from its default to another value than the folder's is a
    ConfigError naming both. Idempotent."""
    theirs = lm_config(lm.path, lm.max_seq_len)
    default = {k: getattr(LMConfig(), k) for k in SHAPE_KEYS}
    # Left unset, these follow other keys: the MLP width the width, key/value heads the heads.
    default["d_ff"] = LMConfig(d_model=lm.d_model, mlp=lm.mlp).d_ff
    default["n_kv_heads"] = lm.n_heads
    clashes = [
        f"model.lm.{k}={getattr(lm, k)!r} but {lm.path}/config.json says {getattr(theirs, k)!r}"
        for k in SHAPE_KEYS
        if getattr(lm, k) != default[k] and getattr(lm, k) != getattr(theirs, k)
    ]
    if clashes:
        raise ConfigError("; ".join(clashes) + " (leave the shape to the folder: a model option with only lm.path)")
    return dataclasses.replace(theirs, path=lm.path, dropout=lm.dropout)


def eos_ids(folder: str | Path) -> list[int]:
    """The end-of-text ids generation stops at: generation_config.json's
    eos_token_id (one or a list), else config.json's; [] when neither says."""
    for name in ("generation_config.json", "config.json"):
        file = Path(folder) / name
        if file.is_file():
            try:
                eos = json.loads(file.read_text()).get("eos_token_id")
            except ValueError as e:
                raise ConfigError(f"{file}: not valid JSON ({e})") from None
            if eos is not None:
                return [int(i) for i in (eos if isinstance(eos, list) else [eos])]
    return []


def pretrained_lm(lm: LMConfig, vocab_size: int, dtype: torch.dtype = torch.float32) -> LanguageModel:
    """The language model of `lm.path`, with room for a tokenizer of
    `vocab_size` tokens (grow_vocab)."""
    model = from_pretrained(lm.path, dtype=dtype, cfg=sync_with_checkpoint(lm))
    if vocab_size > model.cfg.vocab_size:
        grow_vocab(model, vocab_size)
    return model
