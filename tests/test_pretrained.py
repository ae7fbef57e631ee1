"""Pretrained language models in our decoder (svlm/models/pretrained.py): tiny
random-init checkpoints of every supported family, made with transformers' own
config classes and `save_pretrained`, give the same logits and the same greedy
tokens in our LanguageModel as in transformers."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from svlm.errors import ConfigError
from svlm.models.kv_cache import KVCache
from svlm.models.pretrained import from_pretrained, lm_config

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip


def llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**SHAPE, **kw}))


def qwen2(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, **kw}))


def qwen3(**kw):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**{**SHAPE, **kw}, head_dim=32))  # 4 heads of 32 > hidden 64


def mistral(**kw):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None, **kw))


FAMILIES = {
    "llama": lambda: llama(tie_word_embeddings=True),
    "llama-untied": lambda: llama(tie_word_embeddings=False),
    "llama3-rope": lambda: llama(rope_parameters=LLAMA3),
    "llama-mha": lambda: llama(num_key_value_heads=4),
    "qwen2": lambda: qwen2(tie_word_embeddings=True),
    "qwen3": lambda: qwen3(tie_word_embeddings=False),
    "mistral": lambda: mistral(),
}


def save(model, folder, shard: bool = False):
    torch.manual_seed(0)
    with torch.no_grad():  # random-init norms are all ones and biases zeros: make them count
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "5GB")
    return model.eval()


@pytest.fixture(params=sorted(FAMILIES), scope="module")
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    theirs = FAMILIES[request.param]()
    folder = tmp_path_factory.mktemp(request.param)
    save(theirs, folder, shard=request.param == "llama-untied")  # one family read from shards with an index
    return theirs, from_pretrained(folder).eval(), folder


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_logits_equal_transformers(pair):
    theirs, ours, _ = pair
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    assert rel_diff(got, expected) <= 1e-5


def greedy(model, ids, n, use_cache):
    cache = KVCache() if use_cache else None
    out, step_ids = ids, ids
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=step_ids if use_cache else out, cache=cache).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            step_ids = nxt
    return out


def test_greedy_tokens_equal_transformers_generate(pair):
    theirs, ours, _ = pair
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32, eos_token_id=None,
                                   pad_token_id=0)  # fmt: skip
    for use_cache in (True, False):
        assert torch.equal(greedy(ours, ids, 32, use_cache), expected), use_cache


def test_the_shape_comes_from_the_folder(pair):
    theirs, ours, folder = pair
    cfg, tc = ours.cfg, theirs.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab_size) == (
        tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads,
        tc.intermediate_size, tc.vocab_size)  # fmt: skip
    assert cfg.head_dim == getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    assert cfg.tie_embeddings == tc.tie_word_embeddings
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tc.tie_word_embeddings
    assert all(p.device.type == "cpu" for p in ours.parameters())


def test_the_older_rope_layout_reads_the_same(tmp_path):
    """Hub folders written before transformers 5 say rope_theta and rope_scaling."""
    folder = tmp_path / "old"
    save(llama(rope_parameters=LLAMA3), folder)
    config = json.loads((folder / "config.json").read_text())
    new = lm_config(folder)
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    (folder / "config.json").write_text(json.dumps(config))
    assert lm_config(folder) == new and new.rope_scaling["rope_type"] == "llama3" and new.rope_theta == 500000.0


def break_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, named",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "supported: LlamaForCausalLM"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_scaling type 'yarn'"),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 16}, "sliding window (16 tokens)"),
        ({"hidden_act": "gelu"}, "hidden_act=gelu"),
    ],
)
def test_a_folder_we_cannot_read_is_one_error_naming_it(tmp_path, change, named):
    save(llama(), tmp_path)
    break_config(tmp_path, **change)
    with pytest.raises(ConfigError, match="model.lm.path=") as e:
        from_pretrained(tmp_path)
    assert named in str(e.value) and str(tmp_path) in str(e.value)


def test_missing_and_misshapen_weights_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        from_pretrained(tmp_path)
    save(llama(), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({k: v for k, v in weights.items() if k != name}, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=f"lack {name}"):
        from_pretrained(tmp_path)
    save_file({**weights, name: weights[name][:8]}, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=rf"{name} has shape \(8, 64\), its config.json says \(32, 64\)"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        from_pretrained(tmp_path)


def test_a_max_seq_len_past_the_folders_is_refused(tmp_path):
    save(llama(), tmp_path)
    assert lm_config(tmp_path, max_seq_len=128).max_seq_len == 128
    with pytest.raises(ConfigError, match="max_seq_len=512 is longer than max_position_embeddings=256"):
        lm_config(tmp_path, max_seq_len=512)


@pytest.mark.parametrize("tie", [True, False])
def test_grown_vocabulary_starts_at_the_mean_and_keeps_the_old_logits(tmp_path, tie):
    from svlm.models.pretrained import grow_vocab

    save(llama(tie_word_embeddings=tie), tmp_path)
    ours = from_pretrained(tmp_path).eval()
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = ours(input_ids=ids).logits
        grow_vocab(ours, SHAPE["vocab_size"] + 2)
        after = ours(input_ids=ids).logits
    assert after.shape[-1] == SHAPE["vocab_size"] + 2 and ours.cfg.vocab_size == SHAPE["vocab_size"] + 2
    assert torch.equal(after[..., : SHAPE["vocab_size"]], before)  # old tokens: the same logits
    mean = ours.embed_tokens.weight[: SHAPE["vocab_size"]].mean(0)
    assert torch.allclose(ours.embed_tokens.weight[-1], mean) and torch.allclose(ours.lm_head.weight[-2], mean if tie
           else ours.lm_head.weight[: SHAPE["vocab_size"]].mean(0))  # fmt: skip
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tie
    with pytest.raises(ConfigError, match="smaller than the language model's"):
        grow_vocab(ours, 10)


def pretrained_folder(tokenizer, folder):
    """A tiny Qwen2 at the test model's width, with the test's tokenizer (the LM
    knows all but its last 4 tokens: the VLM grows the embedding for them)."""
    model = qwen2(vocab_size=len(tokenizer) - 4, max_position_embeddings=512, tie_word_embeddings=False)
    save(model, folder)
    tokenizer.save_pretrained(folder)
    return model


def test_training_starts_from_the_pretrained_lm(make_train_cfg, tokenizer, tmp_path):
    from svlm.model_folder import load_model
    from svlm.tokenizer import load_tokenizer
    from svlm.training.loop import train
    from svlm.training.prepare import build_model

    theirs = pretrained_folder(tokenizer, tmp_path / "qwen2")
    cfg = make_train_cfg(f"model.lm.path={tmp_path / 'qwen2'}", steps=2)
    assert cfg.tokenizer.path == str(tmp_path / "qwen2")  # its own tokenizer by default
    vlm = build_model(cfg, load_tokenizer(cfg.tokenizer.path)).eval()
    assert vlm.cfg.lm.qkv_bias and vlm.cfg.lm.d_ff == 96 and not vlm.cfg.lm.tie_embeddings  # the folder's shape
    ids = torch.randint(0, len(tokenizer) - 4, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = vlm.lm(input_ids=ids).logits
    assert (
        got.shape[-1] == len(load_tokenizer(cfg.tokenizer.path))
        and rel_diff(got[..., : expected.shape[-1]], expected) <= 1e-5
    )
    stage1, stage2 = train(cfg)
    model, tok, meta = load_model(stage2)
    assert model.cfg.lm.path == str(tmp_path / "qwen2") and model.cfg.lm.qkv_bias and meta["stage"] == "stage2"
    # eval.py and infer.py read it from its folder, with the LM's tokenizer saved there
    from conftest import DATA_OVERRIDES, compose, path_overrides

    from svlm.config import load_eval_config, load_infer_config
    from svlm.evaluation.evaluate import evaluate
    from svlm.inference.ask import ask

    where = path_overrides(tmp_path / "scored", cfg.paths.cache)
    scores = evaluate(load_eval_config(compose("eval", [f"ckpt={stage2}", "data=shapes", *DATA_OVERRIDES, *where,
                                                        "max_test=4", "max_new_tokens=4", "hardware=cpu"])))  # fmt: skip
    assert 0.0 <= scores["accuracy"] <= 1.0 and math.isfinite(scores["val_loss"])
    image = next((Path(cfg.paths.cache) / "data").glob("*/images/test-*.png"))
    answer = ask(load_infer_config(compose("infer", [f"ckpt={stage2}", f"image={image}", "max_new_tokens=4", *where,
                                                     "hardware=cpu"])))  # fmt: skip
    assert isinstance(answer, str)
    # exported, it is an InternVL with a Qwen2 inside, and answers as ours does
    from transformers import AutoModelForImageTextToText

    from svlm.data.chat import ChatEncoder
    from svlm.export import export_model

    out = export_model(model, tok, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["text_config"]["model_type"] == "qwen2"
    exported = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([ChatEncoder.for_model(tok, model).prompt("What colour is the shape?")])
    pixels = torch.randn(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    with torch.no_grad():
        assert rel_diff(exported(input_ids=ids, pixel_values=pixels).logits, model.eval()(ids, pixels).logits) <= 1e-5


def test_a_shape_that_contradicts_the_folder_names_both(make_train_cfg, tokenizer, tmp_path):
    from svlm.memory import estimate_memory
    from svlm.training.prepare import build_model

    pretrained_folder(tokenizer, tmp_path / "qwen2")
    for change, named in (("model.lm.n_layers=3", r"model.lm.n_layers=3 but .*qwen2/config.json says 2"),
                          ("model.lm.mlp=moe", r"model.lm.mlp='moe' but .* says 'swiglu'")):  # fmt: skip
        cfg = make_train_cfg(f"model.lm.path={tmp_path / 'qwen2'}", change)
        with pytest.raises(ConfigError, match=named):
            build_model(cfg, tokenizer)
        with pytest.raises(ConfigError, match=named):  # the memory planner reads the folder too
            estimate_memory(cfg, cfg.stages()[0])


def test_the_memory_planner_counts_the_folders_model(make_train_cfg, tokenizer, tmp_path):
    from svlm.memory import estimate_memory

    pretrained_folder(tokenizer, tmp_path / "qwen2")
    cfg = make_train_cfg(f"model.lm.path={tmp_path / 'qwen2'}")
    plain = make_train_cfg("model.lm.n_kv_heads=2", "+model.lm.d_ff=96", "+model.lm.qkv_bias=true",
                           "model.lm.tie_embeddings=false", f"tokenizer.vocab_size={len(tokenizer) - 4}")  # fmt: skip
    stage = cfg.stages()[0]
    ours, same = estimate_memory(cfg, stage), estimate_memory(plain, stage, vocab=len(tokenizer) - 4)
    assert ours.weights == same.weights and ours.trained == same.trained
    with pytest.raises(ConfigError, match="no config.json"):
        estimate_memory(make_train_cfg(f"model.lm.path={tmp_path / 'nowhere'}"), stage)
