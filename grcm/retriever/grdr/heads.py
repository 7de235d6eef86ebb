"""GRDR's output head over a codebook shared with the tokenizer: scaled cosine logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CosineCodeHead(nn.Module):
    """Logits ``s * cos(h, E)`` over a (K, d) codebook ``E`` shared with the tokenizer; s learned, clamped.

    Args:
        codebook: the shared (K, d) Parameter.
        init_scale, min_scale, max_scale: s at start and its clamp range (GRDR: [20, 100]).
    """

    def __init__(self, codebook: nn.Parameter, init_scale: float = 30.0, min_scale: float = 20.0,
                 max_scale: float = 100.0) -> None:
        super().__init__()
        self.codebook = codebook
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.min_scale, self.max_scale = min_scale, max_scale

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(self.min_scale, self.max_scale)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B', d) -> (B', K)."""
        return self.scale * F.normalize(hidden, dim=-1) @ F.normalize(self.codebook, dim=-1).T
