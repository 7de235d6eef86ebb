"""The item -> SID code table's footprint: each level's codes in the narrowest dtype.

With :meth:`grcm.decoding.trie.SIDTrie.nbytes` this is a generative index's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["sid_table_dtype", "sid_table_nbytes"]


def sid_table_dtype(vocab_size: int) -> torch.dtype:
    """Narrowest dtype for one SID level's codes: uint8 up to 256 codes, int16 up to 32768, else int32."""
    if vocab_size <= 1 << 8:
        return torch.uint8
    if vocab_size <= 1 << 15:
        return torch.int16
    return torch.int32


def sid_table_nbytes(codes: Tensor | np.ndarray, vocab_sizes: Sequence[int]) -> int:
    """Bytes of the item -> SID code table ``(N, L)`` with each level in :func:`sid_table_dtype`.

    With :meth:`SIDTrie.nbytes` this is the generative index's footprint.
    """
    shape = tuple(codes.shape)
    if len(shape) != 2 or shape[1] != len(vocab_sizes):
        raise ValueError(
            f"sid_table_nbytes: codes must be (N, L) with L = len(vocab_sizes) = {len(vocab_sizes)}, got shape {shape}"
        )
    return shape[0] * sum(torch.empty(0, dtype=sid_table_dtype(int(v))).element_size() for v in vocab_sizes)
