"""A SID trie cached against the version of the tensors it is built from.

A retriever's trie is a function of its SID table (and, for GRDR, of the number of
levels built so far). :class:`VersionedTrie` rebuilds it exactly when one of those
source tensors has changed since the last build, and never otherwise:

* every in-place write to a tensor (``codes[i] = ...``, ``copy_``, ``fill_``,
  ``load_state_dict``) bumps PyTorch's per-tensor version counter
  (``Tensor._version``), so no code path can change the codes and forget to say so;
* assigning a new tensor (``module.sid_codes = ...``, ``module.to(device)``)
  replaces the source object, which the cache notices through a weak reference.

Checking the key reads two Python integers per source: no device-to-host copy
(a key such as ``int(codes.sum())`` syncs with the device on every access and
misses two items that swap codes).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from grcm.decoding import SIDTrie


class VersionedTrie:
    """Holds one :class:`SIDTrie` and the versions of the source tensors it was built from."""

    def __init__(self) -> None:
        self._trie: SIDTrie | None = None
        self._sources: list[weakref.ref] = []
        self._versions: tuple[int, ...] = ()

    @staticmethod
    def _versions_of(sources: Sequence[Tensor]) -> tuple[int, ...] | None:
        """The sources' version counters, or None when one of them has none (an inference tensor)."""
        if any(source.is_inference() for source in sources):
            return None
        return tuple(source._version for source in sources)

    def is_current(self, sources: Sequence[Tensor]) -> bool:
        """Whether the cached trie was built from exactly these tensors, unchanged since."""
        if self._trie is None or len(sources) != len(self._sources):
            return False
        if any(ref() is not source for ref, source in zip(self._sources, sources)):
            return False
        return self._versions_of(sources) == self._versions

    def get(self, sources: Sequence[Tensor], build: Callable[[], SIDTrie], device: torch.device) -> SIDTrie:
        """The trie of ``sources`` on ``device``: the cached one, or ``build()`` when a source has changed.

        An inference tensor among the sources has no version counter: the trie is then rebuilt on
        every call (correct, slow; the retrievers keep their SID tables out of inference mode).
        """
        if not self.is_current(sources):
            trie = build()
            versions = self._versions_of(sources)
            if versions is None:
                return trie.to(device) if trie.device != device else trie
            self._trie, self._sources, self._versions = trie, [weakref.ref(s) for s in sources], versions
        if self._trie.device != device:
            self._trie = self._trie.to(device)
        return self._trie

    def clear(self) -> None:
        self._trie, self._sources, self._versions = None, [], ()
