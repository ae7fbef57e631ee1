"""The original SVLM recipe on local artifacts built here: a DINOv2 folder of
base dimensions (random weights, save_pretrained), a Llama-family tokenizer
folder (a sentencepiece model), and data in the original's jsonl and in
LLaVA's JSON with real image files. Also the parameter counts of model=svlm
and model=base, and every row of the README's table of the original's flags."""

import json
import random
import re

import pytest
import sentencepiece as spm
import torch
from conftest import REPO, compose, path_overrides
from PIL import Image
from transformers import AutoTokenizer, Dinov2Config, Dinov2Model

from svlm.cli import quote_free_text
from svlm.config import load_eval_config, load_infer_config, load_train_config
from svlm.errors import ConfigError
from svlm.evaluation.evaluate import evaluate
from svlm.inference.ask import ask
from svlm.model_folder import load_model
from svlm.models.vision import VisionConfig, VisionEncoder
from svlm.models.vlm import VLM, VLMConfig
from svlm.tokenizer import load_tokenizer
from svlm.training.loop import train
from svlm.training.prepare import build_model

BASE_DINO = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 14,
    "image_size": 518,
}
COLOURS = {"red": "红色", "green": "绿色", "blue": "蓝色"}


# --------------------------------------------------------------------- artifacts


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    """A DINOv2 folder as `git clone facebook/dinov2-base` gives (random weights)."""
    folder = tmp_path_factory.mktemp("dinov2-base")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**BASE_DINO)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "BitImageProcessor", "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2] * 3})
    )
    return folder


def _picture(path, colour: str, size: tuple[int, int], mode: str = "RGB") -> None:
    rgb = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}[colour]
    Image.new("RGB", size, rgb).convert(mode).save(path)


@pytest.fixture(scope="module")
def svlm_data(tmp_path_factory):
    """Svlmdata/ in the original layout: {pretrain,sft}_vlm_data.jsonl + {pretrain,sft}_images/."""
    root = tmp_path_factory.mktemp("Svlmdata")
    rng = random.Random(0)
    for task in ("pretrain", "sft"):
        (root / f"{task}_images").mkdir()
        lines = []
        for i in range(30):
            colour = rng.choice(list(COLOURS))
            name = f"{i:04d}.jpg" if i % 2 else f"{i:04d}.png"
            size = rng.choice([(40, 30), (128, 128), (300, 200)])
            _picture(root / f"{task}_images" / name, colour, size, "L" if i % 7 == 0 else "RGB")
            if task == "pretrain":
                conv = [
                    {"role": "user", "content": "<image>\n请描述这张图片。"},
                    {"role": "assistant", "content": f"一张{COLOURS[colour]}的图片。"},
                ]
            else:  # multi-turn, <image> not at the start, roles in capitals now and then
                conv = [
                    {"role": "User" if i % 3 == 0 else "user", "content": "请看这张图 <image> 它是什么颜色？"},
                    {"role": "assistant", "content": COLOURS[colour]},
                    {"role": "user", "content": "用英文说。"},
                    {"role": "ASSISTANT" if i % 3 == 0 else "assistant", "content": colour},
                ]
            lines.append({"conversations": conv, "image": name})
        lines.append(
            {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
        )
        with open(root / f"{task}_vlm_data.jsonl", "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return root


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory):
    """LLaVA's JSON: a list of {"id", "image", "conversations": [{"from", "value"}]}."""
    root = tmp_path_factory.mktemp("llava")
    (root / "images").mkdir()
    records = []
    for i in range(24):
        colour = list(COLOURS)[i % 3]
        _picture(root / "images" / f"{i}.jpg", colour, (64 + i, 48))
        records.append(
            {
                "id": str(i),
                "image": f"{i}.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is this picture?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    (root / "llava_instruct_150k.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def llama_tokenizer_dir(tmp_path_factory, svlm_data, llava_data):
    """A Llama-family tokenizer folder: a sentencepiece BPE model with byte fallback
    (tokenizer.model), as in llava-1.5-7b-hf, trained on the test data's text."""
    folder = tmp_path_factory.mktemp("llava-1.5-7b-hf")
    text = folder / "corpus.txt"
    lines = []
    for f in svlm_data.glob("*.jsonl"):
        for line in f.read_text(encoding="utf-8").splitlines():
            lines += [m["content"] for m in json.loads(line)["conversations"]]
    lines += ["What colour is this picture?", "red green blue"] * 5
    text.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    text.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return folder


def shrunk_lm(d_in: bool) -> list[str]:
    """The language model at test size; the vision encoder keeps DINOv2-base's dimensions."""
    lm = ["model.lm.d_model=64", "model.lm.n_layers=3", "model.lm.n_heads=4", "model.lm.n_kv_heads=2",
          "model.lm.d_ff=128", "model.lm.max_seq_len=256", "model.vision.image_size=112"]  # fmt: skip
    return lm + (["model.lm.d_in=128", "model.lm.rank=16", "model.projector.hidden=128"] if d_in else [])


# ------------------------------------------------------------------------ counts


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_model(option: str, vocab_size: int, tmp_path) -> VLM:
    cfg = load_train_config(compose("train", [f"model={option}", f"paths.run_dir={tmp_path}"]))
    m = cfg.model
    lm = type(m.lm)(**{**m.lm.__dict__, "vocab_size": vocab_size})
    with torch.device("meta"):  # shapes only: no memory, no weights
        return VLM(VLMConfig(m.vision, m.projector, lm, image_token_id=0), dinov2_config=Dinov2Config(**BASE_DINO))


def test_svlm_parameter_count(tmp_path):
    """NOTES.md: about 934M with DINOv2-base, 847.6M without, for the llava
    vocabulary (32000 + <image>, <pad>; we add three chat tokens)."""
    model = _meta_model("svlm", 32000 + 5, tmp_path)
    total, vision = _count(model), _count(model.vision)
    assert vision == pytest.approx(86.58e6, rel=1e-3)  # DINOv2-base
    assert total - vision == pytest.approx(847.6e6, rel=1e-3)
    assert total == pytest.approx(934e6, rel=2e-3)
    # the parts named in NOTES.md
    assert _count(model.lm.embed_tokens) == 32005 * 4096  # the wide text embedding
    assert model.num_image_tokens == 32
    assert sum(_count(b) for b in model.lm.layers) == pytest.approx(14 * 46.2e6, rel=5e-3)


def test_base_parameter_count(tmp_path):
    model = _meta_model("base", 32000 + 5, tmp_path)
    lm = _count(model.lm)
    assert 170e6 < lm < 230e6, lm  # "a modern ~200M language model"
    assert model.num_image_tokens == 64


# --------------------------------------------------------------- local artifacts


def test_vision_from_local_folder(dinov2_dir):
    cfg = VisionConfig(path=str(dinov2_dir), image_size=112)
    from svlm.models.vision import sync_with_checkpoint

    cfg = sync_with_checkpoint(cfg)
    assert (cfg.patch_size, cfg.hidden_size, cfg.num_layers) == (14, 768, 12)
    assert cfg.image_mean == [0.5, 0.4, 0.3] and cfg.image_std == [0.2] * 3  # the folder's statistics
    enc = VisionEncoder(cfg)
    saved = Dinov2Model.from_pretrained(dinov2_dir)
    assert torch.equal(enc.dinov2.embeddings.patch_embeddings.projection.weight,
                       saved.embeddings.patch_embeddings.projection.weight)  # fmt: skip
    assert enc(torch.zeros(1, 3, 112, 112)).shape == (1, 64, 768)  # 8x8 patches, positions interpolated


def test_vision_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.vision.path"):
        VisionEncoder(VisionConfig(path=str(tmp_path / "nowhere")))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ConfigError, match="not dinov2"):
        VisionEncoder(VisionConfig(path=str(tmp_path)))


def test_llama_tokenizer_folder(llama_tokenizer_dir, tmp_path):
    tok = load_tokenizer(llama_tokenizer_dir)
    assert type(tok).__name__ == "LlamaTokenizer" and tok.bos_token_id == 1
    for special in ("<image>", "<pad>", "<|end|>"):
        assert tok.convert_tokens_to_ids(special) >= 400  # added after the 400 pieces
    text = "请根据图像回答：这张图里有什么？ red"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte fallback: exact
    # saved with our tokens, it loads back (now from tokenizer.json) with the same ids
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == len(tok) and again.encode(text) == tok.encode(text)


# ------------------------------------------------------------------- end to end


def test_svlm_recipe_both_stages_eval_infer(tmp_path, cache_dir, dinov2_dir, llama_tokenizer_dir, svlm_data, capsys):
    common = [
        "experiment=svlm", f"model.vision.path={dinov2_dir}", f"tokenizer.path={llama_tokenizer_dir}",
        f"data.root={svlm_data}", *shrunk_lm(d_in=True), "hardware=cpu", "stage.max_steps=2",
        *path_overrides(tmp_path, cache_dir),
    ]  # fmt: skip
    cfg1 = load_train_config(compose("train", [*common, "stage=stage1", f"paths.run_dir={tmp_path}/outputs/s1"]))
    s1 = cfg1.stages()[0]
    assert (s1.batch_size, s1.epochs, s1.steps_per_epoch, s1.unfreeze_lm_top_layers) == (2, 5, 1500, 2)
    assert (s1.lr, s1.weight_decay, s1.betas, s1.warmup, s1.grad_clip) == (2e-4, 0.1, [0.9, 0.95], 0.03, 1.0)
    assert cfg1.data.train_file.replace("{task}", s1.task) == "pretrain_vlm_data.jsonl"
    (stage1,) = train(cfg1)
    out = capsys.readouterr().out
    assert "lowest 1 of 3 LM blocks stay frozen" in out

    cfg2 = load_train_config(compose("train", [*common, "stage=stage2", f"paths.run_dir={tmp_path}/outputs/s2"]))
    s2 = cfg2.stages()[0]
    assert (s2.batch_size, s2.epochs, s2.unfreeze_lm_top_layers, s2.train_projector) == (4, 10, -1, False)
    (stage2,) = train(cfg2)
    assert f"starting from {stage1}" in capsys.readouterr().out

    model, tok, meta = load_model(stage2)
    assert meta["stage"] == "stage2" and model.num_image_tokens == 32 and model.cfg.lm.d_in == 128
    assert len(tok) == model.cfg.lm.vocab_size
    # the projector stayed as stage 1 left it (the original's stage 2 freezes the align head)
    before, _, _ = load_model(stage1)
    assert torch.equal(before.projector.align[1].weight, model.projector.align[1].weight)
    assert not torch.equal(before.lm.layers[0].attn.q_proj.weight, model.lm.layers[0].attn.q_proj.weight)

    results = evaluate(load_eval_config(compose("eval", [f"ckpt={stage2}", "steps=2", "batch_size=4",
                                                         *path_overrides(tmp_path, cache_dir)])))  # fmt: skip
    assert results["val_loss"] > 0 and results["accuracy_by"]["n"] >= 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("accuracy=")
    image = next((svlm_data / "sft_images").glob("*.jpg"))
    args = quote_free_text([f"ckpt={stage2}", f"image={image}", "prompt=请根据图像回答：这张图里有什么？"])
    answer = ask(load_infer_config(compose("infer", [*args, "max_new_tokens=5", *path_overrides(tmp_path, cache_dir)])))
    assert isinstance(answer, str)


def test_base_model_on_llava_data(tmp_path, cache_dir, dinov2_dir, llama_tokenizer_dir, llava_data):
    overrides = [
        "model=base", "data=llava", f"data.root={llava_data}", f"model.vision.path={dinov2_dir}",
        f"tokenizer.path={llama_tokenizer_dir}", *shrunk_lm(d_in=False), "stage=stage2", "stage.max_steps=2",
        "stage.batch_size=4", "hardware=cpu", "init_from=null", *path_overrides(tmp_path, cache_dir),
    ]  # fmt: skip
    cfg = load_train_config(compose("train", overrides))
    model = build_model(cfg, load_tokenizer(llama_tokenizer_dir))
    assert model.num_image_tokens == 16  # 8x8 patches at 112 px, merged 2x2
    # stage 2 alone needs a stage-1 model: start it from a stage-1 run of the same config
    (stage1,) = train(
        load_train_config(compose("train", [*overrides, "stage=stage1", f"paths.run_dir={tmp_path}/outputs/a"]))
    )
    (stage2,) = train(load_train_config(compose("train", [*overrides, f"paths.run_dir={tmp_path}/outputs/b"])))
    _, _, meta = load_model(stage2)
    assert meta["data"] == "llava" and meta["stage"] == "stage2"
    metrics = [
        json.loads(x) for x in (tmp_path / "outputs" / "b" / "stage2" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("val/loss" in m for m in metrics)  # the held-out 1% (at least one sample)
    results = evaluate(load_eval_config(compose("eval", [f"ckpt={stage2}", *path_overrides(tmp_path, cache_dir)])))
    assert results["accuracy_by"]["n"] >= 1
    image = llava_data / "images" / "0.jpg"
    args = [f"ckpt={stage2}", f"image={image}", "prompt=What colour is this picture?", "max_new_tokens=3"]
    assert isinstance(ask(load_infer_config(compose("infer", [*args, *path_overrides(tmp_path, cache_dir)]))), str)


def test_missing_local_folders_fail_clearly(tmp_path, cache_dir, svlm_data, llama_tokenizer_dir):
    base = ["experiment=svlm", "stage=stage1", f"data.root={svlm_data}", *path_overrides(tmp_path, cache_dir)]
    cfg = load_train_config(compose("train", [*base, f"tokenizer.path={llama_tokenizer_dir}",
                                              f"model.vision.path={tmp_path}/dinov2-base"]))  # fmt: skip
    with pytest.raises(ConfigError, match="model.vision.path"):
        train(cfg)
    cfg = load_train_config(compose("train", [*base, "model=tiny", f"tokenizer.path={tmp_path}/llava"]))
    with pytest.raises(ConfigError, match="tokenizer.path"):
        train(cfg)
    cfg = load_train_config(compose("train", [*base, "model=tiny", f"data.root={tmp_path}/Svlmdata"]))
    with pytest.raises(ConfigError, match="data.root"):
        train(cfg)


# ------------------------------------------------------------ the flags table


def flag_rows() -> list[tuple[str, list[str]]]:
    """(original flag, overrides) for every row of the README's flag table."""
    rows = []
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`--"):
            continue
        overrides = [o for span in re.findall(r"`([^`]*)`", cells[1]) for o in span.split() if "=" in o]
        rows.append((cells[0].strip("`").split()[0], overrides))
    return rows


ORIGINAL_FLAGS = (
    "--stage --model_dir --dinov2_path --data_dir --jsonl_name --image_dir --unfreeze_lm_top_layers "
    "--train_text_embed --train_dino_proj --batch_size --epochs --steps_per_epoch --lr --weight_decay "
    "--warmup_ratio --grad_clip --amp_dtype --accum_steps --num_workers --fixed_len --shuffle --save_every "
    "--seed --ckpt --wandb_project --run_name --d_in --d_model --rank --n_heads --n_layers --image --prompt"
).split()


def test_every_original_flag_has_a_row():
    documented = {flag for flag, _ in flag_rows()}
    assert set(ORIGINAL_FLAGS) <= documented, set(ORIGINAL_FLAGS) - documented


@pytest.mark.parametrize(("flag", "overrides"), flag_rows(), ids=[f for f, _ in flag_rows()])
def test_flag_row_composes(flag, overrides, tmp_path, cache_dir):
    assert overrides, f"the row of {flag} names no override"
    paths = path_overrides(tmp_path, cache_dir)
    infer_keys = ("ckpt=", "image=", "prompt=")
    if all(o.startswith(infer_keys) for o in overrides):
        load_infer_config(compose("infer", [*quote_free_text(overrides), *paths]))
        return
    train_overrides = [o for o in overrides if not o.startswith(infer_keys)]
    stage = [] if any(o.startswith("stage=") for o in train_overrides) else ["stage=stage1"]
    load_train_config(compose("train", ["experiment=svlm", *stage, *train_overrides, *paths]))
