"""The vision-language model: encoder -> projector -> visual tokens spliced
into the text embeddings at the image placeholder positions -> language model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from svlm.models.kv_cache import KVCache
from svlm.models.language_model import LanguageModel, LMConfig
from svlm.models.object_head import ObjectHead
from svlm.models.packed_attention import Packing
from svlm.models.projector import ProjectorConfig, build_projector
from svlm.models.vision import VisionConfig, VisionEncoder

IGNORE_INDEX = -100  # a label the loss skips (the chat encoder's labels outside assistant turns)


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    image_token_id: int = -1  # set from the tokenizer
    image_placement: str = "first"  # where prompts put a user turn's images (svlm/data/chat.py)
    chat_format: str = "ours"  # "ours" or "tokenizer": the tokenizer's own chat template (svlm/data/lm_template.py)
    stop_ids: list[int] = field(default_factory=list)  # generation also stops here (a pretrained LM's eos ids)
    object_classes: list[int] = field(default_factory=list)  # an object head's classes an attribute ([]: none)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VLMConfig:
        return cls(
            vision=VisionConfig(**d["vision"]),
            projector=ProjectorConfig(**d["projector"]),
            lm=LMConfig(**d["lm"]),
            image_token_id=d["image_token_id"],
            image_placement=d.get("image_placement", "first"),  # folders from before it was recorded: first
            chat_format=d.get("chat_format", "ours"),
            stop_ids=list(d.get("stop_ids", [])),
            object_classes=list(d.get("object_classes", [])),
        )


@dataclass
class VLMOutput:
    # Without labels: (B, T, V), every position. With labels: (N, V), only at the
    # N positions whose next token is supervised (target_index), in that order.
    logits: torch.Tensor
    loss: torch.Tensor | None  # cross entropy + MoE balancing loss
    ce_loss: torch.Tensor | None  # cross entropy alone, mean over supervised tokens
    n_tokens: int  # supervised tokens in the batch (N)
    target_index: torch.Tensor | None = None  # (N,) flat positions b * T + t of those logits
    targets: torch.Tensor | None = None  # (N,) the label each of them predicts (the token at t + 1)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (N,) flat positions b * T + t whose next label (t + 1) is
    supervised: the only places the loss needs logits at. The collator computes
    them on the CPU (a GPU would have to stop and report how many there are)."""
    wanted = torch.zeros_like(labels, dtype=torch.bool)
    wanted[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return wanted.flatten().nonzero().squeeze(1)


def check_slots(slots: torch.Tensor, expected: int, given: str) -> None:
    """The image placeholders must match the visual tokens given. On the CPU a
    clear ValueError; on a GPU an assertion queued on the device, so the step
    does not wait for it (a mismatch stops the run at the next sync)."""
    if slots.device.type == "cpu":
        n = int(slots.sum())
        if n != expected:
            raise ValueError(f"input has {n} image placeholder tokens but {given}")
    else:
        torch._assert_async(slots.sum() == expected, f"image placeholder tokens do not match: {given}")


def check_targets(target_index: torch.Tensor, B: int, T: int) -> None:
    """Given target positions must each have a next token in their own row (as
    check_slots: a ValueError on the CPU, an assertion queued on a GPU)."""
    ok = ((target_index % T) < T - 1).all() & (target_index >= 0).all() & (target_index < B * T).all()
    if ok.device.type == "cpu":
        if not ok:
            raise ValueError(f"target_index holds positions outside 0..{T - 2} of the {B} rows of {T} tokens")
    else:
        torch._assert_async(ok, "target_index holds positions without a next token in their row")


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, dinov2_config=None, lm: LanguageModel | None = None) -> None:
        """dinov2_config: build the encoder from this (random weights, to be
        loaded next) instead of cfg.vision; used when loading a saved model.
        lm: a language model already built (a pretrained one), of config cfg.lm."""
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision, dinov2_config)
        self.lm = lm if lm is not None else LanguageModel(cfg.lm)
        self.projector = build_projector(
            cfg.projector, self.vision.hidden_size, cfg.lm.embed_dim, self.vision.num_patches + cfg.vision.use_cls
        )
        self.freeze_vision = False
        # stage.object_loss: an auxiliary read-out of each visual token's object (svlm/models/object_head.py)
        self.object_head = ObjectHead(cfg.lm.embed_dim, cfg.object_classes) if cfg.object_classes else None
        self.object_weight = 0.0  # its weight in the loss (the stage sets it)

    def compile_blocks(self) -> None:
        """torch.compile each transformer block, of the language model and of the
        vision encoder (hardware.compile): the fused kernels of a block serve
        every layer, at one compilation (a second for a new length). The rest
        (embedding, projector, head and loss) stays eager."""
        for block in (*self.lm.layers, *self.vision.dinov2.encoder.layer):
            block.compile()

    @property
    def num_image_tokens(self) -> int:
        """How many placeholder ids one <image> expands to."""
        return self.projector.num_tokens

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> visual tokens (B, N, embed_dim)."""
        if self.freeze_vision:
            self.vision.eval()  # a frozen encoder always runs in eval mode, without gradients
            with torch.no_grad():
                feats = self.vision(pixel_values)
        else:
            feats = self.vision(pixel_values)
        return self.project(feats)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoder features (n_images, P, Dv) -> visual tokens (n_images, N, E), in the
        projector's dtype (a frozen fp32 encoder feeds a bf16 projector under adamw_offload)."""
        return self.projector(feats.to(next(self.projector.parameters()).dtype))

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, vision_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text embeddings with every image placeholder replaced by a visual token.
        The images come as pixel_values (n_images, 3, S, S), or as vision_features
        (n_images, P, Dv): what the vision encoder outputs for them (from the
        feature cache, svlm/data/feature_cache.py), which skips the encoder."""
        return self.splice(input_ids, pixel_values, vision_features)[0]

    def splice(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, vision_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embed's embeddings (B, T, E), the visual tokens (n_images, N, E) or None without images)."""
        embeds = self.lm.embed(input_ids)  # (B, T, E)
        slots = input_ids == self.cfg.image_token_id  # (B, T)
        has_pixels = pixel_values is not None and pixel_values.shape[0] > 0
        has_features = vision_features is not None and vision_features.shape[0] > 0
        if has_pixels and has_features:
            raise ValueError("give the images as pixel_values or as vision_features, not both")
        if not (has_pixels or has_features):
            check_slots(slots, 0, "no image was given")
            return embeds, None
        if has_features:
            visual = self.project(vision_features)  # (n_images, N, E)
        else:
            visual = self.encode_images(pixel_values.to(embeds.dtype))  # (n_images, N, E)
        check_slots(slots, visual.shape[0] * visual.shape[1],
                    f"{visual.shape[0]} image(s) x {visual.shape[1]} visual tokens were given")  # fmt: skip
        # Images fill the placeholder slots in reading order (row by row).
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), visual.to(embeds.dtype).reshape(-1))
        return embeds, visual

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        vision_features: torch.Tensor | None = None,  # instead of pixel_values: see embed
        target_index: torch.Tensor | None = None,  # target_positions(labels), if already known
        valid: list[int] | None = None,  # with a cache: each row's real tokens, the rest right padding
        logits_at: torch.Tensor | None = None,  # (B,): logits (B, V) at one position a row (a prefill)
        positions: torch.Tensor | None = None,  # packed rows (svlm/data/packing.py): (B, T) within each sample
        packing: Packing | None = None,  # and which tokens see which
        object_targets: torch.Tensor | None = None,  # (n_images, N, A): each visual token's object (ObjectHead)
    ) -> VLMOutput:
        """Without labels: logits at every position (or at logits_at). With
        labels: the next-token loss, with logits computed only where a
        supervised token follows: the picture's slots and the prompt need no
        vocabulary-sized output; with object_targets and an object weight,
        plus the object head's loss times that weight."""
        embeds, visual = self.splice(input_ids, pixel_values, vision_features)
        out = self.lm(inputs_embeds=embeds, cache=cache, head=labels is None, valid=valid, logits_at=logits_at,
                      positions=positions, packing=packing)  # fmt: skip
        if labels is None:
            return VLMOutput(out.logits, None, None, 0)
        if target_index is None:
            target_index = target_positions(labels)
        else:
            check_targets(target_index, *labels.shape)
        hidden = out.hidden.reshape(-1, out.hidden.shape[-1]).index_select(0, target_index)  # (N, D)
        # Next-token prediction: the logit at t predicts the label at t + 1 (same row: t < T - 1).
        targets = labels.reshape(-1).index_select(0, target_index + 1)  # (N,)
        logits = self.lm.lm_head(hidden)  # (N, V)
        n_tokens = target_index.shape[0]
        ce_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        ce = ce_sum / max(n_tokens, 1)  # a batch with no supervised token gives 0, not NaN
        aux = out.aux_loss
        if self.object_head is not None and self.object_weight and object_targets is not None and visual is not None:
            aux = aux + self.object_weight * self.object_head.loss(visual, object_targets)
        return VLMOutput(logits, ce + aux, ce, n_tokens, target_index, targets)
