"""High-resolution tiles (model.vision.tiles, svlm/models/tiles.py): the grid,
the views, the token layout, the model's slots, training, inference and the
export's refusal."""

import json

import pytest
import torch
from PIL import Image

from svlm.data.chat import ChatEncoder
from svlm.errors import ConfigError
from svlm.models.tiles import GLOBAL, Tiling, layout, separator
from svlm.models.vision import ImageProcessor, VisionConfig


def picture(width: int, height: int) -> Image.Image:
    """Four coloured quadrants, so every tile differs."""
    im = Image.new("RGB", (width, height), "white")
    for k, colour in enumerate(["red", "green", "blue", "yellow"]):
        x, y = (k % 2) * width // 2, (k // 2) * height // 2
        im.paste(colour, (x, y, x + width // 2, y + height // 2))
    return im


def test_a_1024x768_picture_at_2x2_gives_five_views():
    cfg = VisionConfig(image_size=64, patch_size=8, tiles=[2, 2])
    processor = ImageProcessor(cfg)
    im = picture(1024, 768)
    views, grid = processor.views(im)
    assert grid == (2, 2) and views.shape == (5, 3, 64, 64)  # 4 tiles and the thumbnail
    whole = im.resize((128, 128), resample=Image.Resampling.BICUBIC)
    torch.testing.assert_close(views[1], processor(whole.crop((64, 0, 128, 64))))  # row 1, column 2
    torch.testing.assert_close(views[4], processor(im))  # the global thumbnail: the whole picture
    assert processor.views(picture(60, 50))[1] == (1, 1)  # fits one tile: one view, as without tiles
    assert processor.views(picture(60, 50))[0].shape == (1, 3, 64, 64)
    assert Tiling(2, 3, 64).grid(1000, 100) == (2, 3) and Tiling(4, 4, 64).grid(130, 64) == (1, 3)
    assert ImageProcessor(VisionConfig(image_size=64, patch_size=8)).views(im)[0].shape == (1, 3, 64, 64)


def test_the_token_layout(tokenizer):
    enc = ChatEncoder(tokenizer, num_image_tokens=4, image_placement="first", tiling=Tiling(2, 2, 32))
    ids = enc.image_ids((2, 2))
    assert ids.count(enc.image_id) == 5 * 4
    text = tokenizer.decode([i for i in ids if i != enc.image_id])
    assert text == "<row_1_col_1><row_1_col_2>\n<row_2_col_1><row_2_col_2>\n<global_img>"
    assert layout((1, 1)) == [None] and enc.image_ids((1, 1)) == [enc.image_id] * 4
    assert layout((1, 2)) == [separator(1, 1), None, separator(1, 2), None, "\n", GLOBAL, None]
    # each <image> of a conversation takes its own grid's layout, in order
    both, _ = enc.encode([("user", "<image> and <image>?"), ("assistant", "yes")], grids=[(1, 2), (1, 1)])
    assert both.count(enc.image_id) == (3 + 1) * 4
    with pytest.raises(ValueError, match="every image needs its grid"):
        enc.encode([("user", "<image> and <image>?"), ("assistant", "yes")], grids=[(1, 2)])


def test_each_view_fills_the_slots_after_its_separator(make_train_cfg, tokenizer):
    from svlm.training.prepare import build_model

    model = build_model(make_train_cfg("model.vision.tiles=[2,2]"), tokenizer).eval()
    enc = ChatEncoder.for_model(tokenizer, model)
    assert enc.tiling == Tiling(2, 2, 32)
    views, grid = ImageProcessor(model.cfg.vision).views(picture(64, 64))
    ids, _ = enc.encode([("user", "<image>\nWhat is it?"), ("assistant", "red")], grids=[grid])
    ids = torch.tensor([ids])
    slots = (ids[0] == enc.image_id).nonzero().squeeze(1)  # (5 * N,)
    n = model.num_image_tokens
    with torch.no_grad():
        embeds, visual = model.embed(ids, views), model.encode_images(views)  # (1, T, E), (5, N, E)
    for k in range(5):
        torch.testing.assert_close(embeds[0, slots[k * n : (k + 1) * n]], visual[k])
    gaps = (slots[1:] - slots[:-1] > 1).nonzero().squeeze(1) + 1  # where a separator's text interrupts the slots
    assert len(gaps) == 4 and all(int(g) % n == 0 for g in gaps)


@pytest.fixture
def large_pictures(shapes_root, tmp_path):
    """The shapes records with their pictures enlarged to 64 x 48 (2 x 2 tiles of 32 px)."""
    images = tmp_path / "images"
    images.mkdir()
    for task in ("pretrain", "sft"):
        for split in ("train", "val"):
            lines = (shapes_root / f"{task}_{split}.jsonl").read_text().splitlines()
            for line in lines:
                name = json.loads(line)["image"]
                if not (images / name).is_file():
                    Image.open(shapes_root / "images" / name).resize((64, 48)).save(images / name)
            (tmp_path / f"{task}_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_training_with_tiles_then_eval_infer_and_export(make_train_cfg, large_pictures, tmp_path, cache_dir,
                                                        capsys):  # fmt: skip
    from conftest import compose, path_overrides

    from svlm.config import load_eval_config, load_infer_config
    from svlm.data.check import check
    from svlm.evaluation.evaluate import evaluate
    from svlm.export import check_exportable
    from svlm.inference.ask import ask
    from svlm.model_folder import load_model
    from svlm.training.loop import train

    data = ["data.kind=files", f"data.root={large_pictures}", "data.test_file=sft_val.jsonl", "data.on_error=raise",
            "model.vision.tiles=[2,2]"]  # fmt: skip
    cfg = make_train_cfg(*data, stage="llava", steps=2, run_dir=tmp_path / "run")
    report = check(cfg)
    assert {r["file"].rsplit("/", 1)[1]: r["tile_grids"] for r in report["files"]}["sft_train.jsonl"] == {"2x2": 64}
    stage1, stage2 = train(cfg)
    out = capsys.readouterr().out
    assert "tiles: up to 2 x 2 of 32 px and a thumbnail; an image takes 4 to" in out
    assert "feature cache" not in out  # off with tiles: the views are not image files
    model, _, _ = load_model(stage2)
    assert model.cfg.vision.tiles == [2, 2]
    where = path_overrides(tmp_path / "scored", cache_dir)
    scores = evaluate(load_eval_config(compose("eval", [f"ckpt={stage2}", *where, "max_test=4", "max_new_tokens=4",
                                                        "hardware=cpu"])))  # fmt: skip
    assert scores["val_loss"] > 0
    picture(1024, 768).save(tmp_path / "big.png")
    answer = ask(load_infer_config(compose("infer", [f"ckpt={stage2}", f"image={tmp_path / 'big.png'}",
                                                     "prompt=What shape?", "max_new_tokens=3", *where])))  # fmt: skip
    assert isinstance(answer, str)
    with pytest.raises(ConfigError, match=r"image tiles \(model.vision.tiles=\[2, 2\]\)"):
        check_exportable(model.cfg)


def test_tile_budget_and_cost(make_train_cfg, tokenizer):
    from svlm.flops import step_flops
    from svlm.memory import estimate_memory
    from svlm.training.prepare import build_model, check_tile_budget

    cfg = make_train_cfg("model.vision.tiles=[8,8]")
    model = build_model(cfg, tokenizer)
    with pytest.raises(ConfigError, match=r"tiles=\[8, 8\]: an image of that grid takes \d+ tokens \(65 views"):
        check_tile_budget(ChatEncoder.for_model(tokenizer, model), 256)
    plain, tiled = make_train_cfg(stage="stage1"), make_train_cfg("model.vision.tiles=[2,2]", stage="stage1")
    one, five = estimate_memory(plain, plain.stages()[0]), estimate_memory(tiled, tiled.stages()[0])
    assert five.activations > one.activations  # the encoder runs on 5 views a sample
    flat = build_model(plain, tokenizer)
    with_views = step_flops(flat, 2, 64, views=5) - step_flops(flat, 2, 64, views=1)
    from svlm.flops import projector_flops, vision_flops

    per_view = 3 * vision_flops(flat.vision.dinov2.config, flat.vision.num_patches, 1) + 3 * projector_flops(flat, 1)
    dv = flat.vision.dinov2.config
    patch_embed = flat.vision.num_patches * 2 * 3 * dv.patch_size**2 * dv.hidden_size
    assert with_views == pytest.approx(2 * 4 * (per_view - patch_embed))  # every part trains: fwd + 2 x bwd


def test_the_server_tiles_a_large_image(make_train_cfg, tokenizer, tmp_path, cache_dir):
    import openai
    from test_serve import data_url, png, running, serve_config

    from svlm.model_folder import save_model
    from svlm.training.prepare import build_model

    model = build_model(make_train_cfg("model.vision.tiles=[2,2]"), tokenizer)
    folder = save_model(tmp_path / "model", model, tokenizer, {"stage": "stage2", "finished": True})
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png((64, 64)))}},
                                           {"type": "text", "text": "What colour?"}]}  # fmt: skip
    with running(serve_config(folder, tmp_path, cache_dir)) as (url, engine):
        prompt = engine.prepare({"model": "svlm", "messages": [message]})
        assert prompt.pixel_values.shape == (5, 3, 32, 32)  # 2 x 2 tiles and the thumbnail
        assert int((prompt.input_ids == model.cfg.image_token_id).sum()) == 5 * model.num_image_tokens
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="svlm", messages=[message], max_tokens=3)
        assert reply.choices[0].finish_reason in ("stop", "length")
