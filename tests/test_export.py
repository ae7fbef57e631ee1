"""Export to transformers' formats (svlm/export/), checked with transformers
alone: processor, logits, greedy generation, for LLaVA (a projector without a
norm) and InternVL (the default tiny model: pixel shuffle and LayerNorm); the
refusals; and the import back into our model."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import compose, path_overrides, tiny_train_overrides
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from svlm.config import load_train_config
from svlm.data.chat import JINJA_TEMPLATE, ChatEncoder, render
from svlm.errors import ConfigError
from svlm.export import check_exportable, export_model, import_model
from svlm.export.__main__ import main
from svlm.inference.generation import generate
from svlm.model_folder import load_model
from svlm.models.language_model import LMConfig
from svlm.models.projector import ProjectorConfig
from svlm.models.vision import ImageProcessor, VisionConfig, VisionEncoder
from svlm.models.vlm import VLM, VLMConfig
from svlm.training.loop import train

# What makes the tiny test model a LLaVA (the default tiny merges patches and
# normalises in the projector, and reads DINOv2 after its final norm: an
# InternVL); GQA too, so the key/value heads are exercised.
EXPORTABLE = [
    "model.projector.compress=none",
    "model.projector.norm=false",
    "model.vision.feature_layer=-1",
    "model.lm.n_kv_heads=2",
]
QUESTION = "What colour is the shape?"


FORMATS = {"llava": EXPORTABLE, "internvl": ["model.lm.n_kv_heads=2"]}  # internvl: the default projector


@pytest.fixture(scope="module", params=sorted(FORMATS))
def exported(request, tmp_path_factory, cache_dir, shapes_root):
    """A tiny model trained 3+3 steps (both stages), exported with the CLI:
    as LLaVA with EXPORTABLE, as InternVL with the default projector."""
    base = tmp_path_factory.mktemp(f"export-{request.param}")
    overrides = [*tiny_train_overrides("both"), *path_overrides(base, cache_dir), *FORMATS[request.param]]
    _, model_dir = train(load_train_config(compose("train", overrides)))
    out = base / request.param
    assert main([f"ckpt={model_dir}", f"out={out}", f"paths.outputs={base / 'outputs'}"]) == 0
    model, tokenizer, _ = load_model(model_dir)
    return model, tokenizer, out


def _load(out):
    return AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()


def _image(shapes_root, i=0):
    return Image.open(sorted((shapes_root / "images").glob("test-*.png"))[i]).convert("RGB")


def _ours(model, tokenizer, image, question=QUESTION):
    ids = torch.tensor([ChatEncoder(tokenizer, model.num_image_tokens).prompt(question)])
    pixels = ImageProcessor(model.cfg.vision)(image).unsqueeze(0)
    return ids, pixels


def _rel_diff(a, b):
    return float((a - b).norm() / a.norm())


def test_exported_files(exported):
    _, _, out = exported
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json"} <= set(names)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(names)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "llama"
    assert config["vision_feature_select_strategy"] == "default"
    assert config["vision_feature_layer"] == -1  # LLaVA: the last layer before the norm; InternVL: after it
    if config["model_type"] == "llava":
        assert config["vision_config"]["model_type"] == "dinov2"
    else:
        assert config["model_type"] == "internvl" and config["downsample_ratio"] == 0.5  # 2x2 patches a token
        assert config["vision_config"]["model_type"] == "internvl_vision"


def test_processor_matches_our_pipeline(exported, shapes_root):
    model, tokenizer, out = exported
    processor = AutoProcessor.from_pretrained(out)
    rng = np.random.default_rng(0)
    images = [
        _image(shapes_root),  # 32 px, the model's size
        Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)),  # resized, not square
        Image.fromarray(rng.integers(0, 256, (50, 40, 4), dtype=np.uint8), "RGBA"),  # alpha on white
    ]
    conversations = [  # our plain-string content, and LLaVA's list of parts; the text first too
        [{"role": "user", "content": f"<image>\n{QUESTION}"}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        [{"role": "user", "content": f"{QUESTION}\n<image>"}],
        [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}],
    ]
    for image in images:
        ids, pixels = _ours(model, tokenizer, image)
        for messages in conversations:
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = processor(images=image, text=text, return_tensors="pt")
            assert inputs["input_ids"].tolist() == ids.tolist()
            torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-6, rtol=0)


def test_chat_template_renders_like_ours(exported):
    _, _, out = exported
    processor = AutoProcessor.from_pretrained(out)
    turns = [("user", "<image>\nWhat is it?"), ("assistant", "A red circle."), ("user", "Where?")]
    messages = [{"role": r, "content": c} for r, c in turns]
    for gen in (False, True):
        assert processor.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == render(turns, gen)
    assert processor.tokenizer.chat_template == JINJA_TEMPLATE  # the model folder's own: images first


def test_logits_match(exported, shapes_root):
    model, tokenizer, out = exported
    llava = _load(out)
    for i in range(2):
        ids, pixels = _ours(model, tokenizer, _image(shapes_root, i))
        with torch.no_grad():
            ours = model(ids, pixels).logits
            theirs = llava(input_ids=ids, pixel_values=pixels).logits
        assert theirs.shape == ours.shape
        assert _rel_diff(ours, theirs) < 1e-5


def test_a_two_image_question_matches(exported, shapes_root):
    """Two images in one question: the processor puts each where its part is, and the logits equal ours."""
    model, tokenizer, out = exported
    processor = AutoProcessor.from_pretrained(out)
    pictures = [_image(shapes_root, 0), _image(shapes_root, 1)]
    ids = ChatEncoder(tokenizer, model.num_image_tokens, "inline").prompt(f"<image> or <image>: {QUESTION}")
    parts = [
        {"type": "image"},
        {"type": "text", "text": " or "},
        {"type": "image"},
        {"type": "text", "text": f": {QUESTION}"},
    ]
    text = processor.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(images=pictures, text=text, return_tensors="pt")
    pixels = torch.stack([ImageProcessor(model.cfg.vision)(im) for im in pictures])  # (2, 3, S, S)
    placed = ChatEncoder(tokenizer, model.num_image_tokens).prompt(f"<image> or <image>: {QUESTION}")
    assert inputs["input_ids"][0].tolist() == placed  # images first, as the model was trained; parts joined
    with torch.no_grad():
        ours = model(torch.tensor([ids]), pixels).logits
        theirs = _load(out)(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    assert _rel_diff(ours, theirs) < 1e-5


def _greedy_both(model, tokenizer, out, image, n=12):
    """Greedy answers of ours (svlm.inference.generation) and of transformers' generate."""
    llava = _load(out)
    processor = AutoProcessor.from_pretrained(out)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    ids, pixels = _ours(model, tokenizer, image)
    ours = generate(model, ids, pixels, end, max_new_tokens=n)[0]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(images=image, text=text, return_tensors="pt")
    theirs = llava.generate(**inputs, do_sample=False, max_new_tokens=n)[0, ids.shape[1] :].tolist()
    if end in theirs:  # transformers keeps the stop token (then pads), ours stops before it
        theirs = theirs[: theirs.index(end)]
    return ours, theirs


def test_greedy_generation_matches(exported, shapes_root):
    model, tokenizer, out = exported
    for i in range(2):
        ours, theirs = _greedy_both(model, tokenizer, out, _image(shapes_root, i))
        assert theirs == ours


def _small_vlm(tokenizer, vision=None, projector=None, lm=None, dinov2_config=None) -> VLM:
    """A small VLM with every weight moved off its initial value."""
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, **(vision or {}))
    lm = LMConfig(vocab_size=len(tokenizer), d_model=64, n_layers=2, n_heads=4, max_seq_len=256, **(lm or {}))
    cfg = VLMConfig(vision, ProjectorConfig(**(projector or {})), lm, tokenizer.convert_tokens_to_ids("<image>"))
    model = VLM(cfg, dinov2_config=dinov2_config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


EXPORTABLE_SMALL = {"vision": {"feature_layer": -1}, "projector": {"norm": False}}  # LLaVA
SHUFFLED = {"compress": "pixel_shuffle", "factor": 2}  # InternVL, as the default tiny model
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}  # fmt: skip


@pytest.mark.parametrize(
    "kind, variant",
    [
        ("llava", {}),
        ("llava", {"vision": {"use_cls": True, "feature_layer": -2}}),  # strategy "full", an earlier layer
        ("llava", {"lm": {"tie_embeddings": False, "bias": True, "n_kv_heads": 1}}),
        ("llava", {"projector": {"norm": False, "hidden": 64}, "lm": {"rope_theta": 500.0}}),
        ("internvl", {"projector": SHUFFLED}),  # after DINOv2's final norm, 2x2 patches a token
        ("internvl", {"projector": {**SHUFFLED, "factor": 4}, "vision": {"feature_layer": -1}}),  # one token
        ("internvl", {"projector": {"compress": "none"}, "vision": {"feature_layer": -2}}),  # every patch
        ("internvl", {"projector": {**SHUFFLED, "hidden": 64}, "lm": {"tie_embeddings": False, "bias": True}}),
        ("llava", {"lm": {"qkv_bias": True}}),  # a Qwen2 inside
        ("llava", {"lm": {"qk_norm": True, "head_size": 32, "tie_embeddings": False}}),  # a Qwen3 inside
        ("llava", {"lm": {"rope_theta": 5e5, "rope_scaling": LLAMA3_SCALING}}),  # a Llama 3.1
        ("internvl", {"projector": SHUFFLED, "lm": {"qk_norm": True, "head_size": 32}}),
    ],
    ids=[
        "plain",
        "cls-layer-2",
        "untied-bias-mqa",
        "hidden-theta",
        "shuffle",
        "shuffle4-layer-1",
        "unmerged-layer-2",
        "shuffle-untied-bias",
        "qwen2",
        "qwen3",
        "llama3-rope",
        "internvl-qwen3",
    ],  # fmt: skip
)
def test_variants_export_and_import(kind, variant, tokenizer, shapes_root, tmp_path):
    base = EXPORTABLE_SMALL if kind == "llava" else {}
    parts = {k: {**base.get(k, {}), **variant.get(k, {})} for k in ("vision", "projector", "lm")}
    model = _small_vlm(tokenizer, **parts)
    out = export_model(model, tokenizer, tmp_path / kind)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == kind
    family = "qwen3" if parts["lm"].get("qk_norm") else "qwen2" if parts["lm"].get("qkv_bias") else "llama"
    assert config["text_config"]["model_type"] == family
    llava = _load(out)
    processor = AutoProcessor.from_pretrained(out)
    image = _image(shapes_root)
    ids, pixels = _ours(model, tokenizer, image)
    text = processor.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{QUESTION}"}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert inputs["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        ours = model(ids, pixels).logits
        theirs = llava(**inputs).logits
    assert _rel_diff(ours, theirs) < 1e-5
    # greedy generation: these random weights answer at length, not with <|end|> at once
    answer, their_answer = _greedy_both(model, tokenizer, out, image)
    assert len(answer) == 12 and their_answer == answer
    # and back: the imported model is ours again, weight for weight
    back, _, meta = load_model(import_model(out, tmp_path / "back"))
    assert meta["stage"] == "import"
    same = dataclasses.replace(model.cfg, projector=dataclasses.replace(model.cfg.projector, hidden=None))
    assert dataclasses.asdict(back.cfg) == dataclasses.asdict(same)  # hidden=null is the LM width
    with torch.no_grad():
        torch.testing.assert_close(back(ids, pixels).logits, ours, atol=0, rtol=0)


def test_internvl_position_embeddings_resampled_as_dinov2_does(tokenizer, shapes_root, tmp_path):
    """A downloaded DINOv2 has positions for 518 px (37x37 patches) and resamples
    them at every forward pass to the image size (16x16 at 224 px for model=base);
    the export resamples them once, with DINOv2's own interpolation."""
    from transformers import Dinov2Config

    from svlm.models.vision import dinov2_config_of

    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2)
    larger = Dinov2Config(**{**dinov2_config_of(vision).to_dict(), "image_size": 56})  # 7x7 positions, 4x4 used
    model = _small_vlm(tokenizer, projector=SHUFFLED, dinov2_config=larger)
    assert model.vision.dinov2.embeddings.position_embeddings.shape[1] == 1 + 49
    out = export_model(model, tokenizer, tmp_path / "internvl")
    ids, pixels = _ours(model, tokenizer, _image(shapes_root))
    with torch.no_grad():
        assert _rel_diff(model(ids, pixels).logits, _load(out)(input_ids=ids, pixel_values=pixels).logits) < 1e-5


def _train_config(*overrides: str):
    return load_train_config(compose("train", ["paths.run_dir=unused", *overrides]))  # nothing is written


def _model_config(*overrides: str) -> VLMConfig:
    m = _train_config(*overrides).model
    return VLMConfig(m.vision, m.projector, m.lm)


@pytest.mark.parametrize(
    "overrides, part, key",
    [
        (["model=svlm"], "resampler projector", "model.projector.kind=resampler"),
        (["model=svlm"], "mixture of experts", "model.lm.mlp=moe"),
        (["model=svlm"], "low-rank reducer", "model.lm.d_in=4096"),
        (["model=svlm"], "learned positions", "model.lm.pos=learned"),
        (["model=svlm"], "layernorm in the language model", "model.lm.norm=layernorm"),
        (["model.projector.norm=false"], "pixel_shuffle token compression", "model.projector.norm=true"),
        (
            ["model.projector.norm=false", "model.projector.compress=none"],
            "final LayerNorm",
            "model.vision.feature_layer=null",
        ),
        (["model.projector.compress=none", "model.vision.use_cls=true"], "CLS token", "model.vision.use_cls=true"),
        (["model.projector.factor=5"], "pixel shuffle by 5", "model.projector.factor=5"),
        (["model.projector.compress=avg_pool"], "avg_pool token compression", "compress=avg_pool"),
        ([*EXPORTABLE, "model.projector.compress=avg_pool"], "avg_pool token compression", "compress=avg_pool"),
        ([*EXPORTABLE, "model.lm.mlp=gelu"], "gelu feed-forward", "model.lm.mlp=gelu"),
        ([*EXPORTABLE, "+model.projector.hidden=96"], "projector hidden width", "model.projector.hidden"),
    ],
)
def test_refusals_name_the_part_and_key(overrides, part, key):
    with pytest.raises(ConfigError) as e:
        check_exportable(_model_config(*overrides))
    assert part in str(e.value) and key in str(e.value)


def test_exportable_overrides_pass():
    for model in ("tiny", "base"):  # the defaults, and with the README's overrides for LLaVA
        assert check_exportable(_model_config(f"model={model}")).MODEL_TYPE == "internvl"
        assert check_exportable(_model_config(f"model={model}", *EXPORTABLE)).MODEL_TYPE == "llava"


def test_cli_refuses_and_writes_nothing(tokenizer, tmp_path, capsys):
    from svlm.model_folder import save_model

    model = _small_vlm(tokenizer, projector={"compress": "pixel_shuffle", "factor": 2, "norm": False})
    folder = save_model(tmp_path / "model", model, tokenizer, {"stage": "stage1"})
    assert main([f"ckpt={folder}", f"out={tmp_path / 'llava'}", f"paths.outputs={tmp_path / 'outputs'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported to transformers' LLaVA format" in err
    assert "pixel_shuffle token compression (model.projector.compress=pixel_shuffle)" in err
    assert "model.vision.feature_layer=null" in err
    assert not (tmp_path / "llava").exists()
    assert main([f"ckpt={folder}", f"paths.outputs={tmp_path / 'outputs'}"]) == 2  # out is required
    assert "out=<folder> is required" in capsys.readouterr().err


def test_export_never_replaces_another_folder(tokenizer, tmp_path):
    model = _small_vlm(tokenizer, **EXPORTABLE_SMALL)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an earlier export"):
        export_model(model, tokenizer, other)
    assert (other / "keep.txt").read_text() == "mine"
    out = export_model(model, tokenizer, tmp_path / "llava")
    assert export_model(model, tokenizer, out) == out  # an earlier export is replaced


def test_feature_layer_reads_before_the_final_norm():
    cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2)
    default = VisionEncoder(cfg).eval()
    layer = VisionEncoder(dataclasses.replace(cfg, feature_layer=-1)).eval()
    layer.load_state_dict(default.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = default.dinov2(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(default(x), out.last_hidden_state[:, 1:])
        torch.testing.assert_close(layer(x), out.hidden_states[-1][:, 1:])
    assert not torch.allclose(layer(x), default(x))
    with pytest.raises(ValueError, match="model.vision.feature_layer=3 is out of range"):
        VisionConfig(num_layers=2, feature_layer=3)
    with pytest.raises(ConfigError, match="model.vision.feature_layer"):
        _train_config("model.vision.feature_layer=-9")


def test_shipped_model_configs_keep_todays_features():
    for name in ("tiny", "base", "svlm"):
        assert _train_config(f"model={name}").model.vision.feature_layer is None


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "python -m svlm.export ckpt=" in capsys.readouterr().out


def test_model_key_unchanged_by_the_new_setting():
    """Models trained before feature_layer, image_placement and the LM families' settings existed keep their key (stage 2 still finds them)."""
    import hashlib

    from svlm.model_folder import model_key

    model = dataclasses.asdict(_train_config().model)
    later_lm = ("path", "rope_scaling", "head_size", "qkv_bias", "qk_norm")  # the checkpoint families' settings
    before = {**model, "vision": {k: v for k, v in model["vision"].items() if k != "feature_layer"},
              "lm": {k: v for k, v in model["lm"].items() if k not in later_lm}}  # fmt: skip
    del before["image_placement"]
    old_key = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    assert model_key(model) == old_key
    assert model_key(dataclasses.asdict(_train_config(*EXPORTABLE[2:3]).model)) != old_key
    assert model_key(dataclasses.asdict(_train_config("model.image_placement=inline").model)) != old_key
    assert model_key(dataclasses.asdict(_train_config("+model.lm.qk_norm=true").model)) != old_key
