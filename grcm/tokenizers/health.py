"""SID health: is the code space used, balanced, collision-free and semantic?

All metrics are computed from the SID prefix codes *before* the unique token
(N, L) and, for the semantic check, from the item features. Keys of
``sid_health``:

- ``level{l}_utilisation``: fraction of level-l codes used by at least one item.
- ``level{l}_entropy_bits`` / ``level{l}_normalised_entropy``: entropy of the level-l
  code distribution, in bits and divided by log2(vocab size).
- ``collision_rate``: 1 - distinct prefixes / N (0 = every item has its own prefix).
- ``colliding_item_fraction``: fraction of items whose prefix is shared with another item.
- ``largest_bucket``: most items sharing one prefix.
- ``gini``: FORGE's Gini coefficient of occupancy over the occupied prefixes.
- ``recon_mse``: reconstruction error of the RQ-VAE (when given).
- ``prefix{l}_same_similarity`` / ``prefix{l}_different_similarity``: mean cosine similarity of
  item pairs that share the first l+1 tokens vs. pairs that do not; ``random_pair_similarity``:
  over uniformly random pairs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from grcm.tokenizers.unique_token import prefix_groups


def gini_coefficient(bucket_sizes: torch.Tensor | np.ndarray) -> float:
    """FORGE Gini of occupancy over occupied buckets (sizes > 0), sorted ascending c_(1) <= ... <= c_(n):

    G = (n + 1) / n - 2 * sum_i (n + 1 - i) * c_(i) / (n * sum c).   0 = perfectly even.
    """
    sizes = np.sort(np.asarray(bucket_sizes, dtype=np.float64))
    sizes = sizes[sizes > 0]
    n = len(sizes)
    if n == 0:
        return 0.0
    rank = np.arange(1, n + 1)
    return float((n + 1) / n - 2.0 * np.sum((n + 1 - rank) * sizes) / (n * sizes.sum()))


def code_usage(codes: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Utilisation and entropy of one level's codes (N,) in [0, vocab_size)."""
    counts = torch.bincount(codes.cpu(), minlength=vocab_size).double()
    probabilities = counts[counts > 0] / counts.sum()
    entropy_bits = float(-(probabilities * probabilities.log2()).sum()) + 0.0  # + 0.0: no "-0.0"
    return {
        "utilisation": float((counts > 0).sum()) / vocab_size,
        "entropy_bits": entropy_bits,
        "normalised_entropy": entropy_bits / math.log2(vocab_size) if vocab_size > 1 else 1.0,
    }


def _cosine(features: np.ndarray | torch.Tensor, left: np.ndarray, right: np.ndarray) -> float:
    """Mean cosine similarity of rows left[i] and right[i] of features (N, D)."""
    if len(left) == 0:
        return float("nan")
    a = torch.as_tensor(np.asarray(features[left]), dtype=torch.float32)
    b = torch.as_tensor(np.asarray(features[right]), dtype=torch.float32)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def prefix_pair_similarity(
    features: np.ndarray | torch.Tensor,
    group: np.ndarray,
    num_pairs: int,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Mean cosine similarity of random pairs in the same group vs. in different groups.

    features (N, D); group (N,) int: the prefix group of each item. Same-group pairs take a
    uniform anchor among items whose group holds >= 2 items and a uniform other member.
    """
    n = len(group)
    order = np.argsort(group, kind="stable")
    _, starts, sizes = np.unique(group[order], return_index=True, return_counts=True)
    position_in_sorted = np.empty(n, dtype=np.int64)
    position_in_sorted[order] = np.arange(n)
    group_rank = np.searchsorted(np.unique(group), group)
    item_group_size = sizes[group_rank]
    eligible = np.flatnonzero(item_group_size >= 2)
    same = float("nan")
    if len(eligible):
        anchors = rng.choice(eligible, size=num_pairs)
        start = starts[group_rank[anchors]]
        size = item_group_size[anchors]
        offset = rng.integers(0, size - 1)
        anchor_offset = position_in_sorted[anchors] - start
        offset = offset + (offset >= anchor_offset)
        partners = order[start + offset]
        same = _cosine(features, anchors, partners)
    left = rng.integers(0, n, size=2 * num_pairs)
    right = rng.integers(0, n, size=2 * num_pairs)
    keep = np.flatnonzero(group[left] != group[right])[:num_pairs]
    different = _cosine(features, left[keep], right[keep])
    return same, different


def sid_health(
    prefix_codes: torch.Tensor,
    vocab_sizes: list[int],
    features: np.ndarray | torch.Tensor | None = None,
    *,
    recon_mse: float | None = None,
    num_pairs: int = 10000,
    seed: int = 0,
) -> dict[str, float]:
    """Health metrics of prefix_codes (N, L) with per-level vocab_sizes (L); see the module docstring."""
    codes = prefix_codes.cpu().long()
    n, levels = codes.shape
    if len(vocab_sizes) != levels:
        raise ValueError(f"{len(vocab_sizes)} vocab sizes for {levels} code levels")
    health: dict[str, float] = {"num_items": float(n)}
    for level in range(levels):
        for key, value in code_usage(codes[:, level], vocab_sizes[level]).items():
            health[f"level{level}_{key}"] = value
    _, sizes = prefix_groups(codes)
    health["num_unique_prefixes"] = float(len(sizes))
    health["collision_rate"] = 1.0 - len(sizes) / n
    health["colliding_item_fraction"] = float(sizes[sizes > 1].sum()) / n
    health["largest_bucket"] = float(sizes.max())
    health["gini"] = gini_coefficient(sizes)
    if recon_mse is not None:
        health["recon_mse"] = float(recon_mse)
    if features is not None and n > 1:
        rng = np.random.default_rng(seed)
        left = rng.integers(0, n, size=num_pairs)
        right = (left + rng.integers(1, n, size=num_pairs)) % n
        health["random_pair_similarity"] = _cosine(features, left, right)
        for depth in range(levels):
            group, _ = prefix_groups(codes[:, : depth + 1])
            same, different = prefix_pair_similarity(features, group.numpy(), num_pairs, rng)
            health[f"prefix{depth}_same_similarity"] = same
            health[f"prefix{depth}_different_similarity"] = different
    return health
