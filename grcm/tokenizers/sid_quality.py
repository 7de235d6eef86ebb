"""FORGE's SID-quality metrics over the final SIDs (every level, the counter token included).

Keys of :func:`sid_quality` (all prefixed ``final_`` so they sit beside :func:`~grcm.tokenizers.health.sid_health`'s
metrics of the prefix codes in one health table, logged as ``sid/final_*``):

- ``final_collision_rate``: 1 - distinct SIDs / N over the full SIDs (0 = every item has its own SID).
- ``final_gini``: Gini coefficient of the items per occupied SID (0 = even occupancy).
- ``final_level{l}_utilisation``: fraction of level l's vocabulary used by at least one item.
- ``final_prefix{d}_collision_rate`` / ``final_prefix{d}_gini``: the same two over the prefixes of the first
  d + 1 levels (d = L - 1 is the full SID).
- ``final_max_items_per_sid``: most items sharing one full SID.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grcm.tokenizers.health import gini_coefficient
from grcm.tokenizers.unique_token import prefix_groups

__all__ = ["sid_quality"]


def sid_quality(codes: torch.Tensor, vocab_sizes: Sequence[int]) -> dict[str, float]:
    """FORGE's quality metrics of final SIDs codes (N, L) with per-level vocab_sizes (L); see the module docstring."""
    codes = codes.cpu().long()
    if codes.ndim != 2 or codes.shape[1] != len(vocab_sizes):
        raise ValueError(f"SID codes of shape {tuple(codes.shape)} need one vocab size per level; got "
                         f"{len(vocab_sizes)}")
    num_items, levels = codes.shape
    quality: dict[str, float] = {}
    if num_items == 0:
        return quality
    for level, size in enumerate(vocab_sizes):
        used = len(torch.unique(codes[:, level]))
        quality[f"final_level{level}_utilisation"] = used / int(size)
    for depth in range(levels):
        _, sizes = prefix_groups(codes[:, : depth + 1])
        quality[f"final_prefix{depth}_collision_rate"] = 1.0 - len(sizes) / num_items
        quality[f"final_prefix{depth}_gini"] = gini_coefficient(sizes)
    quality["final_collision_rate"] = quality[f"final_prefix{levels - 1}_collision_rate"]
    quality["final_gini"] = quality[f"final_prefix{levels - 1}_gini"]
    quality["final_max_items_per_sid"] = float(prefix_groups(codes)[1].max())
    return quality
