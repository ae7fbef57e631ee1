"""A decoder-only language model, written out in one file.

Read it top to bottom: configuration, normalisation, positions, attention,
feed-forward (SwiGLU, GELU or mixture of experts), the block, the model.

References:
- nanoGPT (Karpathy): the overall shape of a small GPT in one file.
- "RoFormer" (Su et al., 2021) for rotary position embeddings (RoPE; svlm/models/rope.py).
- Qwen2 (biases on q/k/v) and Qwen3 (RMSNorm of each head's queries and keys):
  the parts that real checkpoints of those families need (svlm/models/pretrained.py).
- "GQA" (Ainslie et al., 2023): fewer key/value heads than query heads.
- "GLU Variants Improve Transformer" (Shazeer, 2020) for SwiGLU.
- "Switch Transformers" (Fedus et al., 2021) for the load-balancing loss;
  DeepSeekMoE (Dai et al., 2024) for shared experts.

The model takes token ids or ready-made input embeddings (the VLM splices
visual tokens into them), so it knows nothing about images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from svlm.models.kv_cache import KVCache, LayerCache, Layout
from svlm.models.packed_attention import Packing
from svlm.models.rope import SCALINGS, apply_rope, rope_tables


@dataclass
class LMConfig:
    path: str | None = None  # a transformers causal-LM folder: its shape and weights (svlm/models/pretrained.py)
    vocab_size: int = 512
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    d_ff: int | None = None  # None: 4*d_model (gelu, moe) or 8/3*d_model (swiglu), rounded
    max_seq_len: int = 1024
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    pos: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1's {"rope_type": "llama3", "factor", ...}; None: plain RoPE
    head_size: int | None = None  # None: d_model / n_heads (Qwen3 sets its own)
    qkv_bias: bool | None = None  # biases on q/k/v (Qwen2); None: as `bias`
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before RoPE (Qwen3)
    mlp: Literal["swiglu", "gelu", "moe"] = "swiglu"
    bias: bool = False
    dropout: float = 0.0
    tie_embeddings: bool = True
    # Mixture of experts (mlp == "moe"): experts are GELU MLPs of width d_ff.
    moe_experts: int = 4
    moe_top_k: int = 2
    moe_shared_experts: int = 1
    moe_aux_coef: float = 0.01
    # The original SVLM's wide text embedding: tokens are embedded at width
    # d_in and a low-rank reducer (d_in -> rank -> d_model) maps the sequence
    # to d_model. None: embed directly at d_model.
    d_in: int | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_size is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.lm.d_model ({self.d_model}) must be divisible by model.lm.n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.lm.n_heads ({self.n_heads}) must be a multiple of model.lm.n_kv_heads ({self.n_kv_heads})"
            )
        if self.pos == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError("model.lm.pos=rope needs an even head size (d_model / n_heads, or head_size)")
        scaling = (self.rope_scaling or {}).get("rope_type")
        if self.rope_scaling is not None and scaling not in SCALINGS:
            raise ValueError(f"model.lm.rope_scaling: rope_type {scaling!r} is not supported (supported: {SCALINGS})")
        if self.mlp == "moe" and not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(
                f"model.lm.moe_top_k ({self.moe_top_k}) must be between 1 and model.lm.moe_experts ({self.moe_experts})"
            )
        if (self.d_in is None) != (self.rank is None):
            raise ValueError("model.lm.d_in and model.lm.rank go together: set both or neither")
        if self.d_ff is None:
            if self.mlp == "swiglu":
                self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
            else:
                self.d_ff = 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.d_model // self.n_heads

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings (and of the visual tokens spliced in)."""
        return self.d_in if self.d_in is not None else self.d_model


# ---------------------------------------------------------------- normalisation


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one call, bit for bit the lines below (tested)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        norm = x.float().pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()
        return (x.float() * norm).type_as(x) * self.weight


def make_norm(cfg: LMConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


# ---------------------------------------------------------------- fused inputs


def fuse(linears: list[nn.Module], column_major: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """For inference: linears that read the same input as one (sum of outputs,
    in) weight, one matmul instead of several (decoding_layout). Their own
    weights and biases become views into it: no second copy, and a load or
    an in-place update reaches both. None where one is not a plain nn.Linear
    (a LoRA layer, while training)."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    weight = torch.cat([m.weight.detach() for m in linears])  # (sum of outputs, in)
    if column_major:
        weight = weight.t().contiguous().t()
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
    at = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[at : at + n]
        if bias is not None:
            m.bias.data = bias[at : at + n]
        at += n
    return weight, bias


def fused_ready(fused: tuple[torch.Tensor, torch.Tensor | None] | None, first: nn.Linear) -> bool:
    """Whether a forward may use `fused`: without gradients (it is inference's
    alone), and still the storage of the first linear's weight (not left
    behind by a move to another device or dtype; compiled blocks are compiled
    after the fusion, and their graph cannot read a pointer)."""
    if fused is None or torch.is_grad_enabled():
        return False
    return torch.compiler.is_compiling() or fused[0].data_ptr() == first.weight.data_ptr()


# -------------------------------------------------------------------- attention


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.use_rope = cfg.pos == "rope"
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # q, k and v as one (fuse)

    def fuse(self, column_major: bool) -> None:
        """q, k and v in one matmul at inference (not with Qwen3's per-head norms)."""
        if self.q_norm is None:
            self.fused = fuse([self.q_proj, self.k_proj, self.v_proj], column_major)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: LayerCache | None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """rope: (cos, sin) of each query's position, (T, 1, hs) or (B, T, 1, hs);
        with this layer's cache, its plan says where this forward writes and
        which keys each query sees; with packing, which sample each token belongs to."""
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv_heads
        if fused_ready(self.fused, self.q_proj):  # inference: q and k come out side by side
            qk, v = F.linear(x, *self.fused).view(B, T, nh + 2 * nkv, self.head_dim).split([nh + nkv, nkv], dim=2)
        else:
            q = self.q_proj(x).view(B, T, nh, self.head_dim)  # (B, T, nh, hs)
            k = self.k_proj(x).view(B, T, nkv, self.head_dim)  # (B, T, nkv, hs)
            v = self.v_proj(x).view(B, T, nkv, self.head_dim)  # (B, T, nkv, hs)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            qk = torch.cat([q, k], dim=2)  # (B, T, nh + nkv, hs)
        if self.use_rope:  # queries and keys rotated in one go: half the small operations of a decode step
            qk = apply_rope(qk, *rope)
        q, k = qk.transpose(1, 2).split([nh, nkv], dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        v = v.transpose(1, 2)  # (B, nkv, T, hs)
        if packing is not None:  # several samples a row: each sees itself only
            y = packing.attend(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        mask, is_causal = None, T > 1
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, limit, hs)
            mask, is_causal = cache.plan.mask, cache.plan.causal
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hs)
        return self.o_proj(y)


# ----------------------------------------------------------------- feed-forward


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # gate and up as one (fuse)

    def fuse(self, column_major: bool) -> None:
        self.fused = fuse([self.gate_proj, self.up_proj], column_major)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ready(self.fused, self.gate_proj):
            gate, up = F.linear(x, *self.fused).chunk(2, dim=-1)  # (B, T, hidden) each
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class MoE(nn.Module):
    """Routed top-k experts plus always-on shared experts.

    The load-balancing loss (Switch Transformer) is n_experts * sum_i f_i * P_i,
    with f_i the fraction of token slots sent to expert i and P_i the mean
    router probability of expert i. P_i carries the gradient, so the router
    does learn to balance. It is stored in `aux_loss` after each forward.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.top_k, self.n_experts = cfg.moe_top_k, cfg.moe_experts
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.experts = nn.ModuleList(GeluMLP(cfg.d_model, cfg.d_ff, cfg.bias) for _ in range(cfg.moe_experts))
        self.shared = nn.ModuleList(GeluMLP(cfg.d_model, cfg.d_ff, cfg.bias) for _ in range(cfg.moe_shared_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).type_as(x)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (chosen == e).nonzero(as_tuple=True)
            if token_idx.numel():
                y = expert(flat[token_idx]) * weights[token_idx, slot, None]
                out.index_add_(0, token_idx, y)
        for expert in self.shared:
            out = out + expert(flat)
        fraction = F.one_hot(chosen, self.n_experts).float().sum(1).mean(0) / self.top_k  # (E,), no grad
        self.aux_loss = self.n_experts * (fraction * probs.mean(0)).sum()
        return out.view(B, T, D)


def make_mlp(cfg: LMConfig) -> nn.Module:
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.d_model, cfg.d_ff, cfg.bias)
    if cfg.mlp == "gelu":
        return GeluMLP(cfg.d_model, cfg.d_ff, cfg.bias)
    return MoE(cfg)


# ------------------------------------------------------------------------ model


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, rope, cache: LayerCache | None = None, packing: Packing | None = None
    ) -> torch.Tensor:
        x = x + self._drop(self.attn(self.attn_norm(x), rope, cache, packing))
        return x + self._drop(self.mlp(self.mlp_norm(x)))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x) if self.training else x  # no module call a decode step does not need


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, T, V); None when asked for the hidden states alone
    aux_loss: torch.Tensor  # scalar: summed MoE balancing loss, already scaled by moe_aux_coef
    hidden: torch.Tensor | None = None  # (B, T, d_model) after the final norm, when asked (head=False)


class LanguageModel(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.reducer = None
        if cfg.d_in is not None:  # the original's low-rank reducer
            self.reducer = nn.Sequential(
                nn.Linear(cfg.d_in, cfg.rank),
                nn.GELU(),
                nn.Linear(cfg.rank, cfg.d_model),
                nn.LayerNorm(cfg.d_model),
            )
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings and cfg.embed_dim == cfg.d_model:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def cache_layout(self, x: torch.Tensor) -> Layout:
        """How a KV cache stores this model's keys and values for input x: in
        autocast's dtype where it is on (the projections' outputs), else x's."""
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        return Layout(self.cfg.n_layers, self.cfg.n_kv_heads, self.cfg.head_dim, dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, embed_dim) embeddings."""
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        head: bool = True,
        valid: list[int] | None = None,
        logits_at: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> LMOutput:
        """head=False: return the normed hidden states instead of the logits, so a
        caller that needs logits at a few positions (the loss) applies lm_head there.
        With a cache: valid[r] of row r's tokens are real, the rest right padding.
        logits_at (B,): logits only at that position of each row, (B, V).
        Packed rows (svlm/data/packing.py): each token's `positions` (B, T) in
        its sample, and `packing`, which tokens see which."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        x = inputs_embeds  # (B, T, embed_dim)
        if self.reducer is not None:
            x = self.reducer(x)  # (B, T, d_model)
        B, T, _ = x.shape
        start, longest = (0, T) if positions is None else (None, 0)  # packed rows: each sample within the context
        if cache is not None:
            plan = cache.begin(B, T, x.device, valid, None if cache.allocated else self.cache_layout(x))
            start, positions, longest = plan.start, plan.positions, plan.limit  # ragged rows: (B, T) positions
        if longest > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {longest} tokens is longer than model.lm.max_seq_len={self.cfg.max_seq_len}")
        rope = None
        if self.pos_embed is not None:
            at = torch.arange(start, start + T, device=x.device) if start is not None else positions
            x = x + self.pos_embed(at)  # (T, D) or (B, T, D)
        elif start is not None:
            rope = (self.rope_cos[start : start + T, None], self.rope_sin[start : start + T, None])  # (T, 1, hs)
        else:  # (B, T, 1, hs): each row's own positions, broadcast over the heads
            rope = (self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None])
        if self.training:  # no module call a decode step does not need
            x = self.drop(x)
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, None, packing, use_reentrant=False)
            else:
                x = block(x, rope, None if cache is None else cache.layer(i), packing)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.cfg.mlp == "moe":
            aux = self.cfg.moe_aux_coef * sum(b.mlp.aux_loss for b in self.layers)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at]  # (B, D): only what the next token needs
        if not head:
            return LMOutput(logits=None, aux_loss=aux, hidden=self.norm(x))
        return LMOutput(logits=self.lm_head(self.norm(x)), aux_loss=aux)
