"""Collate objects and token-feature batches that the DataModules' loaders serve.

- :class:`QueryBatches`: query rows -> ``{"input_ids": (B, T), "attention_mask": (B, T) bool,
  "query_index": (B,)}`` plus ``"item_index": (B,)`` (train) or ``"gold_items": (B, G)`` (evaluation).
- :class:`ItemBatches`: item rows -> ``{"item_index": (B,), "features": (B, D) float32}``, plus
  ``"token_features": (B, T', D)`` and ``"token_mask": (B, T')`` when the corpus has token features.
- :func:`token_batch` / :func:`item_token_batch`: the ``(B, T', D)`` tokens and ``(B, T')`` mask of
  any items (the hybrid tower gathers its training items' tokens with them).
- :class:`IndexDataset`: the integers ``0..n-1``, the dataset every loader samples from.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from grcm.data.corpus import Corpus, CorpusError


class IndexDataset(Dataset):
    """A dataset of the integers ``0..n-1``; batches are assembled by a collate object."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


class QueryBatches:
    """Collate: query rows -> a batch dict, trimmed to the longest query in the batch.

    Args:
        input_ids: ``(Q, T)`` token ids of all queries of one split.
        attention_mask: ``(Q, T)`` bool.
        query_index: ``(Q,)`` global query (caption) index, used to de-duplicate under DDP.
        item_index: ``(Q,)`` item of each query (train) or None.
        gold_items: ``(Q, G)`` gold items padded with -1 (evaluation) or None.
    """

    def __init__(self, input_ids, attention_mask, query_index, item_index=None, gold_items=None):
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.query_index, self.item_index, self.gold_items = query_index, item_index, gold_items

    def __len__(self) -> int:
        return len(self.query_index)

    def __call__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        mask = self.attention_mask[rows_t]
        width = max(int(mask.sum(1).max()), 1)
        batch = {
            "input_ids": self.input_ids[rows_t, :width],
            "attention_mask": mask[:, :width],
            "query_index": self.query_index[rows_t],
        }
        if self.item_index is not None:
            batch["item_index"] = self.item_index[rows_t]
        if self.gold_items is not None:
            batch["gold_items"] = self.gold_items[rows_t]
        return batch


def token_batch(
    token_features: np.ndarray, token_lengths: np.ndarray | None, index: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``index`` ``(B,)`` of ``(N, T, D)`` token features -> ``(B, T', D)`` float32 and ``(B, T')`` bool mask.

    ``mask[b, t]`` is True for item ``b``'s real tokens (``t < token_lengths[index[b]]``; all ``T``
    when ``token_lengths`` is None); ``T'`` is the longest item in the batch (padding columns no
    item uses are dropped). Reads only the requested rows of a memmap.
    """
    index = np.asarray(index, dtype=np.int64)
    full = token_features.shape[1]
    lengths = np.full(len(index), full) if token_lengths is None else np.asarray(token_lengths[index])
    lengths = torch.from_numpy(lengths.astype(np.int64))
    width = int(lengths.max()) if len(index) else 1
    tokens = torch.from_numpy(np.asarray(token_features[index, :width], dtype=np.float32))
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return tokens, mask


def item_token_batch(corpus: Corpus, items: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token features and padding mask of ``items`` ``(B,)`` of ``corpus`` (see :func:`token_batch`)."""
    if corpus.token_features is None:
        raise CorpusError(
            f"corpus {corpus.name!r} has no token features; generate the synthetic corpus with "
            "data.init_args.token_features=true, or write token_features.npy (N, T, D) and token_lengths.npy into "
            "the corpus directory and name them in its corpus.json (grcm extract --per-frame writes them; format in "
            "docs/data.md, \"Token features\"), or set data.init_args.corpus_dir to a corpus that has them."
        )
    index = items.cpu().numpy() if isinstance(items, torch.Tensor) else items
    return token_batch(corpus.token_features, corpus.token_lengths, index)


class ItemBatches:
    """Collate: item rows -> ``{"item_index": (B,), "features": (B, D) float32}`` (memmap friendly).

    With a ``corpus`` that has token features, batches also hold ``"token_features"`` ``(B, T', D)``
    and ``"token_mask"`` ``(B, T')`` (see :func:`item_token_batch`).
    """

    def __init__(self, features: np.ndarray, corpus: Corpus | None = None):
        self.features = features
        self.corpus = corpus if corpus is not None and corpus.has_token_features else None

    def __call__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        index = np.sort(np.asarray(rows, dtype=np.int64))
        batch = {
            "item_index": torch.from_numpy(index),
            "features": torch.from_numpy(np.asarray(self.features[index], dtype=np.float32)),
        }
        if self.corpus is not None:
            batch["token_features"], batch["token_mask"] = item_token_batch(self.corpus, index)
        return batch
