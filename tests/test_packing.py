"""Packing (data.packing=true): rows shared by several samples give each sample
the loss and the gradients it gets alone; the rows, positions, segments and
pictures the collator builds; a training run with packing."""

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, path_overrides, tiny_train_overrides

from svlm.config import load_train_config
from svlm.data.chat import IGNORE, ChatEncoder
from svlm.data.dataset import Collator
from svlm.data.formats import BadSamples
from svlm.data.packing import PackingCollator, layout, pack_rows, padding_share
from svlm.data.source import data_root, load_splits
from svlm.models import packed_attention
from svlm.models.packed_attention import Packing, end_to_end
from svlm.models.vision import ImageProcessor
from svlm.training.prepare import build_model
from svlm.training.step import packed_inputs


def test_pack_rows_fills_rows_evenly():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(30, 1500) for _ in range(rng.randint(1, 40))]
        rows = pack_rows(lengths, 2048)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each sample once
        assert all(sum(lengths[i] for i in row) <= 2048 for row in rows)
        fewest = max(-(-sum(lengths) // 2048), sum(n > 1024 for n in lengths))  # a bound below the best packing
        assert len(rows) <= 11 / 9 * fewest + 1
    lengths = [rng.randint(30, 1500) for _ in range(64)]
    assert padding_share(lengths, pack_rows(lengths, 2048)) < 0.02
    with pytest.raises(ValueError, match="does not fit a row of 100"):
        pack_rows([50, 101], 100)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cache_dir, shapes_root, tokenizer):
    def make(*extra):
        base = tmp_path_factory.mktemp("pack")
        cfg = load_train_config(compose("train", [*tiny_train_overrides("stage2"), *path_overrides(base, cache_dir),
                                                  *extra]))  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer).train()
        encoder = ChatEncoder.for_model(tokenizer, model)
        ds, _ = load_splits(cfg.data, data_root(cfg.data, cfg.paths.cache), "sft", encoder,
                            ImageProcessor(model.cfg.vision), cfg.data.max_len, BadSamples(), 0)  # fmt: skip
        items = [ds[i] for i in (0, 5, 11, 17, 23, 31, 40)]
        return model, encoder, items

    return make


def per_sample_ce(model, batch, packed: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each sample's summed cross entropy (in the order the collator placed them), and their total."""
    extra = packed_inputs(batch, torch.device("cpu")) if packed else {}
    out = model(batch["input_ids"], batch["pixel_values"], batch["labels"], target_index=batch["target_index"],
                **extra)  # fmt: skip
    ce = F.cross_entropy(out.logits.float(), out.targets, reduction="none")  # (N,)
    T = batch["input_ids"].shape[1]
    rows, cols = out.target_index // T, out.target_index % T
    key = rows * 1000 + (batch["segments"][rows, cols] if packed else 0)  # (row, sample in the row)
    return [ce[key == k].sum() for k in torch.unique(key)], ce.sum()


@pytest.mark.parametrize("flat", [False, True], ids=["rows-mask", "end-to-end-spans"])
@pytest.mark.parametrize(
    "variant", [[], ["model.lm.pos=learned", "model.lm.n_kv_heads=2"]], ids=["rope", "learned-gqa"]
)
def test_packed_batch_equals_samples_one_by_one(setup, variant, flat, monkeypatch):
    model, encoder, items = setup(*variant)
    collate = PackingCollator(encoder.pad_id, row_len=max(len(it["input_ids"]) for it in items) * 3, flat=flat)
    batch = collate(items)
    assert 1 <= batch["input_ids"].shape[0] < len(items)  # several samples a row
    if flat:  # one row of every sample: attention a sample's span at a time
        monkeypatch.setattr(packed_attention, "SPANS_FROM", 0)
        assert (
            batch["input_ids"].shape[0] == 1
            and packed_inputs(batch, torch.device("cpu"))["packing"].kernel == "sdpa_spans"
        )
    placed = order_of(batch, items)  # the order the collator placed them in: row by row, left to right
    losses, total = per_sample_ce(model, batch, packed=True)
    model.zero_grad()
    total.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone_total = 0
    for k, i in enumerate(placed):
        (loss,), s = per_sample_ce(model, Collator(encoder.pad_id)([items[i]]), packed=False)
        torch.testing.assert_close(losses[k], loss, rtol=1e-5, atol=0)
        alone_total = alone_total + s
    alone_total.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert (packed_grads[n] - p.grad).norm() <= 1e-5 * p.grad.norm() + 1e-8, n


def order_of(batch, items) -> list[int]:
    """Which item sits at each (row, segment), in reading order, by its token ids."""
    placed = []
    for r in range(batch["input_ids"].shape[0]):
        for s in range(1, int(batch["segments"][r].max()) + 1):
            ids = batch["input_ids"][r][batch["segments"][r] == s].tolist()
            placed.append(next(i for i, it in enumerate(items) if it["input_ids"] == ids and i not in placed))
    return placed


def test_collator_rows(setup):
    model, encoder, items = setup()
    lengths = [len(it["input_ids"]) for it in items]
    batch = PackingCollator(encoder.pad_id, row_len=max(lengths) * 2)(items)
    B, T = batch["input_ids"].shape
    assert batch["n_samples"] == len(items) and B == len(pack_rows(lengths, max(lengths) * 2))
    placed = order_of(batch, items)
    assert sorted(placed) == list(range(len(items)))
    k = 0
    for r in range(B):
        at = 0
        for _ in range(int(batch["segments"][r].max())):
            it, n = items[placed[k]], lengths[placed[k]]
            assert batch["positions"][r, at : at + n].tolist() == list(range(n))  # its own positions, from 0
            assert batch["labels"][r, at].item() == IGNORE  # its first token predicts nothing
            assert batch["labels"][r, at + 1 : at + n].tolist() == it["labels"][1:]
            at, k = at + n, k + 1
        assert (batch["segments"][r, at:] == 0).all() and (batch["input_ids"][r, at:] == encoder.pad_id).all()
    # the pictures in the order of their slots
    expected = torch.cat([items[i]["pixel_values"] for i in placed])
    assert torch.equal(batch["pixel_values"], expected)
    spans = batch["cu_seqlens"].diff().tolist()
    assert sum(spans) == B * T and batch["max_seqlen"] == max(spans)


def test_end_to_end_row(setup):
    model, encoder, items = setup()
    lengths = [len(it["input_ids"]) for it in items]
    batch = PackingCollator(encoder.pad_id, row_len=max(lengths), flat=True)(items)
    assert batch["input_ids"].shape == (1, sum(lengths)) and (batch["segments"] > 0).all()  # no padding
    assert order_of(batch, items) == list(range(len(items)))  # in the sampler's order
    assert batch["cu_seqlens"].diff().tolist() == lengths and batch["max_seqlen"] == max(lengths)
    assert batch["positions"][0].tolist() == [p for n in lengths for p in range(n)]
    assert torch.equal(batch["pixel_values"], torch.cat([it["pixel_values"] for it in items]))
    with pytest.raises(ValueError, match="longer than data.max_len=100"):
        layout([50, 101], 100, flat=True)
    # on the CPU: the mask's rows up to SPANS_FROM, spans (end to end) above
    cpu = torch.device("cpu")
    assert not end_to_end(cpu, packed_attention.SPANS_FROM) and end_to_end(cpu, packed_attention.SPANS_FROM + 1)


def test_packed_kernels_match_the_mask(setup):
    """Each sample's span on the CPU, and the GPU's kernels where this machine
    can run them (flex_attention on the CPU), against SDPA with the block mask."""
    model, encoder, items = setup()
    batch = PackingCollator(encoder.pad_id, row_len=400)(items[:4])
    torch.manual_seed(0)
    B, T = batch["segments"].shape
    q, k, v = (torch.randn(B, 4, T, 16) for _ in range(3))
    sdpa = Packing.make(batch["segments"], None, 0, "sdpa").attend(q, k, v, 0.0)
    spans = Packing.make(batch["segments"], batch["cu_seqlens"], batch["max_seqlen"], "sdpa_spans")
    torch.testing.assert_close(spans.attend(q, k, v, 0.0), sdpa, atol=1e-5, rtol=1e-5)
    gqa = Packing.make(batch["segments"], None, 0, "sdpa").attend(q, k[:, :2], v[:, :2], 0.0)
    torch.testing.assert_close(spans.attend(q, k[:, :2], v[:, :2], 0.0), gqa, atol=1e-5, rtol=1e-5)
    try:
        flex = Packing.make(batch["segments"], None, 0, "flex").attend(q, k, v, 0.0)
    except Exception as e:  # a torch without flex_attention on the CPU
        pytest.skip(f"flex_attention does not run on this CPU: {type(e).__name__}: {e}")
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spans_from", [1024, 64], ids=["rows", "end-to-end"])
def test_training_with_packing(make_train_cfg, capsys, monkeypatch, spans_from):
    from svlm.training.loop import train

    monkeypatch.setattr(packed_attention, "SPANS_FROM", spans_from)  # 64: the spans kernel, samples end to end
    cfg = make_train_cfg("data.packing=true", stage="stage1", steps=4)
    train(cfg)
    layout = "share rows" if spans_from == 1024 else "go end to end in one row"
    assert f"packing: each micro-batch's samples {layout}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (Path(cfg.paths.run_dir) / "stage1" / "metrics.jsonl").open()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert train_rows and all(r["train/loss"] == r["train/loss"] for r in train_rows)  # finite, logged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_check.sh runs it there)")
@pytest.mark.parametrize("kernel", ["flex", "flash_varlen"])
def test_gpu_kernels_match_the_mask(setup, kernel):
    """On a GPU, in bf16: the kernel packed_kernel picks gives SDPA's block-mask answer."""
    if kernel == "flash_varlen":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed: pip install flash-attn")
    model, encoder, items = setup()
    batch = PackingCollator(encoder.pad_id, row_len=400)(items[:5])
    segments = batch["segments"].cuda()
    B, T = segments.shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, 4, T, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    want = Packing.make(segments, None, 0, "sdpa").attend(q, k[:, :2], v[:, :2], 0.0)
    got = Packing.make(segments, batch["cu_seqlens"], batch["max_seqlen"], kernel).attend(q, k[:, :2], v[:, :2], 0.0)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
