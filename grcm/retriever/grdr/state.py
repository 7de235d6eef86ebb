"""GRDR's SID state: the multi-view SID table, the levels built, the anchors, the query routes.

:class:`GRDRState` is a plain ``nn.Module`` whose buffers travel in every checkpoint (state-dict keys
``sids.<buffer>``) and whose other fields are rebuilt from the data module or stored under
``checkpoint["grdr_sid_table"]``. Shapes: N items, V views, L levels, Q training query ids.

Buffers:

* ``sid_codes`` (N, V, L) long: the SID of every view of every item; only the first
  ``initialised_levels`` levels are meaningful (the rest are 0);
* ``initialised_levels`` () long: the SID levels built so far, each K-Means-initialised when its
  phase began; these are the levels decoded (all L after training);
* ``anchor_codes`` (N, V, L) long and ``anchored_phase`` () long: the codes snapshotted at the start of
  phase ``anchored_phase``, the targets of the code loss against drift;
* ``query_routes`` (Q,) long: the view each training query is routed to (-1: not a training query).

Not in the state dict: ``features`` (N, D) from the corpus, ``query_embeddings`` (Q, 384) and
``query_item`` (Q,) and ``query_groups`` (Q,) (each query's K-Means group within its item, -1: none) of
the training queries (rebuilt in ``setup``), ``item_ids`` and ``health``
(checkpoint extras).

The trie over all ``N * V`` SIDs (:meth:`GRDRState.build_trie`) is a function of ``sid_codes`` and
``initialised_levels``; the retriever caches it against those tensors' versions
(:class:`~grcm.retriever.trie_cache.VersionedTrie`), so a refresh, a load or any write to the codes
rebuilds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from grcm.decoding import SIDTrie
from grcm.errors import GrcmError
from grcm.tokenizers.multiview import MultiViewTokenizer, multiview_health

#: where the checkpoint keeps the state that is not in the state dict
CHECKPOINT_KEY = "grdr_sid_table"
BUFFERS = ("sid_codes", "anchor_codes", "query_routes", "initialised_levels", "anchored_phase")


def rename_unprefixed_buffers(state_dict: dict[str, Any], prefix: str, state_prefix: str) -> None:
    """Move a state dict's GRDR buffers from ``<prefix><buffer>`` to ``<prefix><state_prefix><buffer>``.

    Checkpoints written before the SID state became its own module hold ``sid_codes``, ``anchor_codes``,
    ``query_routes``, ``initialised_levels`` and ``anchored_phase`` at the retriever's top level.
    """
    for name in BUFFERS:
        if prefix + name in state_dict and prefix + state_prefix + name not in state_dict:
            state_dict[prefix + state_prefix + name] = state_dict.pop(prefix + name)


class GRDRState(nn.Module):
    """The SID table, levels built, anchors and query routes of a GRDR retriever (see the module docstring).

    Args:
        num_views, num_levels: V and L.
        vocab_sizes: codes per level (L,).
    """

    def __init__(self, num_views: int, num_levels: int, vocab_sizes: Sequence[int]) -> None:
        super().__init__()
        self.num_views, self.num_levels, self.vocab_sizes = num_views, num_levels, list(vocab_sizes)
        self.register_buffer("sid_codes", torch.zeros(0, num_views, num_levels, dtype=torch.long))
        self.register_buffer("anchor_codes", torch.zeros(0, num_views, num_levels, dtype=torch.long))
        self.register_buffer("query_routes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("initialised_levels", torch.zeros((), dtype=torch.long))
        self.register_buffer("anchored_phase", torch.full((), -1, dtype=torch.long))
        self.item_ids: list[str] | None = None
        self.health: dict[str, float] = {}
        self.features: Tensor | None = None
        self.query_embeddings: Tensor | None = None
        self.query_item: Tensor | None = None
        self.query_groups: Tensor | None = None

    # ------------------------------------------------------------------- corpus
    def attach_corpus(self, item_ids: Sequence[str], features: np.ndarray, corpus_name: str) -> None:
        """Take the corpus items (N) and features (N, D); the SID table is resized to N rows when it differs."""
        if self.item_ids is not None and list(item_ids) != list(self.item_ids):
            raise GrcmError(
                f"this GRDR checkpoint was trained on {len(self.item_ids)} items that differ from the "
                f"{len(item_ids)} items of corpus {corpus_name!r}; evaluate it on its own corpus."
            )
        self.item_ids = list(item_ids)
        self.features = torch.as_tensor(np.asarray(features, dtype=np.float32))
        n, device = len(self.item_ids), self.sid_codes.device
        if self.sid_codes.shape[0] != n:
            self.sid_codes = torch.zeros(n, self.num_views, self.num_levels, dtype=torch.long, device=device)
            self.anchor_codes = torch.zeros(n, self.num_views, self.num_levels, dtype=torch.long, device=device)

    def features_on_device(self) -> Tensor:
        """(N, D) corpus features on the buffers' device."""
        if self.features is None:
            raise GrcmError("GRDRRetriever needs the corpus features: train it with a RetrievalDataModule.")
        if self.features.device != self.sid_codes.device:
            self.features = self.features.to(self.sid_codes.device)
        return self.features

    def set_training_queries(self, query_index: np.ndarray, item: np.ndarray, routes: np.ndarray,
                             embeddings: np.ndarray | None, groups: np.ndarray | None = None) -> None:
        """Index the training queries by id: (n,) ids, their items (n,), routes (n,), embeddings (n, E) or
        None, groups (n,) or None."""
        size = int(query_index.max()) + 1
        ids = torch.from_numpy(query_index)
        table = torch.full((size,), -1, dtype=torch.long)
        table[ids] = torch.from_numpy(routes)
        self.query_routes = table.to(self.sid_codes.device)
        self.query_item = torch.full((size,), -1, dtype=torch.long)
        self.query_item[ids] = torch.from_numpy(item)
        self.query_groups = None
        if groups is not None:
            self.query_groups = torch.full((size,), -1, dtype=torch.long)
            self.query_groups[ids] = torch.from_numpy(np.asarray(groups, dtype=np.int64))
        if embeddings is not None:
            full = torch.zeros(size, embeddings.shape[1])
            full[ids] = torch.from_numpy(embeddings)
            self.query_embeddings = full

    # -------------------------------------------------------------------- codes
    @torch.no_grad()
    def refresh(self, tokenizer: MultiViewTokenizer) -> Tensor:
        """Recompute ``sid_codes`` (N, V, L) from the tokenizer for the levels built so far; returns it."""
        levels = int(self.initialised_levels)
        if levels:
            self.sid_codes[:, :, :levels] = tokenizer.encode(self.features_on_device(), levels)
        return self.sid_codes

    def snapshot_anchors(self, tokenizer: MultiViewTokenizer, phase_index: int) -> None:
        """Refresh the codes and keep them as the anchors of phase ``phase_index``."""
        self.refresh(tokenizer)
        self.anchor_codes.copy_(self.sid_codes)
        self.anchored_phase.fill_(phase_index)

    def sid_table(self) -> tuple[Tensor, Tensor]:
        """All SIDs: codes (N * V, l) over the l levels built so far, and the item of each row (N * V,)."""
        n, views, _ = self.sid_codes.shape
        levels = int(self.initialised_levels)
        if n == 0 or levels == 0:
            raise GrcmError("GRDRRetriever has no SIDs yet: train it (grcm fit) or load a trained checkpoint.")
        codes = self.sid_codes[:, :, :levels].reshape(n * views, levels)
        return codes, torch.arange(n, device=codes.device).repeat_interleave(views)

    def build_trie(self) -> SIDTrie:
        """Trie over every view's SID of every item; a leaf holds all items that own the SID."""
        codes, rows = self.sid_table()
        return SIDTrie.from_codes(codes.cpu(), self.vocab_sizes[: codes.shape[1]], row_items=rows.cpu())

    def table_health(self) -> dict[str, float]:
        """Multi-view SID health of the current table (see :func:`multiview_health`)."""
        codes, _ = self.sid_table()
        n = self.sid_codes.shape[0]
        return multiview_health(codes.reshape(n, self.num_views, -1), self.vocab_sizes[: codes.shape[1]])

    # -------------------------------------------------------------- checkpoints
    def checkpoint_extras(self) -> dict[str, Any]:
        """What the checkpoint stores besides the buffers (item ids and health)."""
        return {"item_ids": list(self.item_ids or []), "health": {k: float(v) for k, v in self.health.items()}}

    def load_checkpoint_extras(self, extras: dict[str, Any], state_dict: dict[str, Tensor], prefix: str) -> None:
        """Restore item ids and health and resize the buffers to the checkpoint's (``load_state_dict`` fills them)."""
        self.item_ids = list(extras["item_ids"]) if extras.get("item_ids") else None
        self.health = dict(extras.get("health", {}))
        for name in ("sid_codes", "anchor_codes", "query_routes"):
            setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.sid_codes.device))
