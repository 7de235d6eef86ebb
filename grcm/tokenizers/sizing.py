"""Codebook sizes from the corpus size: the rule that keeps ACE's unique-token level small as N grows.

An ACE SID is ``(coarse, fine_1, ..., fine_F, unique)``; the unique token numbers the items that share the first
``1 + F`` codes, so its vocabulary (the decoder's last output head, and the last level of the trie) is the largest
number of items on one prefix. With codebooks fixed at the 2,000-item recipe's 128 codes, ``128^3`` = 2.1M
prefixes hold 100M items at 48 items per prefix on average (thousands on the most popular ones), and the last
decoding step's head grows with N.

The rule: keep the coarse codebook, and give every fine level the smallest power of two, at least ``minimum``
(the validated 2k recipe's 128), for which the prefixes outnumber the items ``items_per_prefix`` to one on
average::

    fine = max(minimum, 2 ** ceil(log2((N / (coarse * items_per_prefix)) ** (1 / F))))

It changes nothing up to ``coarse * minimum**F * items_per_prefix`` items (2.1M at 128 / 128 / F = 2 / 1): every
trained corpus of this repository (2k-50k items) keeps the validated 128 codes, and the decoding benchmark
(``benchmarks/decode_throughput.py --sid-shape sized``) measures what it does at 10M and 100M items.
"""

from __future__ import annotations

import math

__all__ = ["fine_codebook_size", "sid_vocab_sizes"]


def fine_codebook_size(num_items: int, coarse: int = 128, fine_levels: int = 2, minimum: int = 128,
                       items_per_prefix: float = 1.0) -> int:
    """Codes per fine level for ``num_items`` items (see the module docstring for the rule).

    Raises:
        ValueError: on a non-positive size, codebook, level count or ``items_per_prefix``.
    """
    if num_items < 1 or coarse < 1 or fine_levels < 1 or minimum < 1 or not items_per_prefix > 0:
        raise ValueError(
            f"fine_codebook_size needs num_items, coarse, fine_levels, minimum >= 1 and items_per_prefix > 0; got "
            f"{num_items}, {coarse}, {fine_levels}, {minimum}, {items_per_prefix}"
        )
    needed = (num_items / (coarse * items_per_prefix)) ** (1.0 / fine_levels)
    return max(minimum, 2 ** math.ceil(math.log2(max(needed, 1.0))))


def sid_vocab_sizes(num_items: int, coarse: int = 128, fine_levels: int = 2, minimum: int = 128,
                    items_per_prefix: float = 1.0) -> list[int]:
    """``[coarse, fine, ..., fine]``: the code levels before the unique token, sized by :func:`fine_codebook_size`."""
    return [coarse] + [fine_codebook_size(num_items, coarse, fine_levels, minimum, items_per_prefix)] * fine_levels
