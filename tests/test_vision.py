import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from svlm.errors import ConfigError
from svlm.models.vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageProcessor,
    VisionConfig,
    VisionEncoder,
    sync_with_checkpoint,
)

S = 48


def reference_processor(size: int):
    """transformers' processor for DINOv2 (the PIL backend without torchvision)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import BitImageProcessor

        return BitImageProcessor(
            size={"height": size, "width": size},
            do_center_crop=False,
            do_resize=True,
            resample=3,  # bicubic
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            do_rescale=True,
            do_normalize=True,
            do_convert_rgb=True,
        )


@pytest.mark.parametrize("shape", [(37, 53), (S, S), (120, 90)])
def test_matches_transformers_processor(shape):
    rng = np.random.default_rng(sum(shape))
    image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    ref = reference_processor(S)(image, return_tensors="pt")["pixel_values"][0]
    ours = ImageProcessor(VisionConfig(image_size=S, patch_size=8))(image)
    assert ours.shape == ref.shape == (3, S, S)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=0)


def test_normalisation_uses_config_statistics():
    image = Image.new("RGB", (S, S), (255, 0, 128))
    cfg = VisionConfig(image_size=S, patch_size=8, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    out = ImageProcessor(cfg)(image)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-5, rtol=0)


def _palette(size, transparent: bool) -> Image.Image:
    im = Image.new("P", size)
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    arr = np.zeros(size[::-1], dtype=np.uint8)
    arr[::2] = 1
    arr[1::2] = 2
    im.putdata(arr.flatten().tolist())
    if transparent:
        im.info["transparency"] = 0
    return im


def sixteen_bit(arr: np.ndarray) -> Image.Image:
    h, w = arr.shape
    im = Image.frombytes("I;16", (w, h), arr.astype("<u2").tobytes())
    assert im.mode == "I;16"
    return im


def _image(mode: str, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(0)
    w, h = size
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "P":
        return _palette(size, transparent=False)
    if mode == "P-transparent":
        return _palette(size, transparent=True)
    if mode == "I;16":
        return sixteen_bit(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "P-transparent", "I;16"])
@pytest.mark.parametrize("size", [(1, 1), (300, 17)])
def test_any_mode_and_size(mode, size):
    image = _image(mode, size)
    assert image.size == size
    out = ImageProcessor(VisionConfig(image_size=32, patch_size=8))(image)
    assert out.shape == (3, 32, 32)
    assert torch.isfinite(out).all()


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black
    out = ImageProcessor(VisionConfig(image_size=32, patch_size=8, image_mean=[0] * 3, image_std=[1] * 3))(image)
    torch.testing.assert_close(out, torch.ones(3, 32, 32))


def test_sixteen_bit_is_rescaled_not_clipped():
    arr = np.full((32, 32), 32768, dtype=np.uint16)  # mid grey in 16 bits
    out = ImageProcessor(VisionConfig(image_size=32, patch_size=8, image_mean=[0] * 3, image_std=[1] * 3))(
        sixteen_bit(arr)
    )
    assert 0.45 < out.mean().item() < 0.55


def test_encoder_random_config():
    cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2)
    enc = VisionEncoder(cfg).eval()
    feats = enc(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 16, 32)
    assert enc.num_patches == 16
    cls = VisionEncoder(VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, use_cls=True))
    assert cls(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32)


def test_encoder_from_dinov2_config_object():
    config = Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, patch_size=4, image_size=16)
    enc = VisionEncoder(VisionConfig(image_size=16, patch_size=4), dinov2_config=config).eval()
    assert enc(torch.randn(1, 3, 16, 16)).shape == (1, 16, 24)


def test_encoder_from_saved_folder(tmp_path):
    config = Dinov2Config(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, patch_size=4, image_size=32)
    saved = Dinov2Model(config).eval()
    saved.save_pretrained(tmp_path / "dino")
    # the config's own sizes are replaced by the checkpoint's
    cfg = sync_with_checkpoint(VisionConfig(path=str(tmp_path / "dino"), image_size=32, patch_size=8, hidden_size=8))
    assert (cfg.patch_size, cfg.hidden_size, cfg.num_layers) == (4, 48, 1)
    enc = VisionEncoder(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = enc(x)
    assert feats.shape == (2, 64, 48)
    # and the weights are the saved ones
    with torch.no_grad():
        ref = saved(pixel_values=x).last_hidden_state[:, 1:]
    torch.testing.assert_close(feats, ref)


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="model.vision.path"):
        VisionEncoder(VisionConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="model.vision.path"):
        sync_with_checkpoint(VisionConfig(path=str(tmp_path / "nope")))


def test_image_size_must_be_multiple_of_patch():
    with pytest.raises(ValueError, match="model.vision.image_size"):
        VisionConfig(image_size=30, patch_size=8)
