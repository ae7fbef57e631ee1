"""hardware.compile=true: torch.compile of each transformer block (language
model and vision encoder) gives the eager model's numbers (slow tier: compiling
on the CPU takes about a minute)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from svlm.models.language_model import LanguageModel, LMConfig

pytestmark = pytest.mark.slow


def test_compiled_blocks_match_eager():
    torch.manual_seed(0)
    eager = LanguageModel(LMConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64))
    compiled = copy.deepcopy(eager)
    for block in compiled.layers:
        block.compile()
    for length in (20, 23):  # a second length: recompiled once, with dynamic shapes
        ids = torch.randint(0, 300, (2, length))
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            logits = model(ids).logits
            logits.float().pow(2).mean().backward()
            outs.append((logits, [p.grad.clone() for p in model.parameters()]))
        (a, ga), (b, gb) = outs
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        for x, y in zip(gb, ga):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def tiny_vlm(layers: int):
    """A VLM of a 32-pixel picture in 4 visual tokens (image id 3) and an LM of `layers` layers."""
    from svlm.models.projector import ProjectorConfig
    from svlm.models.vision import VisionConfig
    from svlm.models.vlm import VLM, VLMConfig

    torch.manual_seed(0)
    return VLM(VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2),
        projector=ProjectorConfig(compress="pixel_shuffle", factor=2),
        lm=LMConfig(vocab_size=300, d_model=64, n_layers=layers, n_heads=4, n_kv_heads=2, max_seq_len=64),
        image_token_id=3,
    ))  # fmt: skip


def test_compiled_vlm_matches_eager():
    """Every block compiled, the vision encoder's included: the same loss and gradients."""
    eager = tiny_vlm(layers=2)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    ids = torch.randint(10, 300, (2, 20))
    ids[:, :4] = 3  # the picture's 4 visual tokens
    labels = ids.clone()
    labels[:, :10] = -100
    pixels = torch.randn(2, 3, 32, 32)
    outs = []
    for model in (eager, compiled):
        out = model(ids, pixels, labels)
        out.loss.backward()
        outs.append((out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys() and any(n.startswith("vision.") for n in ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=1e-4, msg=n)


def test_training_with_compile_matches_eager(make_train_cfg, tmp_path):
    from svlm.training.loop import train

    losses = []
    for name, extra in (("eager", []), ("compiled", ["hardware.compile=true"])):
        cfg = make_train_cfg("stage.log_every=1", *extra, stage="stage1", steps=3, base=tmp_path / name)
        [out] = train(cfg)
        lines = [json.loads(x) for x in (Path(out).parent / "metrics.jsonl").read_text().splitlines()]
        losses.append([m["train/loss"] for m in lines if "train/loss" in m])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_compiled_decoding_matches_eager_and_compiles_once_for_all_layers():
    """hardware.compile at inference: the blocks share their compiled graphs
    across layers (a block gets its layer's cache, not a layer number), so
    six layers decode within a recompile limit of six; greedy tokens, of a
    batch of one and of a ragged batch, are the eager model's."""
    from svlm.inference.generation import generate, prepare_for_decoding

    eager = prepare_for_decoding(tiny_vlm(layers=6).eval())
    compiled = prepare_for_decoding(copy.deepcopy(eager), compile=True)
    prompts = [[3] * 4 + list(range(10, 10 + n)) for n in (5, 9)]
    pixels = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()  # only this test's compilations count against the limit
    with torch._dynamo.config.patch(recompile_limit=6, fail_on_recompile_limit_hit=True):
        for rows in ([0], [0, 1]):
            args = ([prompts[r] for r in rows], pixels[rows], -1)
            assert generate(compiled, *args, max_new_tokens=12) == generate(eager, *args, max_new_tokens=12)
