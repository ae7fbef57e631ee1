"""An auxiliary objective on the visual tokens (stage.object_loss): a linear
read-out of what each token's patch of the picture holds, one classifier an
attribute (e.g. colour, kind and size; class 0: no object there).

Trained from random weights, a vision encoder gets its signal only through
the language model's attention, and the language model learns to attend to
the visual tokens only once they carry something: early in training each
waits for the other. Supervising every token with the objects of its region
(the embedded data sets say where they drew what: svlm/data/drawing.py) makes
the tokens informative from the first steps. The head is a few thousand
parameters; exports leave it out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # a token whose region is not labelled


class ObjectHead(nn.Module):
    def __init__(self, dim: int, classes: list[int]) -> None:
        """classes: the number of classes of each attribute, "no object" included."""
        super().__init__()
        self.classes = list(classes)
        self.proj = nn.Linear(dim, sum(self.classes))

    def loss(self, visual: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """visual (n_images, N, D), targets (n_images, N, A) class ids (IGNORE: unlabelled)
        -> the mean over attributes of the cross entropy over labelled tokens."""
        logits = self.proj(visual.float()).split(self.classes, dim=-1)  # A x (n_images, N, C_a)
        losses = [
            F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[..., a].reshape(-1), ignore_index=IGNORE)
            for a, lg in enumerate(logits)
            if (targets[..., a] != IGNORE).any()
        ]
        return torch.stack(losses).mean() if losses else visual.sum() * 0.0

    @torch.no_grad()
    def predict(self, visual: torch.Tensor) -> torch.Tensor:
        """(n_images, N, D) -> (n_images, N, A): the most likely class of each attribute."""
        logits = self.proj(visual.float()).split(self.classes, dim=-1)
        return torch.stack([lg.argmax(-1) for lg in logits], dim=-1)
