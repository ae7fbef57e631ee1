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
    ]) + "\n")  # fmt: skip
    processor, bad = ImageProcessor(VisionConfig(image_size=32, patch_size=8)), BadSamples()
    encoder = ChatEncoder(tokenizer, num_image_tokens=4, image_placement="inline")
    ds = ChatDataset([data], pictures, encoder, processor, 512, "skip", bad, max_images=8)
    assert [ex.where.rsplit(":", 1)[1] for ex in ds.examples] == ["1", "2", "6"]
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
