"""Building a trie from a SID table: the states of every depth, each level's layout, the leaves' items.

:func:`build_trie_parts` sorts the ``(N, L)`` SID table lexicographically, numbers the distinct
prefixes of every length (the states, lexicographic order), and picks each level's layout
(:mod:`grcm.decoding.trie_levels`): dense for the leading levels whose ``S x V`` table is small,
counter wherever the child codes are ``0 .. c - 1``, else the smaller of bitmap and keys. Full SIDs
map to items through a CSR ``leaf_item_ptr`` / ``leaf_items`` (items ascending within a leaf), left
out when every leaf holds exactly one item. Every integer tensor is stored in the narrowest of int16 /
int32 / int64 that holds all values it can be asked about (``-1`` included for dense tables, every
possible ``state * V + code`` query for keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from grcm.decoding.trie_levels import BitmapLevel, CounterLevel, DenseLevel, KeysLevel, TrieLevel

__all__ = ["DEFAULT_BITMAP_MAX_VOCAB", "TrieParts", "build_trie_parts"]

DENSE_ENTRIES_CEILING = 1 << 20
DENSE_ENTRIES_FLOOR = 4096
DENSE_ENTRIES_PER_ROW = 1
DEFAULT_BITMAP_MAX_VOCAB = 256


class TrieParts(NamedTuple):
    """The constructor arguments of :class:`~grcm.decoding.trie.SIDTrie` (see its attributes)."""

    vocab_sizes: list[int]
    level_sizes: list[int]
    levels: list[TrieLevel]
    leaf_items: Tensor
    leaf_item_ptr: Tensor | None
    num_items: int


def build_trie_parts(
    codes: Tensor | np.ndarray,
    vocab_sizes: Sequence[int],
    *,
    row_items: Tensor | np.ndarray | None,
    dense_levels: int | None,
    dense_max_entries: int | None,
    bitmap_max_vocab: int | None,
    counter_levels: bool,
) -> TrieParts:
    """What a :class:`~grcm.decoding.trie.SIDTrie` holds, built from a SID table (lexsort + run boundaries).

    The arguments (every one given: the defaults are :meth:`SIDTrie.from_codes`'s) are
    documented there.

    Returns:
        :class:`TrieParts` with CPU tensors (``SIDTrie.from_codes`` makes them a trie).
    """
    codes_np = _as_int64_numpy(codes, "codes")
    if codes_np.ndim != 2:
        raise ValueError(
            f"SIDTrie.from_codes: codes must be a 2-D (N, L) table, got shape {codes_np.shape}"
        )
    num_rows, num_levels = codes_np.shape
    vocab = [int(v) for v in vocab_sizes]
    if num_rows == 0 or num_levels == 0:
        raise ValueError(
            f"SIDTrie.from_codes: codes is empty (shape {codes_np.shape}); need N >= 1 and L >= 1"
        )
    if len(vocab) != num_levels:
        raise ValueError(
            f"SIDTrie.from_codes: codes has {num_levels} levels but vocab_sizes has {len(vocab)} entries "
            f"({vocab}); pass one vocabulary size per SID level"
        )
    for level, size in enumerate(vocab):
        column = codes_np[:, level]
        low, high = int(column.min()), int(column.max())
        if size < 1 or low < 0 or high >= size:
            raise ValueError(
                f"SIDTrie.from_codes: level {level} codes span [{low}, {high}] but vocab_sizes[{level}] = {size}; "
                f"codes must lie in [0, vocab_size) (check the SID bundle's vocab_sizes)"
            )
    if row_items is None:
        items_np = np.arange(num_rows, dtype=np.int64)
    else:
        items_np = _as_int64_numpy(row_items, "row_items").reshape(-1)
        if items_np.shape[0] != num_rows:
            raise ValueError(
                f"SIDTrie.from_codes: row_items has {items_np.shape[0]} entries but codes has {num_rows} rows"
            )
        if int(items_np.min()) < 0:
            raise ValueError("SIDTrie.from_codes: row_items must be non-negative item indices")

    # Sort rows lexicographically by (code_0, ..., code_{L-1}, item); np.lexsort's primary key is last.
    order = np.lexsort((items_np, *[codes_np[:, level] for level in reversed(range(num_levels))]))
    sorted_codes = codes_np[order]
    sorted_items = items_np[order]

    level_sizes = [1]
    parents_per_level: list[np.ndarray] = []
    child_codes_per_level: list[np.ndarray] = []
    state_of_row = np.zeros(num_rows, dtype=np.int64)  # depth-0 state of every row: the root
    prefix_changed = np.zeros(num_rows, dtype=bool)
    prefix_changed[0] = True
    for level in range(num_levels):
        column = sorted_codes[:, level]
        prefix_changed[1:] |= column[1:] != column[:-1]
        first_rows = np.flatnonzero(prefix_changed)  # first row of every depth-(level+1) state
        parents_per_level.append(state_of_row[first_rows])
        child_codes_per_level.append(column[first_rows])
        state_of_row = np.cumsum(prefix_changed) - 1
        level_sizes.append(len(first_rows))

    if dense_levels is None:
        if dense_max_entries is None:
            dense_max_entries = min(
                max(DENSE_ENTRIES_PER_ROW * num_rows, DENSE_ENTRIES_FLOOR), DENSE_ENTRIES_CEILING
            )
        dense_levels = 0
        while (
            dense_levels < num_levels
            and level_sizes[dense_levels] * vocab[dense_levels] <= dense_max_entries
        ):
            dense_levels += 1
    if not 0 <= dense_levels <= num_levels:
        raise ValueError(
            f"SIDTrie.from_codes: dense_levels must lie in [0, {num_levels}], got {dense_levels}"
        )

    levels = [
        _build_level(
            parents_per_level[level],
            child_codes_per_level[level],
            level_sizes[level],
            vocab[level],
            dense=level < dense_levels,
            bitmap_max_vocab=bitmap_max_vocab,
            counter_levels=counter_levels,
        )
        for level in range(num_levels)
    ]

    # Leaves -> items: drop repeated (leaf, item) pairs, rows are already sorted by (leaf, item).
    leaf_of_row = state_of_row
    keep = np.ones(num_rows, dtype=bool)
    keep[1:] = (leaf_of_row[1:] != leaf_of_row[:-1]) | (sorted_items[1:] != sorted_items[:-1])
    leaf_items = sorted_items[keep]
    leaf_item_ptr = None
    if len(leaf_items) != level_sizes[-1]:  # some leaf holds several items
        ptr = np.searchsorted(leaf_of_row[keep], np.arange(level_sizes[-1] + 1), side="left")
        leaf_item_ptr = _narrowest(ptr, -1, len(leaf_items))
    return TrieParts(
        vocab_sizes=vocab,
        level_sizes=level_sizes,
        levels=levels,
        leaf_items=_narrowest(leaf_items, -1, int(leaf_items.max())),
        leaf_item_ptr=leaf_item_ptr,
        num_items=len(np.unique(items_np)),
    )


def _build_level(
    parents: np.ndarray,
    child_codes: np.ndarray,
    num_states: int,
    size: int,
    dense: bool,
    bitmap_max_vocab: int | None,
    counter_levels: bool,
) -> TrieLevel:
    """Pick and build one level's layout from its ``(E,)`` edges ``parent -> child_code``.

    Edges are sorted by (parent, code), so edge ``e`` leads to depth-``l + 1`` state ``e``.
    """
    num_children = len(parents)
    row_ptr = np.searchsorted(parents, np.arange(num_states + 1), side="left")
    common = {"vocab_size": size, "num_states": num_states, "max_branch": int(np.diff(row_ptr).max())}
    explicit_bits = bitmap_max_vocab is not None
    bits_allowed = size <= (bitmap_max_vocab if explicit_bits else DEFAULT_BITMAP_MAX_VOCAB)

    def bits() -> Tensor:
        return _packed_child_bits(parents, child_codes, num_states, size)

    if dense:
        table = np.full((num_states, size), -1, dtype=np.int64)
        table[parents, child_codes] = np.arange(num_children)
        return DenseLevel(
            dense_table=_narrowest(table, -1, num_children - 1),
            child_bits=bits() if bits_allowed else None,
            **common,
        )
    narrow_row_ptr = _narrowest(row_ptr, -1, num_children)
    if counter_levels and np.array_equal(child_codes, np.arange(num_children) - row_ptr[parents]):
        counter_bits = bits() if bits_allowed and explicit_bits else None
        return CounterLevel(row_ptr=narrow_row_ptr, child_bits=counter_bits, **common)
    key_dtype = _narrowest_dtype(-1, num_states * size - 1)  # every query state * V + code must fit
    if bits_allowed and not explicit_bits:  # bitmaps only where they take fewer bytes than the keys
        bitmap_bytes = num_states * ((size + 7) // 8) + narrow_row_ptr.numel() * narrow_row_ptr.element_size()
        bits_allowed = bitmap_bytes <= num_children * np.dtype(key_dtype).itemsize
    if bits_allowed:
        return BitmapLevel(row_ptr=narrow_row_ptr, child_bits=bits(), **common)
    keys = parents * size + child_codes
    return KeysLevel(child_keys=torch.from_numpy(keys.astype(key_dtype)), **common)


def _narrowest_dtype(low: int, high: int) -> type[np.signedinteger]:
    """The narrowest of int16 / int32 / int64 holding ``[low, high]``."""
    for dtype in (np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return np.int64


def _narrowest(values: np.ndarray, low: int, high: int) -> Tensor:
    """``values`` as a tensor of the narrowest dtype holding ``[low, high]`` (a range the caller guarantees)."""
    return torch.from_numpy(np.ascontiguousarray(values, dtype=_narrowest_dtype(low, high)))


def _packed_child_bits(parents: np.ndarray, child_codes: np.ndarray, num_states: int, size: int) -> Tensor:
    """``(num_states, ceil(size / 8))`` uint8: bit ``c % 8`` of byte ``c // 8`` set for every (parent, c) edge."""
    width = (size + 7) // 8
    flat = parents * width + child_codes // 8
    # (parent, code) pairs are unique, so summing distinct powers of two is a bitwise or
    packed = np.bincount(flat, weights=np.left_shift(1, child_codes % 8), minlength=num_states * width)
    return torch.from_numpy(packed.astype(np.uint8).reshape(num_states, width))


def _as_int64_numpy(values: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        if values.is_floating_point() or values.is_complex():
            raise TypeError(f"SIDTrie.from_codes: {name} must hold integers, got dtype {values.dtype}")
        return values.detach().cpu().numpy().astype(np.int64, copy=False)
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"SIDTrie.from_codes: {name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)
