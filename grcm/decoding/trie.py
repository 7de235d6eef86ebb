"""Flat-tensor trie over semantic IDs: one compact layout per level.

A SID is a row of ``L`` codes; level ``l`` codes lie in ``[0, vocab_sizes[l])``.
The trie's states at depth ``l`` are the distinct length-``l`` prefixes of the
SID table, numbered in lexicographic order (depth 0 holds the single root,
state 0). Level ``l`` is the transition from depth ``l`` to depth ``l + 1``,
stored in one of four layouts, one class each (:mod:`grcm.decoding.trie_levels`:
dense table, counter, bitmap, sorted keys); :meth:`SIDTrie.from_codes` picks them
(:mod:`grcm.decoding.trie_builder`).

Full SIDs (depth-``L`` states, "leaves") map to items through a CSR
``leaf_item_ptr`` / ``leaf_items`` (items ascending within a leaf). Several
items may share a leaf when the SID table has no unique token, and one item
may own several leaves (multi-view SIDs) when ``row_items`` repeats it. When
every leaf holds exactly one item the pointers are the identity and are not
stored.

Every integer tensor is stored in the narrowest of int16 / int32 / int64 that
holds all values it can be asked about; queries widen what they gather
to int64. All queries (``valid_mask``, ``advance``, ``lookup``,
``items_of_leaves``) are vectorised over rows, run on the trie's device and
never synchronise with the host. Their cost depends on the number of rows and
the level's vocabulary, not on the number of items.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from grcm.decoding.sid_table import sid_table_dtype, sid_table_nbytes
from grcm.decoding.trie_builder import build_trie_parts
from grcm.decoding.trie_levels import LAYOUTS, TrieLevel

__all__ = ["LAYOUTS", "SIDTrie", "TrieLevel", "sid_table_dtype", "sid_table_nbytes"]


class SIDTrie:
    """Trie of valid SIDs stored as flat tensors. Build it with :meth:`from_codes`.

    Attributes:
        vocab_sizes: ``(V_0, ..., V_{L-1})`` code range per level.
        level_sizes: ``(S_0, ..., S_L)`` number of states per depth (``S_0 = 1``).
        levels: one :class:`TrieLevel` per level.
        dense_levels: levels ``0 .. dense_levels - 1`` use the dense layout.
        layouts: the layout name of every level.
        child_bits: per level, the ``(S_l, ceil(V_l / 8))`` uint8 packed child bitmaps or ``None``.
        max_branch: per level, the largest number of children of one state.
        leaf_items: ``(P,)`` item indices of all leaves, leaf by leaf, ascending within a leaf.
        leaf_item_ptr: ``(S_L + 1,)`` the items of leaf ``f`` are ``leaf_items[ptr[f] : ptr[f + 1]]``;
            ``None`` when every leaf holds exactly one item (``ptr[f] = f``).
        num_items: number of distinct item indices held by the leaves' item lists.
        max_items_per_leaf: the largest number of items sharing one SID.
    """

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        level_sizes: Sequence[int],
        levels: Sequence[TrieLevel],
        leaf_items: Tensor,
        leaf_item_ptr: Tensor | None,
        num_items: int,
    ) -> None:
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        self.level_sizes = tuple(int(s) for s in level_sizes)
        self.levels = list(levels)
        if len(self.levels) != self.num_levels or len(self.level_sizes) != self.num_levels + 1:
            raise ValueError(
                f"SIDTrie needs one TrieLevel per level and L + 1 level sizes; got {len(self.levels)} levels "
                f"and {len(self.level_sizes)} sizes for vocab_sizes {list(self.vocab_sizes)}"
            )
        self.leaf_items = leaf_items
        self.leaf_item_ptr = leaf_item_ptr
        self.num_items = int(num_items)
        if leaf_item_ptr is None:
            if leaf_items.numel() != self.num_leaves:
                raise ValueError(
                    f"SIDTrie: without leaf_item_ptr every leaf holds one item, but there are "
                    f"{leaf_items.numel()} leaf items for {self.num_leaves} leaves"
                )
            self.max_items_per_leaf = 1
        else:
            counts = leaf_item_ptr[1:].long() - leaf_item_ptr[:-1].long()
            self.max_items_per_leaf = int(counts.max()) if counts.numel() else 0
        self.layouts = tuple(level.layout for level in self.levels)
        self.dense_levels = next((i for i, lay in enumerate(self.layouts) if lay != "dense"), self.num_levels)
        self.max_branch = tuple(level.max_branch for level in self.levels)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_codes(
        cls,
        codes: Tensor | np.ndarray,
        vocab_sizes: Sequence[int],
        dense_levels: int | None = None,
        row_items: Tensor | np.ndarray | None = None,
        dense_max_entries: int | None = None,
        bitmap_max_vocab: int | None = None,
        counter_levels: bool = True,
    ) -> SIDTrie:
        """Build the trie from a SID table, vectorised (lexsort + run boundaries).

        Args:
            codes: ``(N, L)`` integer codes, row ``r`` is the SID of item ``row_items[r]``.
                Duplicate rows are allowed (items sharing a SID).
            vocab_sizes: ``L`` code ranges; level ``l`` codes must lie in ``[0, vocab_sizes[l])``.
            dense_levels: number of leading levels stored as dense tables. ``None`` picks
                the longest leading run of levels whose table ``S_l x V_l`` has at most
                ``dense_max_entries`` entries.
            row_items: ``(N,)`` item index of each row; defaults to ``arange(N)`` (one SID
                per item). Repeat an item to give it several SIDs (multi-view).
            dense_max_entries: table-size bound used when ``dense_levels`` is ``None``;
                ``None`` means ``clip(N, 4096, 2**20)`` entries: a dense level costs at most
                about 4 bytes per SID row, unless the whole table is tiny.
            bitmap_max_vocab: levels with at most this many codes keep packed child bitmaps
                (``0`` disables them); other levels after the dense ones keep sorted child keys
                unless they are counter levels. ``None`` chooses per level: bitmaps on dense levels
                and on levels whose bitmaps (with row pointers) take fewer bytes than the keys,
                when the level has at most 256 codes; counter levels get none.
            counter_levels: store levels whose child codes under every state are exactly
                ``0 .. c - 1`` (e.g. ACE's unique token) as row pointers only.

        Returns:
            A CPU trie; move it with :meth:`to`.
        """
        parts = build_trie_parts(
            codes,
            vocab_sizes,
            dense_levels=dense_levels,
            row_items=row_items,
            dense_max_entries=dense_max_entries,
            bitmap_max_vocab=bitmap_max_vocab,
            counter_levels=counter_levels,
        )
        return cls(**parts._asdict())

    # ------------------------------------------------------------ properties
    @property
    def num_levels(self) -> int:
        return len(self.vocab_sizes)

    @property
    def num_leaves(self) -> int:
        return self.level_sizes[-1]

    @property
    def device(self) -> torch.device:
        return self.leaf_items.device

    @property
    def child_bits(self) -> list[Tensor | None]:
        """Per level, the packed child bitmaps or ``None``."""
        return [level.child_bits for level in self.levels]

    def named_tensors(self) -> dict[str, Tensor]:
        """Every tensor the trie holds, named ``level{l}.{field}``, ``leaf_items`` and ``leaf_item_ptr``."""
        named = {
            f"level{index}.{name}": tensor
            for index, level in enumerate(self.levels)
            for name, tensor in level.tensors().items()
        }
        named["leaf_items"] = self.leaf_items
        if self.leaf_item_ptr is not None:
            named["leaf_item_ptr"] = self.leaf_item_ptr
        return named

    def tensors(self) -> list[Tensor]:
        """Every tensor the trie holds."""
        return list(self.named_tensors().values())

    def nbytes_by_component(self) -> dict[str, int]:
        """Bytes of every tensor the trie holds, keyed as in :meth:`named_tensors`."""
        return {name: t.numel() * t.element_size() for name, t in self.named_tensors().items()}

    def nbytes(self) -> int:
        """Bytes held by all tensors (divide by ``num_items`` for index bytes per item)."""
        return sum(self.nbytes_by_component().values())

    def to(self, device: torch.device | str) -> SIDTrie:
        """A copy of the trie with every tensor on ``device``."""
        return SIDTrie(
            vocab_sizes=self.vocab_sizes,
            level_sizes=self.level_sizes,
            levels=[level.to(device) for level in self.levels],
            leaf_items=self.leaf_items.to(device),
            leaf_item_ptr=None if self.leaf_item_ptr is None else self.leaf_item_ptr.to(device),
            num_items=self.num_items,
        )

    def __repr__(self) -> str:
        return (
            f"SIDTrie(vocab_sizes={list(self.vocab_sizes)}, level_sizes={list(self.level_sizes)}, "
            f"layouts={list(self.layouts)}, max_branch={list(self.max_branch)}, num_items={self.num_items}, "
            f"nbytes={self.nbytes()}, device={self.device})"
        )

    # --------------------------------------------------------------- queries
    def valid_mask(self, states: Tensor, level: int) -> Tensor:
        """Which level-``level`` codes continue each state.

        Args:
            states: ``(R,)`` long depth-``level`` states; ``-1`` (dead) allows nothing.
            level: level index in ``[0, L)``.

        Returns:
            ``(R, V_level)`` bool mask; see :meth:`TrieLevel.valid_mask` for the cost.
        """
        self._check_level(level)
        return self.levels[level].valid_mask(states)

    def advance(self, states: Tensor, codes: Tensor, level: int) -> Tensor:
        """Follow one transition per row.

        Args:
            states: ``(R,)`` long depth-``level`` states (``-1`` = dead).
            codes: ``(R,)`` long level-``level`` codes (any value; out of range = invalid).
            level: level index in ``[0, L)``.

        Returns:
            ``(R,)`` long depth-``level + 1`` states, ``-1`` where the state is dead or
            the code is not a child.
        """
        self._check_level(level)
        return self.levels[level].advance(states, codes)

    def lookup(self, sequences: Tensor) -> Tensor:
        """Leaf state of each full SID.

        Args:
            sequences: ``(..., L)`` long codes.

        Returns:
            ``(...)`` long leaf ids, ``-1`` where the SID is not in the trie.
        """
        if sequences.shape[-1] != self.num_levels:
            raise ValueError(
                f"SIDTrie.lookup: sequences end in {sequences.shape[-1]} codes, the trie has {self.num_levels} levels"
            )
        flat = sequences.reshape(-1, self.num_levels)
        states = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
        for level in range(self.num_levels):
            states = self.advance(states, flat[:, level], level)
        return states.reshape(sequences.shape[:-1])

    def contains(self, sequences: Tensor) -> Tensor:
        """``(...)`` bool: whether each ``(..., L)`` SID is in the trie."""
        return self.lookup(sequences) >= 0

    def leaf_item_ranges(self, leaves: Tensor) -> tuple[Tensor, Tensor]:
        """Where each leaf's items lie in :attr:`leaf_items`: ``(start, count)``, both ``(...)`` long like
        ``leaves`` (leaf ids, ``-1`` for none: count 0)."""
        alive = leaves >= 0
        safe = leaves.clamp(min=0)
        if self.leaf_item_ptr is None:  # leaf f holds exactly leaf_items[f]
            return safe, alive.long()
        start = self.leaf_item_ptr[safe].long()
        return start, torch.where(alive, self.leaf_item_ptr[safe + 1].long() - start, 0)

    def items_of_leaves(self, leaves: Tensor, max_per_leaf: int | None = None) -> Tensor:
        """Items of each leaf, ascending, in a padded block.

        Args:
            leaves: ``(R,)`` long leaf ids, ``-1`` for none.
            max_per_leaf: block width ``P``; defaults to :attr:`max_items_per_leaf`.
                A leaf with more items keeps its ``P`` smallest item indices.

        Returns:
            ``(R, P)`` long item indices padded with ``-1``.
        """
        width = self.max_items_per_leaf if max_per_leaf is None else int(max_per_leaf)
        start, count = self.leaf_item_ranges(leaves)
        offsets = torch.arange(width, device=leaves.device)
        positions = (start[:, None] + offsets).clamp(max=self.leaf_items.numel() - 1)
        return torch.where(offsets < count[:, None], self.leaf_items[positions].long(), -1)

    # --------------------------------------------------------------- helpers
    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.num_levels:
            raise IndexError(f"SIDTrie: level {level} out of range, the trie has {self.num_levels} levels")
