"""One trie level, one class per storage layout.

Level ``l`` of a :class:`~grcm.decoding.trie.SIDTrie` is the transition from the ``S`` states at
depth ``l`` to the states at depth ``l + 1``. States are numbered lexicographically, so the children
of a state are a contiguous run of depth-``l + 1`` states ordered by code: a child is "the first
child of its parent" plus "its rank among its siblings". Each layout stores just enough to find both:

* :class:`DenseLevel` (the first few levels, where ``S x V`` is small): a table
  ``next_state[state, code] -> child state or -1``;
* :class:`CounterLevel`: every state's child codes are exactly ``0 .. c - 1`` (ACE's unique token
  counts the items that already hold a prefix), so the child of ``(state, code)`` is
  ``row_ptr[state] + code``: only row pointers are kept;
* :class:`BitmapLevel`: packed child bitmaps (one bit per code, ``ceil(V / 8)`` bytes per state) and
  row pointers; the child of ``(state, code)`` is ``row_ptr[state]`` plus the number of set bits
  below ``code`` (a rank, by byte popcounts);
* :class:`KeysLevel`: the sorted keys ``parent * V + code`` of all children; a child state *is* its
  key's position, so a transition is one ``searchsorted`` and a state's children are the keys in
  ``[state * V, (state + 1) * V)``.

Masks of allowed codes come from the bitmaps where a level has them (a row gather, then a lookup of
each byte's 8 bits; dense and counter levels may keep bitmaps only for this), from ``code < count``
on counter levels, from table rows on dense levels, and from a padded ``(R, max_branch)`` gather of
keys, scattered into the mask, on key levels. Every query is vectorised over rows, runs on the
level's device and never synchronises with the host; its cost does not depend on the number of items.
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["LAYOUTS", "BitmapLevel", "CounterLevel", "DenseLevel", "KeysLevel", "TrieLevel"]


@dataclass(frozen=True, eq=False, kw_only=True)
class TrieLevel:
    """What every layout shares: sizes, optional child bitmaps, masks from bitmaps, row-wise transitions.

    Attributes:
        layout: the layout's name (``dense``, ``counter``, ``bitmap`` or ``keys``), a class constant.
        vocab_size: ``V``, the level's code range.
        num_states: ``S``, states at the level's depth.
        max_branch: the largest number of children of one state.
        child_bits: ``(S, ceil(V / 8))`` uint8 packed child bitmaps, bit ``c % 8`` of byte ``c // 8`` set
            when code ``c`` continues the state (required by :class:`BitmapLevel`; optional on dense and
            counter levels, where it only serves masks).
    """

    layout: ClassVar[str] = ""

    vocab_size: int
    num_states: int
    max_branch: int
    child_bits: Tensor | None = None

    def __post_init__(self) -> None:
        # the layout's tensors are the fields without a default: None is no tensor either
        missing = [f.name for f in fields(self) if f.default is MISSING and getattr(self, f.name) is None]
        if missing:
            raise ValueError(f"TrieLevel: a {self.layout} level needs {' and '.join(missing)}")

    def tensors(self) -> dict[str, Tensor]:
        """The tensors this level holds, by field name (the layout's own first, ``child_bits`` last)."""
        names = [f.name for f in fields(self) if f.name != "child_bits"] + ["child_bits"]
        return {name: getattr(self, name) for name in names if isinstance(getattr(self, name), Tensor)}

    def to(self, device: torch.device | str) -> TrieLevel:
        """A copy with every tensor on ``device``."""
        return replace(self, **{name: t.to(device) for name, t in self.tensors().items()})

    def valid_mask(self, states: Tensor) -> Tensor:
        """Which codes continue each state.

        Args:
            states: ``(R,)`` long states at the level's depth; ``-1`` (dead) allows nothing.

        Returns:
            ``(R, V)`` bool mask.

        Levels with bitmaps gather ``ceil(V / 8)`` bytes per row and expand them through a
        256-row table of bits; the other levels answer from their own layout (see each class).
        None of it depends on the number of items.
        """
        alive = states >= 0
        safe = states.clamp(min=0)
        if self.child_bits is not None:
            packed = self.child_bits.index_select(0, safe) * alive[:, None]  # (R, ceil(V / 8)) uint8
            return self._expand(_bits_of_byte(safe.device), packed)
        return self._mask(safe, alive)

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

    def _mask(self, safe: Tensor, alive: Tensor) -> Tensor:
        """``(R, V)`` bool mask of a level without bitmaps: ``safe`` (R,) states clamped to >= 0, ``alive`` (R,)."""
        raise NotImplementedError

    def _child(self, safe_states: Tensor, safe_codes: Tensor) -> tuple[Tensor, Tensor]:
        """Child of each in-range ``(state, code)``: ``(R,)`` long (meaningless where absent), ``(R,)`` bool present."""
        raise NotImplementedError

    def _expand(self, table: Tensor, per_byte: Tensor) -> Tensor:
        """``(R, V)`` bool from ``(R, ceil(V / 8))`` row indices into a ``(*, 8)`` bool table."""
        bits = table.index_select(0, per_byte.reshape(-1).long())  # (R * ceil(V / 8), 8)
        return bits.reshape(per_byte.shape[0], -1)[:, : self.vocab_size]


@dataclass(frozen=True, eq=False, kw_only=True)
class DenseLevel(TrieLevel):
    """``dense_table``: ``(S, V)`` child state or ``-1``; a transition is one table read."""

    layout: ClassVar[str] = "dense"

    dense_table: Tensor

    def _mask(self, safe: Tensor, alive: Tensor) -> Tensor:
        return (self.dense_table.index_select(0, safe) >= 0) & alive[:, None]

    def _child(self, safe_states: Tensor, safe_codes: Tensor) -> tuple[Tensor, Tensor]:
        child = self.dense_table[safe_states, safe_codes].long()
        return child, child >= 0


@dataclass(frozen=True, eq=False, kw_only=True)
class CounterLevel(TrieLevel):
    """``row_ptr``: ``(S + 1,)``; state ``s`` has the child codes ``0 .. row_ptr[s + 1] - row_ptr[s] - 1``."""

    layout: ClassVar[str] = "counter"

    row_ptr: Tensor

    def _mask(self, safe: Tensor, alive: Tensor) -> Tensor:
        # child counts expanded through the table of leading bits, one byte (8 codes) at a time
        count = torch.where(alive, self.row_ptr[safe + 1].long() - self.row_ptr[safe].long(), 0)
        first_code_of_byte = 8 * torch.arange((self.vocab_size + 7) // 8, device=safe.device)
        codes_below_count = (count[:, None] - first_code_of_byte).clamp(0, 8)  # (R, ceil(V / 8))
        return self._expand(_leading_bits(safe.device), codes_below_count)

    def _child(self, safe_states: Tensor, safe_codes: Tensor) -> tuple[Tensor, Tensor]:
        start = self.row_ptr[safe_states].long()
        return start + safe_codes, safe_codes < self.row_ptr[safe_states + 1].long() - start


@dataclass(frozen=True, eq=False, kw_only=True)
class BitmapLevel(TrieLevel):
    """``row_ptr`` ``(S + 1,)`` and ``child_bits``: a child is ``row_ptr[state]`` + its code's rank in the bitmap."""

    layout: ClassVar[str] = "bitmap"

    row_ptr: Tensor
    child_bits: Tensor = field()  # required here (field(): no default inherited from TrieLevel)

    def _child(self, safe_states: Tensor, safe_codes: Tensor) -> tuple[Tensor, Tensor]:
        # rank of the code among the state's children: set bits in the bytes below its byte, then in its byte
        packed = self.child_bits.index_select(0, safe_states)  # (R, ceil(V / 8)) uint8
        byte, shift = safe_codes[:, None] // 8, (safe_codes[:, None] % 8).to(torch.uint8)
        target = packed.gather(1, byte)  # (R, 1)
        below = torch.arange(packed.shape[1], device=packed.device) < byte
        in_byte = _popcount_bytes(target & ((1 << shift) - 1))
        rank = (_popcount_bytes(packed) * below).sum(1) + in_byte[:, 0]
        present = ((target >> shift) & 1)[:, 0].bool()
        return self.row_ptr[safe_states].long() + rank, present


@dataclass(frozen=True, eq=False, kw_only=True)
class KeysLevel(TrieLevel):
    """``child_keys``: ``(E,)`` ascending ``parent * V + code``, one per child; a child state is its key's position."""

    layout: ClassVar[str] = "keys"

    child_keys: Tensor

    def _mask(self, safe: Tensor, alive: Tensor) -> Tensor:
        # gather max_branch keys from each row's first child and scatter their codes
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
        keys = self.child_keys
        query = safe_states * self.vocab_size + safe_codes
        position = torch.searchsorted(keys, query.to(keys.dtype))
        return position, keys[position.clamp(max=keys.numel() - 1)].long() == query


#: The layouts' names, in the order the module docstring describes them.
LAYOUTS = tuple(cls.layout for cls in (DenseLevel, CounterLevel, BitmapLevel, KeysLevel))


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
