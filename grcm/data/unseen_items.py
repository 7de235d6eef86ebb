"""Items without training queries: holding a share of items out of training, and telling seen from unseen.

Real benchmarks' standard splits are inductive (test items have no training queries) and so are
deployments (items arrive after training). On a corpus that has training captions for every item
(the synthetic one), :func:`hold_out_items` makes that setting: the chosen items lose their training
captions and extra queries (set aside, split ``""``), keep their features, stay in the corpus (so in
every SID table, trie and rerank pool) and keep their val/test captions.

Reporting: :func:`seen_items` marks the items with at least one training query and
:func:`unseen_queries` the evaluation queries none of whose gold items is seen; the retrievers and
the two-stage callback log their metrics per group (:class:`grcm.metrics.SeenUnseenMetrics`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

from grcm.data.corpus import Corpus, CorpusError

__all__ = ["choose_unseen_items", "hold_out_items", "seen_items", "seen_items_of", "unseen_queries"]


def choose_unseen_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
    """``(N,)`` bool: ``round(fraction * N)`` items drawn uniformly (seeded) to be held out of training."""
    if not 0.0 <= fraction < 1.0:
        raise CorpusError(f"data.unseen_items must be a share in [0, 1), got {fraction}.")
    chosen = np.zeros(num_items, dtype=bool)
    count = int(round(fraction * num_items))
    if count:
        chosen[np.random.default_rng([seed, 25]).choice(num_items, size=count, replace=False)] = True
    return chosen


def hold_out_items(corpus: Corpus, fraction: float, seed: int) -> tuple[Corpus, np.ndarray]:
    """A copy of ``corpus`` whose chosen items have no training queries, and the ``(N,)`` bool mask of them.

    The chosen items' ``train`` captions are set aside (split ``""``: neither trained on nor evaluated; the
    caption rows, hence query ids, are unchanged) and their extra queries removed. Features, item ids and
    val/test captions stay as they are.
    """
    unseen = choose_unseen_items(corpus.num_items, fraction, seed)
    split = corpus.caption_split.copy()
    split[(split == "train") & unseen[corpus.caption_item]] = ""
    keep = ~unseen[corpus.extra_item] if len(corpus.extra_item) else np.zeros(0, dtype=bool)
    extra = {
        "extra_item": corpus.extra_item[keep],
        "extra_text": [text for text, k in zip(corpus.extra_text, keep) if k],
        "extra_source": [s for s, k in zip(corpus.extra_source, keep) if k] if corpus.extra_source else [],
    }
    return dataclasses.replace(corpus, caption_split=split, **extra), unseen


def seen_items(train_items: Tensor, num_items: int) -> Tensor:
    """``(N,)`` bool: the items that appear among the ``(Q,)`` item indices of the training queries."""
    seen = torch.zeros(num_items, dtype=torch.bool)
    seen[train_items.long().cpu()] = True
    return seen


def seen_items_of(datamodule: Any) -> Tensor | None:
    """:func:`seen_items` of a query-serving data module's training split; None without one (or queries)."""
    corpus = getattr(datamodule, "corpus", None)
    if corpus is None or getattr(datamodule, "serve", "queries") != "queries":
        return None
    return seen_items(datamodule.query_batches("train").item_index, corpus.num_items)


def unseen_queries(gold_items: Tensor, seen: Tensor) -> Tensor:
    """``(B,)`` bool: queries none of whose gold items (``(B, G)``, ``-1`` padded) has a training query."""
    seen = seen.to(gold_items.device)
    valid = gold_items >= 0
    return ~(valid & seen[gold_items.clamp(min=0)]).any(dim=1)
