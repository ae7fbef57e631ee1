"""Asking a model about a picture, streaming the answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from svlm.config import InferConfig
from svlm.data.chat import ChatEncoder
from svlm.data.images import open_image
from svlm.hardware import autocast_for, pick_device
from svlm.inference.generation import TextStreamer, generate
from svlm.model_folder import load_model, resolve_model
from svlm.models.vision import ImageProcessor


def ask(cfg: InferConfig) -> str:
    folder = resolve_model(cfg.ckpt, cfg.paths.outputs)
    device = pick_device(cfg.hardware)
    model, tokenizer, _ = load_model(folder, device)
    encoder = ChatEncoder.for_model(tokenizer, model)
    pixel_values = None
    if cfg.image is not None:
        if not Path(cfg.image).is_file():
            raise FileNotFoundError(f"image={cfg.image!r}: no such file")
        image = open_image(cfg.image, where=f"image={cfg.image}")
        pixel_values = ImageProcessor(model.cfg.vision)(image).unsqueeze(0).to(device)
    input_ids = torch.tensor([encoder.prompt(cfg.prompt, image=cfg.image is not None)], device=device)
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
            generator=generator,
        )
    answer = tokenizer.decode(ids, skip_special_tokens=True)
    sys.stdout.write(answer[len(streamer.printed) :] + "\n")
    out = Path(cfg.paths.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answer.json").write_text(
        json.dumps(
            {"model": str(folder), "image": cfg.image, "prompt": cfg.prompt, "answer": answer},
            ensure_ascii=False,
            indent=2,
        )
    )
    return answer
