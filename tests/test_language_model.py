import itertools

import pytest
import torch

from svlm.models.kv_cache import KVCache
from svlm.models.language_model import LanguageModel, LMConfig

VOCAB = 50


def small_lm(**kw) -> LanguageModel:
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, moe_experts=4, moe_top_k=2)
    cfg.update(kw)
    return LanguageModel(LMConfig(**cfg)).eval()


COMBOS = list(itertools.product(["rmsnorm", "layernorm"], ["rope", "learned"], ["swiglu", "gelu", "moe"]))


@pytest.mark.parametrize(("norm", "pos", "mlp"), COMBOS)
def test_causal(norm, pos, mlp):
    # GQA (2 kv heads for 4 query heads) in every other combination.
    n_kv = 2 if COMBOS.index((norm, pos, mlp)) % 2 else 4
    lm = small_lm(norm=norm, pos=pos, mlp=mlp, n_kv_heads=n_kv)
    ids = torch.randint(0, VOCAB, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    with torch.no_grad():
        a, b = lm(ids).logits, lm(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-5, rtol=0)
    # and the change does reach the later positions
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "kw",
    [
        dict(pos="rope", mlp="swiglu", n_kv_heads=2),
        dict(pos="learned", mlp="gelu", norm="layernorm"),
        dict(pos="rope", mlp="moe", n_kv_heads=1),
        dict(pos="rope", d_in=48, rank=8),
    ],
    ids=["rope-gqa", "learned", "moe-mqa", "reducer"],
)
def test_kv_cache_equals_full_forward(kw):
    lm = small_lm(**kw)
    ids = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        full = lm(ids).logits  # (2, 14, V)
        # one token at a time
        cache = KVCache()
        steps = [lm(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])]
        assert cache.length == ids.shape[1]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
        # a prompt, then a multi-token chunk, then one token
        cache = KVCache()
        parts = [lm(ids[:, :5], cache=cache).logits, lm(ids[:, 5:9], cache=cache).logits]
        parts.append(lm(ids[:, 9:], cache=cache).logits)
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_cache_past_max_seq_len_raises():
    lm = small_lm(max_seq_len=8)
    cache = KVCache()
    with torch.no_grad():
        lm(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            lm(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_moe_balancing_loss_reaches_router():
    lm = small_lm(mlp="moe", moe_aux_coef=0.01).train()
    out = lm(torch.randint(0, VOCAB, (2, 10)))
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() > 0
    lm.zero_grad()
    out.aux_loss.backward()
    for block in lm.layers:
        grad = block.mlp.router.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    # n_experts * sum_i f_i P_i is about 1 per layer for a near-uniform router (and at most n_experts)
    per_layer = out.aux_loss.item() / 0.01 / len(lm.layers)
    assert 0.5 < per_layer < 4.0


def test_dense_models_have_zero_aux_loss():
    lm = small_lm(mlp="swiglu")
    assert lm(torch.randint(0, VOCAB, (1, 4))).aux_loss.item() == 0.0


def test_low_rank_reducer_builds_and_runs():
    lm = small_lm(d_in=96, rank=16)
    assert lm.reducer is not None
    assert lm.embed_tokens.weight.shape == (VOCAB, 96)
    assert lm.cfg.embed_dim == 96
    ids = torch.randint(0, VOCAB, (2, 7))
    out = lm(ids)
    assert out.logits.shape == (2, 7, VOCAB)
    assert torch.isfinite(out.logits).all()
    # inputs_embeds are taken at the wide width too
    out2 = lm(inputs_embeds=lm.embed(ids))
    torch.testing.assert_close(out.logits, out2.logits)
    out.logits.sum().backward()
    assert lm.reducer[0].weight.grad is not None


def test_tied_embeddings():
    lm = small_lm(tie_embeddings=True)
    assert lm.lm_head.weight is lm.embed_tokens.weight
    lm = small_lm(tie_embeddings=False)
    assert lm.lm_head.weight is not lm.embed_tokens.weight


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        (dict(d_model=30, n_heads=4), "model.lm.d_model"),
        (dict(d_model=32, n_heads=4, n_kv_heads=3), "model.lm.n_kv_heads"),
        (dict(d_model=12, n_heads=4, pos="rope"), "model.lm.pos"),
        (dict(mlp="moe", moe_experts=2, moe_top_k=3), "model.lm.moe_top_k"),
        (dict(d_in=64), "model.lm.d_in"),
    ],
)
def test_config_validation(kw, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        LMConfig(**kw)


def test_default_d_ff():
    assert LMConfig(d_model=64, mlp="gelu").d_ff == 256
    swiglu = LMConfig(d_model=96, mlp="swiglu").d_ff
    assert swiglu % 64 == 0 and swiglu >= 8 * 96 / 3


@pytest.mark.parametrize("mlp", ["swiglu", "moe"])
def test_gradient_checkpointing_gives_the_same_gradients(mlp):
    cfg = LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, mlp=mlp, moe_aux_coef=0.1)
    torch.manual_seed(0)
    model = LanguageModel(cfg).train()
    ids = torch.randint(0, 50, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        out = model(ids)
        (out.logits.square().mean() + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_rmsnorm_fused_path_is_bit_for_bit_the_written_one():
    from svlm.models.language_model import RMSNorm

    torch.manual_seed(0)
    for shape in [(1, 1, 256), (2, 7, 256), (3, 4, 9, 64)]:
        norm = RMSNorm(shape[-1], eps=1e-6)
        norm.weight.data = torch.randn(shape[-1])
        x = torch.randn(shape) * 5
        written = (x * x.pow(2).mean(-1, keepdim=True).add(norm.eps).rsqrt()) * norm.weight
        assert torch.equal(norm(x), written)  # fp32: F.rms_norm, the same values
