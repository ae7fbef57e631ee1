"""Ragged batched generation: prompts of different lengths (with and without
pictures) decode together and each gets the tokens it gets alone; rows join
and leave between steps; per-row stops, sampling and seeds; the KV cache's
rows."""

import pytest
import torch
from conftest import compose, path_overrides, tiny_train_overrides
from PIL import Image

from svlm.config import load_train_config
from svlm.data.chat import ChatEncoder
from svlm.inference.generation import Batch, Sampling, Stream, decoding_layout, generate
from svlm.models.kv_cache import KVCache
from svlm.models.language_model import LanguageModel, LMConfig
from svlm.models.vision import ImageProcessor
from svlm.training.prepare import build_model

QUESTIONS = ["What colour is the shape?", "Shape?", "Is there a red circle on the left of the picture or not?",
             "Describe it.", "How many shapes are there, and which one is the biggest of them all?"]  # fmt: skip


@pytest.fixture(scope="module")
def varied(tmp_path_factory, cache_dir, shapes_root, tokenizer):
    """An untied random model: it says varied things, so a row that saw another
    row's keys, or sat at the wrong position, would show."""
    base = tmp_path_factory.mktemp("gen")
    cfg = load_train_config(compose("train", [*tiny_train_overrides(), *path_overrides(base, cache_dir),
                                              "model.lm.tie_embeddings=false"]))  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).eval()
    enc = ChatEncoder.for_model(tokenizer, model)
    proc = ImageProcessor(model.cfg.vision)
    images = sorted((shapes_root / "images").glob("test-*.png"))
    prompts, views = [], []
    for k, q in enumerate(QUESTIONS):
        with_image = k != 3  # one text-only row among them
        prompts.append(enc.prompt(q, image=int(with_image)))
        views.append(proc(Image.open(images[k]))[None] if with_image else None)
    assert len({len(p) for p in prompts}) == len(prompts)  # every length different
    return model, prompts, views


def alone(model, prompts, views, **kw):
    return [generate(model, [p], v, **kw)[0] for p, v in zip(prompts, views)]


def all_views(views):
    present = [v for v in views if v is not None]
    return torch.cat(present) if present else None


def test_ragged_batch_equals_one_by_one(varied):
    model, prompts, views = varied
    kw = dict(stop_ids=-1, max_new_tokens=10)
    one_by_one = alone(model, prompts, views, **kw)
    assert len({tuple(r) for r in one_by_one}) == len(prompts) and all(len(set(r)) > 3 for r in one_by_one)
    assert generate(model, prompts, all_views(views), **kw) == one_by_one
    # two rows at a time: rows leave and the next prompts join between steps
    assert generate(model, prompts, all_views(views), batch_size=2, **kw) == one_by_one
    # rows of different budgets finish at different steps
    budgets = [3, 10, 1, 7, 5]
    streams = [Stream(p, v, n, frozenset()) for p, v, n in zip(prompts, views, budgets)]
    batch = Batch(model)
    with torch.no_grad():
        batch.add(streams[:3])
        batch.step()
        batch.add(streams[3:])  # joining a batch already under way
        while len(batch):
            batch.step()
    assert [s.ids for s in streams] == [r[:n] for r, n in zip(one_by_one, budgets)]
    assert all(s.finish == "length" for s in streams)


def test_ragged_batch_stops_per_row(varied):
    model, prompts, views = varied
    free = alone(model, prompts, views, stop_ids=-1, max_new_tokens=8)
    stops = [r[4] for r in free]  # each row stops at its own fifth token
    streams = [Stream(p, v, 8, frozenset([s])) for p, v, s in zip(prompts, views, stops)]
    batch = Batch(model)
    with torch.no_grad():
        batch.add(streams)
        while len(batch):
            batch.step()
    assert [s.ids for s in streams] == [r[: r.index(s)] for r, s in zip(free, stops)]
    assert all(s.finish == "stop" for s in streams)


def test_sampling_per_row_with_seeds(varied):
    model, prompts, views = varied
    rows = [Sampling(temperature=1.0, top_k=20, seed=7), Sampling(), Sampling(temperature=0.8, top_p=0.9, seed=3),
            Sampling(temperature=1.2, seed=11), Sampling()]  # fmt: skip
    kw = dict(stop_ids=-1, max_new_tokens=10)
    together = generate(model, prompts, all_views(views), sampling=rows, **kw)
    apart = [generate(model, [p], v, sampling=[s], **kw)[0] for p, v, s in zip(prompts, views, rows)]
    assert together == apart
    greedy = alone(model, prompts, views, **kw)
    assert together[1] == greedy[1] and together[4] == greedy[4]  # the greedy rows are greedy
    assert together[0] != greedy[0]  # the sampling rows sample
    other = generate(model, prompts, all_views(views), sampling=[Sampling(1.0, 20, 1.0, 8)] + rows[1:], **kw)
    assert other[0] != together[0] and other[1:] == together[1:]  # a seed is the row's own


def test_generation_without_cache_matches(varied):
    model, prompts, views = varied
    kw = dict(stop_ids=-1, max_new_tokens=6)
    assert generate(model, prompts, all_views(views), use_cache=False, **kw) == alone(model, prompts, views, **kw)


def test_decoding_layout_keeps_answers(varied):
    model, prompts, views = varied
    kw = dict(stop_ids=-1, max_new_tokens=8)
    before = generate(model, prompts, all_views(views), **kw)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.cfg.lm.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.lm(ids).logits
    decoding_layout(model)
    attn, mlp = model.lm.layers[0].attn, model.lm.layers[0].mlp
    qkv, _ = attn.fused  # q, k and v fused into one column-major matrix; the weights are views into it
    assert qkv.shape == (3 * attn.q_proj.weight.shape[0], attn.q_proj.weight.shape[1])
    assert qkv.stride() == (1, qkv.shape[0]) and attn.k_proj.weight.data_ptr() == qkv[qkv.shape[0] // 3 :].data_ptr()
    assert mlp.fused[0].shape[0] == 2 * mlp.gate_proj.weight.shape[0]
    head = model.lm.lm_head.weight
    assert head.stride() == (1, head.shape[0])  # column-major, same shape
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model.lm(ids).logits, logits)  # bit for bit
    assert generate(model, prompts, all_views(views), **kw) == before
    attn.q_proj.weight.data[0, 0] += 1.0  # an update reaches the fused matrix too
    assert qkv[0, 0] == attn.q_proj.weight[0, 0]
    attn.q_proj.weight.data[0, 0] -= 1.0
    model.lm(ids).logits.sum().backward()  # with gradients, the linears one by one: the weights get theirs
    assert attn.q_proj.weight.grad is not None and mlp.up_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_views_must_match_the_image_slots(varied):
    model, prompts, views = varied
    with pytest.raises(ValueError, match="image slots for 4 views; 3 were given"):
        generate(model, prompts, all_views(views)[:3], stop_ids=-1, max_new_tokens=2)


def test_kv_cache_rows_absorb_and_drop():
    torch.manual_seed(0)
    lm = LanguageModel(LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)).eval()
    a, b, c = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 9)), torch.randint(0, 50, (1, 3))

    def last_logits(ids):
        with torch.no_grad():
            return lm(ids).logits[0, -1]

    cache = KVCache(chunk=4)  # a small chunk: growth happens in the test
    with torch.no_grad():
        lm(a, cache=cache)
        other = KVCache()
        lm(b, cache=other)
        cache.absorb(other)  # rows: a, b
        more = KVCache()
        lm(c, cache=more)
        cache.absorb(more)  # rows: a, b, c
        assert cache.lengths == [5, 9, 3] and cache.capacity == 12
        cache.drop(0)  # c takes row 0: rows c, b
        assert cache.lengths == [3, 9]
        nxt = torch.tensor([[7], [8]])
        step = lm(nxt, cache=cache).logits[:, -1]
    torch.testing.assert_close(step[0], last_logits(torch.cat([c, nxt[:1]], 1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(step[1], last_logits(torch.cat([b, nxt[1:]], 1)), atol=1e-5, rtol=0)
    with torch.no_grad():  # a row joining takes the retired row's slot: the cache is not copied
        slots = cache.keys[0]
        again = KVCache()
        lm(a, cache=again)
        cache.absorb(again)  # rows: c, b, a
        assert cache.keys[0] is slots and cache.lengths == [4, 10, 5]
        step = lm(torch.tensor([[1], [2], [3]]), cache=cache).logits[:, -1]
    torch.testing.assert_close(step[0], last_logits(torch.cat([c, nxt[:1], torch.tensor([[1]])], 1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(step[2], last_logits(torch.cat([a, torch.tensor([[3]])], 1)), atol=1e-5, rtol=0)


def test_right_padded_prefill_gives_each_row_its_logits():
    torch.manual_seed(0)
    lm = LanguageModel(LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, pos="learned"))
    lm.eval()
    rows = [torch.randint(0, 50, (n,)) for n in (4, 7, 2)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    with torch.no_grad():
        cache = KVCache()
        out = lm(ids, cache=cache, valid=[4, 7, 2], logits_at=torch.tensor([3, 6, 1])).logits  # (3, V)
        assert cache.lengths == [4, 7, 2]
        step = lm(torch.tensor([[5], [6], [7]]), cache=cache).logits[:, -1]
        for r, row in enumerate(rows):
            torch.testing.assert_close(out[r], lm(row[None]).logits[0, -1], atol=1e-5, rtol=0)
            follow = torch.cat([row, torch.tensor([5 + r])])[None]
            torch.testing.assert_close(step[r], lm(follow).logits[0, -1], atol=1e-5, rtol=0)


def test_kv_cache_reserves_what_its_rows_need():
    lm = LanguageModel(LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)).eval()
    cache = KVCache(chunk=16)
    cache.reserve(7)  # a prompt of 5 and 2 new tokens: no more allocated
    with torch.no_grad():
        for ids in (torch.randint(0, 50, (2, 5)), torch.tensor([[1], [2]]), torch.tensor([[3], [4]])):
            lm(ids, cache=cache)
        assert cache.capacity == 7 and cache.keys[0].shape == (2, 4, 7, 8)
        lm(torch.tensor([[5], [6]]), cache=cache)  # past it: grown to a whole chunk
    assert cache.capacity == 16 and cache.lengths == [8, 8]


def test_no_path_ever_picks_a_special_id(varied, tokenizer):
    """A model whose mass sits on the image slot, padding and the role tokens
    still answers in text, greedy, sampling, with and without the cache (and
    the no-cache path no longer fails on a stray image slot)."""
    model, prompts, views = varied
    enc = ChatEncoder.for_model(tokenizer, model)
    special = [enc.image_id, enc.pad_id, *tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])]
    assert set(special) <= set(enc.banned_ids) and not set(enc.stop_ids) & set(enc.banned_ids)
    boost = torch.zeros(model.cfg.lm.vocab_size)
    boost[special] = 100.0  # far above any other logit of this model
    hook = model.lm.lm_head.register_forward_hook(lambda m, i, out: out + boost)
    try:
        kw = dict(stop_ids=enc.stop_ids, max_new_tokens=6, banned_ids=enc.banned_ids)
        rows = [Sampling(), Sampling(temperature=1.0, seed=1), Sampling(temperature=1.0, top_k=5, top_p=0.9, seed=2),
                Sampling(), Sampling()]  # fmt: skip
        outs = [*generate(model, prompts, all_views(views), sampling=rows, **kw),
                *generate(model, prompts[:2], all_views(views[:2]), use_cache=False, **kw)]  # fmt: skip
        assert all(len(o) == 6 and not set(o) & set(enc.banned_ids) for o in outs)
        # without banned_ids, the model's own image slot is still never picked
        (only_image,) = generate(model, prompts[:1], views[0], stop_ids=-1, max_new_tokens=4)
        assert enc.image_id not in only_image and set(only_image) <= set(special)
    finally:
        hook.remove()
