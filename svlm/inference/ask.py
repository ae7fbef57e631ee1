"""Asking a model about a picture (or several), streaming the answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from svlm.config import InferConfig
from svlm.data.chat import IMAGE_TOKEN, ChatEncoder
from svlm.data.images import open_image
from svlm.errors import ConfigError
from svlm.hardware import autocast_for, pick_device
from svlm.inference.generation import TextStreamer, generate, prepare_for_decoding
from svlm.model_folder import load_model, resolve_model
from svlm.models.vision import ImageProcessor


def ask(cfg: InferConfig) -> str:
    named = [(f"images[{k}]", f) for k, f in enumerate(cfg.images)] or [("image", cfg.image)] * (cfg.image is not None)
    for key, file in named:  # before the model loads: a wrong path costs nothing
        if not Path(file).is_file():
            raise FileNotFoundError(f"{key}={file!r}: no such file")
    files = [file for _, file in named]
    folder = resolve_model(cfg.ckpt, cfg.paths.outputs)
    device = pick_device(cfg.hardware)
    model, tokenizer, _ = load_model(folder, device)
    prepare_for_decoding(model, cfg.hardware.compile)
    encoder = ChatEncoder.for_model(tokenizer, model)
    tags = cfg.prompt.count(IMAGE_TOKEN) or len(files)  # without tags, each image gets one before the text
    if tags != len(files):
        raise ConfigError(f"prompt has {tags} <image> tag(s) for {len(files)} image(s): each tag takes one image")
    process = ImageProcessor(model.cfg.vision)
    pixel_values, grids = process.all_views([open_image(file, where=f"image={file}") for file in files])
    pixel_values = pixel_values.to(device) if pixel_values is not None else None
    prompt = encoder.prompt(cfg.prompt, image=len(files), grids=grids)
    input_ids = torch.tensor([prompt], device=device)
    streamer = TextStreamer(tokenizer, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with autocast_for(cfg.hardware, device):
        (ids,) = generate(
            model,
            input_ids,
            pixel_values,
            encoder.stop_ids,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            on_token=streamer,
            banned_ids=encoder.banned_ids,
            generator=generator,
        )
    answer = tokenizer.decode(ids, skip_special_tokens=True)
    sys.stdout.write(answer[len(streamer.printed) :] + "\n")
    out = Path(cfg.paths.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answer.json").write_text(
        json.dumps(
            {"model": str(folder), "image": cfg.image, "images": cfg.images, "prompt": cfg.prompt, "answer": answer},
            ensure_ascii=False,
            indent=2,
        )
    )
    return answer
