"""Flat-tensor trie over semantic IDs: a dense head and a CSR tail.

A SID is a row of ``L`` codes; level ``l`` codes lie in ``[0, vocab_sizes[l])``.
The trie's states at depth ``l`` are the distinct length-``l`` prefixes of the
SID table, numbered in lexicographic order (depth 0 holds the single root,
state 0). Level ``l`` is the transition from depth ``l`` to depth ``l + 1``:

* dense levels (the first few, where ``#states x V`` is small) keep a table
  ``next_state[state, code] -> child state or -1``;
* CSR levels keep row pointers ``row_ptr[state] .. row_ptr[state + 1]`` into
  the depth-``l + 1`` states, whose child codes are sorted within each row.
  Because states are numbered lexicographically, the children of a state are
  a contiguous run of depth-``l + 1`` states, so the child state *is* the
  position in that run. Children are stored as keys ``parent * V + code``,
  globally sorted, so a transition is one ``searchsorted``.

Masks of allowed codes come from packed child bitmaps (one bit per code,
``ceil(V / 8)`` bytes per state) on levels whose vocabulary is at most
``bitmap_max_vocab``: a row gather plus a bit test, whatever the branching.
Levels with a larger vocabulary (e.g. a unique-token level with many
collisions) gather their CSR rows into a padded ``(R, max_branch)`` block and
scatter it into the mask instead (dense levels read their table).

Full SIDs (depth-``L`` states, "leaves") map to items through a CSR
``leaf_item_ptr`` / ``leaf_items`` (items ascending within a leaf). Several
items may share a leaf when the SID table has no unique token, and one item
may own several leaves (multi-view SIDs) when ``row_items`` repeats it.

All queries (``valid_mask``, ``advance``, ``lookup``, ``items_of_leaves``) are
vectorised over rows, run on the trie's device and never synchronise with the
host. Their cost depends on the number of rows and the level's vocabulary,
not on the number of items.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

DENSE_ENTRIES_CEILING = 1 << 20
DENSE_ENTRIES_FLOOR = 4096
DENSE_ENTRIES_PER_ROW = 8
DEFAULT_BITMAP_MAX_VOCAB = 256


class SIDTrie:
    """Trie of valid SIDs stored as flat tensors. Build it with :meth:`from_codes`.

    Attributes:
        vocab_sizes: ``(V_0, ..., V_{L-1})`` code range per level.
        level_sizes: ``(S_0, ..., S_L)`` number of states per depth (``S_0 = 1``).
        dense_levels: levels ``0 .. dense_levels - 1`` use a dense table, the rest CSR.
        child_bits: per level, ``(S_l, ceil(V_l / 8))`` uint8 packed child bitmaps
            (bit ``c % 8`` of byte ``c // 8`` is set when code ``c`` continues the state),
            or ``None`` where the level's vocabulary exceeds ``bitmap_max_vocab``.
        max_branch: per level, the largest number of children of one state.
        num_items: number of distinct item indices held by the leaves' item lists.
        max_items_per_leaf: the largest number of items sharing one SID.
    """

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        level_sizes: Sequence[int],
        dense_tables: list[Tensor],
        csr_row_ptr: list[Tensor],
        csr_child_keys: list[Tensor],
        child_bits: list[Tensor | None],
        max_branch: Sequence[int],
        leaf_item_ptr: Tensor,
        leaf_items: Tensor,
        num_items: int,
    ) -> None:
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        self.level_sizes = tuple(int(s) for s in level_sizes)
        self.dense_levels = len(dense_tables)
        self.dense_tables = dense_tables
        self.csr_row_ptr = csr_row_ptr
        self.csr_child_keys = csr_child_keys
        self.child_bits = child_bits
        self.max_branch = tuple(int(b) for b in max_branch)
        self.leaf_item_ptr = leaf_item_ptr
        self.leaf_items = leaf_items
        self.num_items = int(num_items)
        counts = leaf_item_ptr[1:] - leaf_item_ptr[:-1]
        self.max_items_per_leaf = int(counts.max()) if counts.numel() else 0
        if self.dense_levels + len(csr_row_ptr) != self.num_levels or len(child_bits) != self.num_levels:
            raise ValueError(
                "SIDTrie needs exactly one dense table or CSR block, and one bitmap slot, per level"
            )
        device = leaf_items.device
        self._bit_values = torch.ones(8, dtype=torch.uint8, device=device) << torch.arange(
            8, dtype=torch.uint8, device=device
        )

    # ------------------------------------------------------------------ build
    @classmethod
    def from_codes(
        cls,
        codes: Tensor | np.ndarray,
        vocab_sizes: Sequence[int],
        dense_levels: int | None = None,
        row_items: Tensor | np.ndarray | None = None,
        dense_max_entries: int | None = None,
        bitmap_max_vocab: int = DEFAULT_BITMAP_MAX_VOCAB,
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
                ``None`` means ``clip(8 * N, 4096, 2**20)`` entries: a dense level costs at most
                about 64 bytes per SID row, unless the whole table is tiny.
            bitmap_max_vocab: levels with at most this many codes keep packed child bitmaps
                for masking (``0`` disables them).

        Returns:
            A CPU trie; move it with :meth:`to`.
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

        dense_tables: list[Tensor] = []
        csr_row_ptr: list[Tensor] = []
        csr_child_keys: list[Tensor] = []
        child_bits: list[Tensor | None] = []
        max_branch: list[int] = []
        for level in range(num_levels):
            parents = parents_per_level[level]
            child_codes = child_codes_per_level[level]
            num_states, size = level_sizes[level], vocab[level]
            row_ptr = np.searchsorted(parents, np.arange(num_states + 1), side="left")
            max_branch.append(int(np.diff(row_ptr).max()))
            if level < dense_levels:
                table = np.full((num_states, size), -1, dtype=np.int64)
                table[parents, child_codes] = np.arange(level_sizes[level + 1], dtype=np.int64)
                dense_tables.append(torch.from_numpy(table))
            else:
                csr_row_ptr.append(torch.from_numpy(row_ptr.astype(np.int64)))
                csr_child_keys.append(torch.from_numpy(parents * size + child_codes))
            child_bits.append(
                _packed_child_bits(parents, child_codes, num_states, size)
                if size <= bitmap_max_vocab
                else None
            )

        # Leaves -> items: drop repeated (leaf, item) pairs, rows are already sorted by (leaf, item).
        leaf_of_row = state_of_row
        keep = np.ones(num_rows, dtype=bool)
        keep[1:] = (leaf_of_row[1:] != leaf_of_row[:-1]) | (sorted_items[1:] != sorted_items[:-1])
        leaf_items = sorted_items[keep]
        leaf_item_ptr = np.searchsorted(leaf_of_row[keep], np.arange(level_sizes[-1] + 1), side="left")
        return cls(
            vocab_sizes=vocab,
            level_sizes=level_sizes,
            dense_tables=dense_tables,
            csr_row_ptr=csr_row_ptr,
            csr_child_keys=csr_child_keys,
            child_bits=child_bits,
            max_branch=max_branch,
            leaf_item_ptr=torch.from_numpy(leaf_item_ptr.astype(np.int64)),
            leaf_items=torch.from_numpy(np.ascontiguousarray(leaf_items)),
            num_items=len(np.unique(items_np)),
        )

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

    def tensors(self) -> list[Tensor]:
        """Every tensor the trie holds."""
        bits = [b for b in self.child_bits if b is not None]
        return [
            *self.dense_tables,
            *self.csr_row_ptr,
            *self.csr_child_keys,
            *bits,
            self.leaf_item_ptr,
            self.leaf_items,
        ]

    def nbytes(self) -> int:
        """Bytes held by all tensors (divide by ``num_items`` for index bytes per item)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> SIDTrie:
        """A copy of the trie with every tensor on ``device``."""
        return SIDTrie(
            vocab_sizes=self.vocab_sizes,
            level_sizes=self.level_sizes,
            dense_tables=[t.to(device) for t in self.dense_tables],
            csr_row_ptr=[t.to(device) for t in self.csr_row_ptr],
            csr_child_keys=[t.to(device) for t in self.csr_child_keys],
            child_bits=[None if b is None else b.to(device) for b in self.child_bits],
            max_branch=self.max_branch,
            leaf_item_ptr=self.leaf_item_ptr.to(device),
            leaf_items=self.leaf_items.to(device),
            num_items=self.num_items,
        )

    def __repr__(self) -> str:
        return (
            f"SIDTrie(vocab_sizes={list(self.vocab_sizes)}, level_sizes={list(self.level_sizes)}, "
            f"dense_levels={self.dense_levels}, max_branch={list(self.max_branch)}, num_items={self.num_items}, "
            f"nbytes={self.nbytes()}, device={self.device})"
        )

    # --------------------------------------------------------------- queries
    def valid_mask(self, states: Tensor, level: int) -> Tensor:
        """Which level-``level`` codes continue each state.

        Args:
            states: ``(R,)`` long depth-``level`` states; ``-1`` (dead) allows nothing.
            level: level index in ``[0, L)``.

        Returns:
            ``(R, V_level)`` bool mask.

        Levels with bitmaps gather ``ceil(V / 8)`` bytes per row and test bits:
        ``O(R * V)`` cheap byte operations. Otherwise dense levels gather table
        rows, and CSR levels gather each row's children into a padded
        ``(R, max_branch[level])`` block and scatter them into the mask. Either
        way the cost does not depend on the number of items.
        """
        self._check_level(level)
        alive = states >= 0
        safe = states.clamp(min=0)
        size = self.vocab_sizes[level]
        bits = self.child_bits[level]
        if bits is not None:
            packed = bits.index_select(0, safe)  # (R, ceil(V / 8))
            mask = torch.bitwise_and(packed.unsqueeze(-1), self._bit_values).ne(0)
            return mask.reshape(states.shape[0], packed.shape[1] * 8)[:, :size] & alive[:, None]
        if level < self.dense_levels:
            return (self.dense_tables[level][safe] >= 0) & alive[:, None]
        row_ptr, keys = self._csr(level)
        start = row_ptr[safe]
        count = torch.where(alive, row_ptr[safe + 1] - start, 0)
        offsets = torch.arange(self.max_branch[level], device=states.device)
        positions = start[:, None] + offsets  # (R, max_branch)
        present = offsets < count[:, None]
        child_codes = keys[positions.clamp(max=keys.numel() - 1)] - safe[:, None] * size
        columns = torch.where(present, child_codes, size)  # absent children go to a spare column
        mask = torch.zeros(states.shape[0], size + 1, dtype=torch.bool, device=states.device)
        mask.scatter_(1, columns, True)
        return mask[:, :size]

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
        size = self.vocab_sizes[level]
        ok = (states >= 0) & (codes >= 0) & (codes < size)
        safe_states = states.clamp(min=0)
        safe_codes = codes.clamp(0, size - 1)
        if level < self.dense_levels:
            nxt = self.dense_tables[level][safe_states, safe_codes]
            return torch.where(ok, nxt, -1)
        _, keys = self._csr(level)
        query = safe_states * size + safe_codes
        position = torch.searchsorted(keys, query)
        found = keys[position.clamp(max=keys.numel() - 1)] == query
        return torch.where(ok & found, position, -1)

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
        alive = leaves >= 0
        safe = leaves.clamp(min=0)
        start = self.leaf_item_ptr[safe]
        count = torch.where(alive, self.leaf_item_ptr[safe + 1] - start, 0)
        offsets = torch.arange(width, device=leaves.device)
        positions = (start[:, None] + offsets).clamp(max=self.leaf_items.numel() - 1)
        return torch.where(offsets < count[:, None], self.leaf_items[positions], -1)

    # --------------------------------------------------------------- helpers
    def _csr(self, level: int) -> tuple[Tensor, Tensor]:
        index = level - self.dense_levels
        return self.csr_row_ptr[index], self.csr_child_keys[index]

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.num_levels:
            raise IndexError(f"SIDTrie: level {level} out of range, the trie has {self.num_levels} levels")


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
