"""Flat-tensor trie over semantic IDs: one compact layout per level.

A SID is a row of ``L`` codes; level ``l`` codes lie in ``[0, vocab_sizes[l])``.
The trie's states at depth ``l`` are the distinct length-``l`` prefixes of the
SID table, numbered in lexicographic order (depth 0 holds the single root,
state 0). Level ``l`` is the transition from depth ``l`` to depth ``l + 1``.
Because states are numbered lexicographically, the children of a state are a
contiguous run of depth-``l + 1`` states, ordered by code, so a child is
"the first child of its parent" plus "its rank among its siblings". Each level
stores just enough to find both, in one of four layouts:

* ``dense`` (the first few levels, where ``#states x V`` is small): a table
  ``next_state[state, code] -> child state or -1``;
* ``counter``: every state's child codes are exactly ``0 .. c - 1`` (ACE's
  unique token counts the items that already hold a prefix), so the child of
  ``(state, code)`` is ``row_ptr[state] + code``: only row pointers are kept;
* ``bitmap``: packed child bitmaps (one bit per code, ``ceil(V / 8)`` bytes per
  state) and row pointers; the child of ``(state, code)`` is ``row_ptr[state]``
  plus the number of set bits below ``code`` (a rank, by byte popcounts);
* ``keys``: the sorted keys ``parent * V + code`` of all children; a child
  state *is* its key's position, so a transition is one ``searchsorted`` and a
  state's children are the keys in ``[state * V, (state + 1) * V)``.

Masks of allowed codes come from the bitmaps where a level has them (a row
gather, then a lookup of each byte's 8 bits), from ``code < count`` on counter
levels, from table rows on dense levels without bitmaps, and from a padded
``(R, max_branch)`` gather of keys, scattered into the mask, on key levels.
``from_codes`` picks the layouts: dense for the leading levels whose table is
small, counter wherever the codes allow it, else the smaller of bitmap and keys.

Full SIDs (depth-``L`` states, "leaves") map to items through a CSR
``leaf_item_ptr`` / ``leaf_items`` (items ascending within a leaf). Several
items may share a leaf when the SID table has no unique token, and one item
may own several leaves (multi-view SIDs) when ``row_items`` repeats it. When
every leaf holds exactly one item the pointers are the identity and are not
stored.

Every integer tensor is stored in the narrowest of int16 / int32 / int64 that
holds all values it can be asked about (``-1`` included for dense tables, every
possible ``state * V + code`` query for keys); queries widen what they gather
to int64. All queries (``valid_mask``, ``advance``, ``lookup``,
``items_of_leaves``) are vectorised over rows, run on the trie's device and
never synchronise with the host. Their cost depends on the number of rows and
the level's vocabulary, not on the number of items.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor

DENSE_ENTRIES_CEILING = 1 << 20
DENSE_ENTRIES_FLOOR = 4096
DENSE_ENTRIES_PER_ROW = 1
DEFAULT_BITMAP_MAX_VOCAB = 256
LAYOUTS = ("dense", "counter", "bitmap", "keys")


# ----------------------------------------------------------------- levels
@dataclass(frozen=True, eq=False)
class TrieLevel:
    """One level's transition tensors; which ones are set depends on ``layout``.

    Attributes:
        layout: ``dense``, ``counter``, ``bitmap`` or ``keys`` (see the module docstring).
        vocab_size: ``V``, the level's code range.
        num_states: ``S``, states at the level's depth.
        max_branch: the largest number of children of one state.
        dense_table: ``(S, V)`` child state or ``-1`` (``dense``).
        row_ptr: ``(S + 1,)``: the children of state ``s`` are the depth-``l + 1`` states
            ``row_ptr[s] .. row_ptr[s + 1] - 1`` (``counter``, ``bitmap``).
        child_keys: ``(E,)`` ascending ``parent * V + code``, one per child (``keys``).
        child_bits: ``(S, ceil(V / 8))`` uint8 packed child bitmaps, bit ``c % 8`` of byte
            ``c // 8`` set when code ``c`` continues the state (``bitmap``; optional on
            ``dense`` and ``counter`` levels, where it only serves masks).
    """

    layout: str
    vocab_size: int
    num_states: int
    max_branch: int
    dense_table: Tensor | None = None
    row_ptr: Tensor | None = None
    child_keys: Tensor | None = None
    child_bits: Tensor | None = None

    def __post_init__(self) -> None:
        required = {
            "dense": ("dense_table",),
            "counter": ("row_ptr",),
            "bitmap": ("row_ptr", "child_bits"),
            "keys": ("child_keys",),
        }
        if self.layout not in required:
            raise ValueError(f"TrieLevel: layout must be one of {LAYOUTS}, got {self.layout!r}")
        missing = [name for name in required[self.layout] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"TrieLevel: a {self.layout} level needs {' and '.join(missing)}")

    def tensors(self) -> dict[str, Tensor]:
        """The tensors this level holds, by field name."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)
        }

    def to(self, device: torch.device | str) -> TrieLevel:
        """A copy with every tensor on ``device``."""
        return replace(self, **{name: t.to(device) for name, t in self.tensors().items()})

    def valid_mask(self, states: Tensor) -> Tensor:
        """Which codes continue each state.

        Args:
            states: ``(R,)`` long states at the level's depth; ``-1`` (dead) allows nothing.

        Returns:
            ``(R, V)`` bool mask.

        Levels with bitmaps gather ``ceil(V / 8)`` bytes per row and expand them
        through a 256-row table of bits; counter levels expand their child counts
        the same way. Dead rows are cleared while still ``ceil(V / 8)`` wide.
        Dense levels without bitmaps gather table rows; key levels gather
        ``max_branch`` keys from each row's first child and scatter their codes.
        None of it depends on the number of items.
        """
        alive = states >= 0
        safe = states.clamp(min=0)
        if self.child_bits is not None:
            packed = self.child_bits.index_select(0, safe) * alive[:, None]  # (R, ceil(V / 8)) uint8
            return self._expand(_bits_of_byte(safe.device), packed)
        if self.layout == "dense":
            return (self.dense_table.index_select(0, safe) >= 0) & alive[:, None]
        if self.layout == "counter":
            count = torch.where(alive, self.row_ptr[safe + 1].long() - self.row_ptr[safe].long(), 0)
            first_code_of_byte = 8 * torch.arange((self.vocab_size + 7) // 8, device=safe.device)
            codes_below_count = (count[:, None] - first_code_of_byte).clamp(0, 8)  # (R, ceil(V / 8))
            return self._expand(_leading_bits(safe.device), codes_below_count)
        return self._keys_mask(safe, alive)

    def advance(self, states: Tensor, codes: Tensor) -> Tensor:
        """Follow one transition per row.

        Args:
            states: ``(R,)`` long states at the level's depth (``-1`` = dead).
            codes: ``(R,)`` long codes (any value; out of range = invalid).

        Returns:
            ``(R,)`` long states one level deeper, ``-1`` where the state is dead or the code
            is not a child.
        """
        size = self.vocab_size
        ok = (states >= 0) & (codes >= 0) & (codes < size)
        child, present = self._child(states.clamp(min=0), codes.clamp(0, size - 1))
        return torch.where(ok & present, child, -1)

    def _expand(self, table: Tensor, per_byte: Tensor) -> Tensor:
        """``(R, V)`` bool from ``(R, ceil(V / 8))`` row indices into a ``(*, 8)`` bool table."""
        bits = table.index_select(0, per_byte.reshape(-1).long())  # (R * ceil(V / 8), 8)
        return bits.reshape(per_byte.shape[0], -1)[:, : self.vocab_size]

    def _keys_mask(self, safe: Tensor, alive: Tensor) -> Tensor:
        size, keys = self.vocab_size, self.child_keys
        base = safe * size
        start = torch.searchsorted(keys, base.to(keys.dtype))  # first key >= base: the row's first child
        positions = start[:, None] + torch.arange(self.max_branch, device=safe.device)  # (R, max_branch)
        codes = keys[positions.clamp(max=keys.numel() - 1)].long() - base[:, None]
        present = alive[:, None] & (positions < keys.numel()) & (codes < size)
        mask = torch.zeros(safe.shape[0], size + 1, dtype=torch.bool, device=safe.device)
        mask.scatter_(1, torch.where(present, codes, size), True)  # absent children go to a spare column
        return mask[:, :size]

    def _child(self, safe_states: Tensor, safe_codes: Tensor) -> tuple[Tensor, Tensor]:
        """Child of each in-range ``(state, code)``: ``(R,)`` long (meaningless where absent), ``(R,)`` bool present."""
        if self.layout == "dense":
            child = self.dense_table[safe_states, safe_codes].long()
            return child, child >= 0
        if self.layout == "counter":
            start = self.row_ptr[safe_states].long()
            return start + safe_codes, safe_codes < self.row_ptr[safe_states + 1].long() - start
        if self.layout == "bitmap":
            # rank of the code among the state's children: set bits in the bytes below its byte, then in its byte
            packed = self.child_bits.index_select(0, safe_states)  # (R, ceil(V / 8)) uint8
            byte, shift = safe_codes[:, None] // 8, (safe_codes[:, None] % 8).to(torch.uint8)
            target = packed.gather(1, byte)  # (R, 1)
            below = torch.arange(packed.shape[1], device=packed.device) < byte
            in_byte = _popcount_bytes(target & ((1 << shift) - 1))
            rank = (_popcount_bytes(packed) * below).sum(1) + in_byte[:, 0]
            present = ((target >> shift) & 1)[:, 0].bool()
            return self.row_ptr[safe_states].long() + rank, present
        keys = self.child_keys
        query = safe_states * self.vocab_size + safe_codes
        position = torch.searchsorted(keys, query.to(keys.dtype))
        return position, keys[position.clamp(max=keys.numel() - 1)].long() == query


def _popcount_bytes(values: Tensor) -> Tensor:
    """Set bits of every byte of a uint8 tensor (SWAR: pairs, nibbles, then the byte), uint8."""
    values = values - ((values >> 1) & 0x55)
    values = (values & 0x33) + ((values >> 2) & 0x33)
    return (values + (values >> 4)) & 0x0F


@functools.cache
def _leading_bits(device: torch.device) -> Tensor:
    """``(9, 8)`` bool: row ``n`` has its first ``n`` entries set (one copy per device)."""
    return (torch.arange(8)[None, :] < torch.arange(9)[:, None]).to(device)


@functools.cache
def _bits_of_byte(device: torch.device) -> Tensor:
    """``(256, 8)`` bool: row ``b`` holds the bits of byte ``b``, least significant first (one copy per device)."""
    table = torch.arange(256)[:, None] & (torch.ones(8, dtype=torch.long) << torch.arange(8))
    return table.ne(0).to(device)


# ------------------------------------------------------------------- trie
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
        return cls(
            vocab_sizes=vocab,
            level_sizes=level_sizes,
            levels=levels,
            leaf_items=_narrowest(leaf_items, -1, int(leaf_items.max())),
            leaf_item_ptr=leaf_item_ptr,
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
        if self.leaf_item_ptr is None:  # leaf f holds exactly leaf_items[f]
            start, count = safe, alive.long()
        else:
            start = self.leaf_item_ptr[safe].long()
            count = torch.where(alive, self.leaf_item_ptr[safe + 1].long() - start, 0)
        offsets = torch.arange(width, device=leaves.device)
        positions = (start[:, None] + offsets).clamp(max=self.leaf_items.numel() - 1)
        return torch.where(offsets < count[:, None], self.leaf_items[positions].long(), -1)

    # --------------------------------------------------------------- helpers
    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.num_levels:
            raise IndexError(f"SIDTrie: level {level} out of range, the trie has {self.num_levels} levels")


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


# ------------------------------------------------------------------ build
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
        return TrieLevel(
            "dense",
            dense_table=_narrowest(table, -1, num_children - 1),
            child_bits=bits() if bits_allowed else None,
            **common,
        )
    narrow_row_ptr = _narrowest(row_ptr, -1, num_children)
    if counter_levels and np.array_equal(child_codes, np.arange(num_children) - row_ptr[parents]):
        counter_bits = bits() if bits_allowed and explicit_bits else None
        return TrieLevel("counter", row_ptr=narrow_row_ptr, child_bits=counter_bits, **common)
    key_dtype = _narrowest_dtype(-1, num_states * size - 1)  # every query state * V + code must fit
    if bits_allowed and not explicit_bits:  # bitmaps only where they take fewer bytes than the keys
        bitmap_bytes = num_states * ((size + 7) // 8) + narrow_row_ptr.numel() * narrow_row_ptr.element_size()
        bits_allowed = bitmap_bytes <= num_children * np.dtype(key_dtype).itemsize
    if bits_allowed:
        return TrieLevel("bitmap", row_ptr=narrow_row_ptr, child_bits=bits(), **common)
    keys = parents * size + child_codes
    return TrieLevel("keys", child_keys=torch.from_numpy(keys.astype(key_dtype)), **common)


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
