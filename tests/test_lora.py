"""LoRA (svlm/models/lora.py) and the LLaVA recipe for a pretrained LM, end to
end: a tiny Qwen2 with a ChatML tokenizer, stage 1 projector only, stage 2
through LoRA; stopped and resumed exactly; scored, asked, served, exported."""

import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import DATA_OVERRIDES, REPO, compose, path_overrides
from test_lm_template import CHATML, lm_tokenizer
from test_reliability import StopAfter, losses
from test_serve import data_url, image_message, png, running, serve_config

from svlm.config import StageConfig, load_eval_config, load_infer_config
from svlm.errors import ConfigError
from svlm.model_folder import load_model, save_model
from svlm.models.lora import ADAPTERS, LoraConfig, has_lora
from svlm.training import loop
from svlm.training.checkpoint import checkpoints
from svlm.training.loop import train
from svlm.training.optim import set_trainable
from svlm.training.signals import TrainingStopped


def lora_stage(**kw) -> StageConfig:
    return StageConfig(name="stage2", task="sft", train_vision=False, lora=LoraConfig(**kw))


def with_random_adapters(model, **kw):
    """`model` with adapters whose B is not zero (as after some training)."""
    set_trainable(model, lora_stage(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.fixture
def model_and_tokenizer(make_train_cfg, tokenizer):
    from svlm.training.prepare import build_model

    return build_model(make_train_cfg(), tokenizer), tokenizer


def test_lora_trains_only_the_adapters_of_the_blocks_that_train(model_and_tokenizer):
    model, _ = model_and_tokenizer
    stage = StageConfig(name="stage2", task="sft", train_vision=False, train_text_embed=False,
                        unfreeze_lm_top_layers=1, lora=LoraConfig(r=4, targets=["q_proj", "down_proj"]))  # fmt: skip
    notes = set_trainable(model, stage)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    lm = {n for n in trained if n.startswith("lm.")}
    assert lm == {f"lm.layers.1.{part}.lora_{ab}.default.weight" for part in ("attn.q_proj", "mlp.down_proj")
                  for ab in "AB"}  # fmt: skip
    assert trained - lm and all(n.startswith("projector.") for n in trained - lm)
    assert any("rank-4 LoRA" in n for n in notes)
    with pytest.raises(ConfigError, match=r"stage.lora.targets: no \['qkv'\] linear layer"):
        set_trainable(model.__class__(model.cfg, dinov2_config=model.vision.dinov2.config),
                      lora_stage(r=4, targets=["qkv"]))  # fmt: skip
    with pytest.raises(ConfigError, match="unfreeze_lm_top_layers=0 trains none"):
        StageConfig(unfreeze_lm_top_layers=0, lora=LoraConfig(r=4))


def test_the_merged_model_gives_the_logits_of_base_plus_lora(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    with_random_adapters(model, r=4, alpha=8.0)
    ids = torch.randint(10, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    merged = save_model(tmp_path / "merged", model, tokenizer, {"finished": True})
    assert not (merged / ADAPTERS).exists()
    loaded, _, _ = load_model(merged)
    assert not has_lora(loaded)
    with torch.no_grad():
        got = loaded(ids).logits
    assert (got - expected).norm() / expected.norm() <= 1e-5
    # A checkpoint keeps the adapters apart: loaded for inference they are merged, for a resume left out.
    ckpt = save_model(tmp_path / "ckpt", model, tokenizer, {"finished": False}, adapters=LoraConfig(r=4, alpha=8.0))
    assert (ckpt / ADAPTERS).is_file()
    with torch.no_grad():
        assert (load_model(ckpt)[0](ids).logits - expected).norm() / expected.norm() <= 1e-5
        base = load_model(ckpt, merge_adapters=False)[0]
        assert (base(ids).logits - expected).norm() / expected.norm() > 1e-3  # without the adapters
    # The merged folder loads with no peft at all.
    code = (f"import sys; sys.modules['peft'] = None\nfrom svlm.model_folder import load_model\n"
            f"load_model({str(merged)!r}); print('ok', 'peft' in sys.modules and sys.modules['peft'] is not None)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok False", out.stderr


def qwen2_with_chatml(folder: Path) -> Path:
    """A tiny Qwen2 at the test model's width, with a ChatML tokenizer and a generation_config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lm_tokenizer(folder, "chatml")  # 300 tokens
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))  # <|im_end|>, <|endoftext|>
    return folder


def test_the_llava_lora_recipe_on_a_pretrained_lm(make_train_cfg, tmp_path, cache_dir, monkeypatch):
    folder = qwen2_with_chatml(tmp_path / "qwen2")
    extra = [f"model.lm.path={folder}", "stage.stage1.log_every=1", "stage.stage2.log_every=1",
             "stage.stage2.save_every=2", "stage.stage2.lr=1e-2"]  # fmt: skip
    full = make_train_cfg(*extra, stage="llava_lora", steps=4, run_dir=tmp_path / "full")
    stage1, stage2 = train(full)
    # Stage 1 trained the projector alone: the LM is the folder's.
    first, _, _ = load_model(stage1)
    from safetensors.torch import load_file

    theirs = load_file(str(folder / "model.safetensors"))
    assert torch.equal(first.lm.layers[0].attn.q_proj.weight, theirs["model.layers.0.self_attn.q_proj.weight"])
    # Stage 2's folder is merged: a plain model whose LM moved; its tokenizer formats with ChatML.
    model, tok, meta = load_model(stage2)
    assert not (stage2 / ADAPTERS).exists() and meta["stage"] == "stage2"
    assert model.cfg.chat_format == "tokenizer" and tok.chat_template == CHATML and model.cfg.stop_ids == [2, 0]
    assert not torch.equal(model.lm.layers[0].attn.q_proj.weight, first.lm.layers[0].attn.q_proj.weight)
    assert torch.equal(model.lm.embed_tokens.weight, first.lm.embed_tokens.weight)  # frozen with LoRA

    # Stopped in stage 2 and resumed: the same losses and the same merged model.
    cut = make_train_cfg(*extra, stage="llava_lora", steps=4, run_dir=tmp_path / "cut")
    monkeypatch.setattr(StopAfter, "n", 4 + 3)
    monkeypatch.setattr(loop, "StopRequested", StopAfter)
    with pytest.raises(TrainingStopped):
        train(cut)
    monkeypatch.undo()
    saved = checkpoints(Path(cut.paths.run_dir) / "stage2")
    assert saved and all((c / ADAPTERS).is_file() for c in saved)
    train(make_train_cfg(*extra, f"resume={cut.paths.run_dir}", stage="llava_lora", steps=4))
    a, b = losses(Path(full.paths.run_dir), "stage2"), losses(Path(cut.paths.run_dir), "stage2")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(b[step] == pytest.approx(a[step], rel=1e-5) for step in a), (a, b)
    again, _, _ = load_model(Path(cut.paths.run_dir) / "stage2" / "model")
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)

    # Scored by eval.py, answered by infer.py, served, exported.
    from svlm.evaluation.evaluate import evaluate
    from svlm.inference.ask import ask

    where = path_overrides(tmp_path / "scored", cache_dir)
    scores = evaluate(load_eval_config(compose("eval", [f"ckpt={stage2}", "data=shapes", *DATA_OVERRIDES, *where,
                                                        "max_test=4", "max_new_tokens=4", "hardware=cpu"])))  # fmt: skip
    assert 0.0 <= scores["accuracy"] <= 1.0 and math.isfinite(scores["val_loss"])
    image = next((cache_dir / "data").glob("*/images/test-*.png"))
    answer = ask(load_infer_config(compose("infer", [f"ckpt={stage2}", f"image={image}", "max_new_tokens=4", *where,
                                                     "hardware=cpu"])))  # fmt: skip
    assert isinstance(answer, str)
    with running(serve_config(stage2, tmp_path / "served", cache_dir)) as (url, _):
        body = {"model": "svlm", "messages": [image_message(data_url(png()))], "max_tokens": 4}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    assert reply["choices"][0]["message"]["role"] == "assistant"
    from transformers import AutoModelForImageTextToText

    from svlm.data.chat import ChatEncoder
    from svlm.export import export_model

    out = export_model(model, tok, tmp_path / "export")
    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([ChatEncoder.for_model(tok, model).prompt("What colour is the shape?")])
    pixels = torch.randn(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    with torch.no_grad():
        theirs, ours = exported(input_ids=ids, pixel_values=pixels).logits, model(ids, pixels).logits
    assert (theirs - ours).norm() / ours.norm() <= 1e-5
