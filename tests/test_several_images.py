"""Several images in one conversation: records whose "image" is a list, each
image taking the place of its own <image> tag, in order."""

import json

import pytest
import torch
from PIL import Image

from svlm.data.chat import IMAGE_TOKEN, ChatEncoder
from svlm.data.dataset import ChatDataset, Collator
from svlm.data.formats import BadSamples
from svlm.models.vision import ImageProcessor, VisionConfig


def record(text: str, images, answer: str = "a red circle") -> str:
    return json.dumps({"image": images, "conversations": [{"from": "human", "value": text},
                                                          {"from": "gpt", "value": answer}]})  # fmt: skip


@pytest.fixture
def pictures(tmp_path):
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{i}.png")
    return tmp_path


def test_each_image_of_a_record_comes_in_order(pictures, tokenizer):
    data = pictures / "data.jsonl"
    data.write_text("\n".join([
        record("First <image> then <image>: which is red?", ["1.png", "0.png"]),  # 1: two tags, two images
        record("Which is red?", ["2.png", "0.png"]),  # 2: no tags: both before the text
        record("<image> <image> <image>", ["0.png", "1.png"]),  # 3: three tags, two images
        record("Nine?", ["0.png"] * 9),  # 4: more than data.max_images
        record("Odd", ["0.png", 3]),  # 5: not a file name
        record("One <image>", "0.png"),  # 6: a single name, as before
        record("No picture here", None),  # 7: text only
    ]) + "\n")  # fmt: skip
    processor, bad = ImageProcessor(VisionConfig(image_size=32, patch_size=8)), BadSamples()
    encoder = ChatEncoder(tokenizer, num_image_tokens=4, image_placement="inline")
    ds = ChatDataset([data], pictures, encoder, processor, 512, "skip", bad, max_images=8)
    assert [ex.where.rsplit(":", 1)[1] for ex in ds.examples] == ["1", "2", "6", "7"]
    assert ds.examples[3].images == [] and ds[3]["pixel_values"] is None
    assert dict(bad.counts) == {"image count": 1, "too many images": 1, "bad image": 1}
    assert any(":3: image count: 3 <image> tag(s) in the text for 2 images" in e for e in bad.examples["image count"])
    assert any(
        ":4: too many images: 9 images, more than data.max_images=8" in e for e in bad.examples["too many images"]
    )
    first = ds[0]
    expected = torch.stack([processor(Image.open(pictures / f).convert("RGB")) for f in ("1.png", "0.png")])
    torch.testing.assert_close(first["pixel_values"], expected)  # (2, 3, S, S), in the order of the tags
    assert first["input_ids"].count(encoder.image_id) == 8
    untagged = tokenizer.decode(ds.examples[1].input_ids)
    assert untagged.count(IMAGE_TOKEN) == 8 and untagged.index(IMAGE_TOKEN) < untagged.index("Which")
    batch = Collator(encoder.pad_id)([ds[0], ds[2], ds[1]])
    assert batch["pixel_values"].shape == (5, 3, 32, 32)  # 2 + 1 + 2 images, sample by sample
    assert (batch["input_ids"] == encoder.image_id).sum() == 5 * 4


def test_image_k_fills_the_kth_tag(make_train_cfg, tokenizer):
    from svlm.training.prepare import build_model

    model = build_model(make_train_cfg(), tokenizer).eval()
    encoder = ChatEncoder(tokenizer, model.num_image_tokens, image_placement="inline")
    ids, _ = encoder.encode([("user", "Left <image> and right <image> now"), ("assistant", "red")])
    ids = torch.tensor([ids])
    slots = (ids[0] == encoder.image_id).nonzero().squeeze(1)  # (2 * N,)
    n = model.num_image_tokens
    pixels = torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    with torch.no_grad():
        embeds, visual = model.embed(ids, pixels), model.encode_images(pixels)  # (1, T, E), (2, N, E)
        torch.testing.assert_close(embeds[0, slots[:n]], visual[0])
        torch.testing.assert_close(embeds[0, slots[n:]], visual[1])
        a, b = model(ids, pixels).logits[0], model(ids, pixels.flip(0)).logits[0]
    first = int(slots[0])
    torch.testing.assert_close(a[:first], b[:first])  # before the first swapped slot: the same
    assert (a[first:] - b[first:]).abs().amax(-1).min() > 0  # from it on: every position changes


def test_infer_asks_about_several_images(make_train_cfg, tokenizer, pictures, tmp_path, cache_dir):
    from conftest import compose, path_overrides

    from svlm.config import ConfigError, load_infer_config
    from svlm.inference.ask import ask
    from svlm.model_folder import save_model
    from svlm.training.prepare import build_model

    folder = save_model(tmp_path / "model", build_model(make_train_cfg(), tokenizer), tokenizer, {"finished": True})
    where = [f"ckpt={folder}", "max_new_tokens=3", "hardware=cpu", *path_overrides(tmp_path / "asked", cache_dir)]
    two = f"images=[{pictures / '0.png'},{pictures / '1.png'}]"
    answer = ask(load_infer_config(compose("infer", [*where, two, "prompt=Which is red?"])))
    saved = json.loads((tmp_path / "asked" / "run" / "answer.json").read_text())
    assert saved["answer"] == answer and saved["images"] == [str(pictures / "0.png"), str(pictures / "1.png")]
    with pytest.raises(FileNotFoundError, match=r"images\[1\]=.*nowhere.png.*no such file"):
        ask(load_infer_config(compose("infer", [*where, f"images=[{pictures / '0.png'},{pictures / 'nowhere.png'}]"])))
    with pytest.raises(ConfigError, match="prompt has 3 <image> tag"):
        ask(load_infer_config(compose("infer", [*where, two, "prompt='<image> <image> <image>'"])))
    with pytest.raises(ConfigError, match="image= and images= both set"):
        load_infer_config(compose("infer", [*where, two, f"image={pictures / '0.png'}"]))


def test_both_stages_train_and_score_on_two_image_records(make_train_cfg, shapes_root, tmp_path, cache_dir):
    """Records pairing two pictures of the shapes data: stage=llava (the encoder frozen, so
    each image's features come from the feature cache) trains, and eval.py scores it."""
    from conftest import compose, path_overrides

    from svlm.config import load_eval_config
    from svlm.evaluation.evaluate import evaluate
    from svlm.model_folder import load_model
    from svlm.training.loop import train

    for task in ("pretrain", "sft"):
        for split in ("train", "val"):
            rows = [json.loads(line) for line in (shapes_root / f"{task}_{split}.jsonl").read_text().splitlines()]
            paired = []
            for a, b in zip(rows, rows[1:] + rows[:1]):
                first, *rest = a["conversations"]
                text = first["content"].replace("<image>", "").strip()
                question = {**first, "content": f"<image>\n<image>\nThe first: {text}"}
                paired.append(json.dumps({"image": [a["image"], b["image"]], "conversations": [question, *rest]}))
            (tmp_path / f"{task}_{split}.jsonl").write_text("\n".join(paired) + "\n")
    data = ["data.kind=files", f"data.root={tmp_path}", f"data.image_dir={shapes_root / 'images'}",
            "data.test_file=sft_val.jsonl", "data.on_error=raise"]  # fmt: skip
    cfg = make_train_cfg(*data, stage="llava", steps=2, run_dir=tmp_path / "run")
    stage1, stage2 = train(cfg)
    model, _, _ = load_model(stage2)
    bad = json.loads((tmp_path / "run" / "stage2" / "bad_samples.json").read_text())
    assert bad["total"] == 0
    where = path_overrides(tmp_path / "scored", cache_dir)
    scores = evaluate(load_eval_config(compose("eval", [f"ckpt={stage2}", *where, "max_test=4", "max_new_tokens=4",
                                                        "hardware=cpu"])))  # fmt: skip
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["val_loss"] > 0
