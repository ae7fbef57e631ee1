"""The training loss computes logits only where a supervised token follows: it
must equal the cross entropy of the full logits, in value and gradients; and the
benchmark's analytic FLOPs of such a step must match what torch counts."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from svlm.config import StageConfig
from svlm.data.dataset import Collator
from svlm.evaluation.evaluate import validate
from svlm.flops import step_flops
from svlm.models.language_model import LMConfig
from svlm.models.lora import LoraConfig
from svlm.models.projector import ProjectorConfig
from svlm.models.vision import VisionConfig
from svlm.models.vlm import VLM, VLMConfig, target_positions
from svlm.training.optim import set_trainable

VOCAB, IMAGE_ID, PAD = 120, 3, 0


def tiny_vlm(seed: int = 0, **lm) -> VLM:
    torch.manual_seed(seed)
    cfg = VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2),
        projector=ProjectorConfig(compress="pixel_shuffle", factor=2),  # 4x4 patches -> 4 visual tokens
        lm=LMConfig(vocab_size=VOCAB, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64, **lm),
        image_token_id=IMAGE_ID,
    )
    return VLM(cfg)


def batch_of(lengths: list[tuple[int, int]], seed: int = 1) -> dict:
    """Samples of (prompt, answer) text tokens after the 4 image slots, collated as in training."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for prompt, answer in lengths:
        ids = [IMAGE_ID] * 4 + torch.randint(10, VOCAB, (prompt + answer,), generator=g).tolist()
        labels = [-100] * (4 + prompt) + ids[4 + prompt :]
        items.append({"input_ids": ids, "labels": labels, "pixel_values": torch.randn(1, 3, 32, 32, generator=g)})
    return Collator(PAD)(items)


def reference_loss(model: VLM, batch: dict) -> torch.Tensor:
    """Cross entropy of the full (B, T, V) logits, shifted, padding and prompts ignored."""
    logits = model(batch["input_ids"], batch["pixel_values"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def test_target_positions():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, 9]])
    # row 0: labels at t=2,3 are predicted at t=1,2; row 1: at t=1,4 from t=0,3 -> flat 5+0, 5+3
    assert target_positions(labels).tolist() == [1, 2, 5, 8]
    assert target_positions(torch.full((2, 3), -100)).numel() == 0


@pytest.mark.parametrize("tie", [True, False])
def test_loss_and_gradients_equal_full_logits(tie):
    model = tiny_vlm(tie_embeddings=tie)
    batch = batch_of([(3, 5), (6, 2), (1, 9)])
    assert len(batch["target_index"]) == 5 + 2 + 9  # one position before each answer token
    ref = reference_loss(model, batch)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    for given in (batch["target_index"], None):  # from the collator, or found from the labels
        out = model(batch["input_ids"], batch["pixel_values"], batch["labels"], target_index=given)
        assert out.n_tokens == len(batch["target_index"]) and out.logits.shape == (out.n_tokens, VOCAB)
        torch.testing.assert_close(out.ce_loss, ref, rtol=1e-6, atol=1e-6)
        grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
        for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_bad_target_index_is_refused():
    model = tiny_vlm()
    batch = batch_of([(3, 5), (6, 2)])
    T = batch["input_ids"].shape[1]
    for bad in ([T - 1], [2 * T], [-1]):  # no next token in its row; past the batch; negative
        with pytest.raises(ValueError, match="target_index"):
            model(batch["input_ids"], batch["pixel_values"], batch["labels"], target_index=torch.tensor(bad))


def test_no_supervised_token_gives_zero_loss():
    model = tiny_vlm()
    batch = batch_of([(4, 0), (2, 0)])
    out = model(batch["input_ids"], batch["pixel_values"], batch["labels"], target_index=batch["target_index"])
    assert out.n_tokens == 0 and out.loss.item() == 0.0
    out.loss.backward()  # still a graph, no NaN


def test_validation_metrics_equal_full_logits():
    model = tiny_vlm()
    batches = [batch_of([(3, 5), (6, 2), (1, 9)], seed=1), batch_of([(2, 1), (4, 4)], seed=2)]
    # the figures as computed from the full logits
    correct = tokens = exact = samples = 0
    loss_sum = 0.0
    model.eval()
    with torch.no_grad():
        for b in batches:
            logits = model(b["input_ids"], b["pixel_values"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            mask = labels != -100
            pred = logits.argmax(-1)
            correct += int(((pred == labels) & mask).sum())
            exact += int(((pred == labels) | ~mask).all(-1).sum())
            tokens += int(mask.sum())
            samples += labels.shape[0]
            loss_sum += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
    got = validate(model, batches, torch.no_grad)
    assert got["val/token_acc"] == pytest.approx(correct / tokens)
    assert got["val/exact"] == pytest.approx(exact / samples)
    assert got["val/loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)


def test_exact_match_counts_per_sample():
    """A model whose head always says token 42: only the sample whose every answer
    token is 42 is exactly right."""
    model = tiny_vlm()
    with torch.no_grad():
        model.lm.lm_head = torch.nn.Linear(48, VOCAB)  # untied, so the change below stays in the head
        model.lm.lm_head.weight.zero_()
        model.lm.lm_head.bias.zero_()
        model.lm.lm_head.bias[42] = 1.0
    batch = batch_of([(2, 3), (2, 3)])
    batch["input_ids"][1, 6:9] = 42
    batch["labels"][1, 6:9] = 42
    got = validate(model, [batch], torch.no_grad)
    assert got["val/exact"] == 0.5
    assert got["val/token_acc"] == pytest.approx(3 / 6)


STAGES = {
    "everything": dict(train_vision=True, train_projector=True, unfreeze_lm_top_layers=-1, train_text_embed=True),
    "recipe stage 1": dict(train_vision=False, train_projector=True, unfreeze_lm_top_layers=1, train_text_embed=True),
    "projector only": dict(train_vision=False, train_projector=True, unfreeze_lm_top_layers=0, train_text_embed=False),
    "top block only": dict(train_vision=False, train_projector=False, unfreeze_lm_top_layers=1, train_text_embed=False),
    "LoRA, top block": dict(
        train_vision=False,
        train_projector=False,
        unfreeze_lm_top_layers=1,
        train_text_embed=False,
        lora=LoraConfig(r=4),
    ),  # fmt: skip
    "LoRA on attention, all blocks, projector": dict(
        train_vision=False,
        train_projector=True,
        train_text_embed=False,
        lora=LoraConfig(r=4, targets=["q_proj", "v_proj"]),
    ),  # fmt: skip
}


CHECKPOINT_SHAPES = {  # what real checkpoints bring (svlm/models/pretrained.py)
    "plain": {},
    "qwen3": {"qk_norm": True, "head_size": 24},  # per-head q/k norms, heads wider than d_model / n_heads
    "qwen2": {"qkv_bias": True},
}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("shape", CHECKPOINT_SHAPES)
def test_step_flops_match_torch_counter(stage, tie, shape):
    """Forward and backward of a step as autograd runs it, counted by torch (the
    math attention kernel, so the attention's matmuls are seen), against the
    analytic count: frozen parts skip weight gradients, and parts below the
    lowest trained one skip input gradients."""
    model = tiny_vlm(tie_embeddings=tie, **CHECKPOINT_SHAPES[shape])
    set_trainable(model, StageConfig(name="stage2", task="sft", **STAGES[stage]))
    batch = batch_of([(5, 7)] * 3)  # equal lengths: no padding
    B, T = batch["input_ids"].shape
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(batch["input_ids"], batch["pixel_values"], batch["labels"], target_index=batch["target_index"])
        out.loss.backward()
    assert step_flops(model, B, T, head_tokens=len(batch["target_index"]) // B) == pytest.approx(
        counter.get_total_flops(), rel=0.03
    )
