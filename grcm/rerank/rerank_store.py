"""The compressed rerank store: item embeddings in a FAISS index, decoded only for the recalled candidates.

Two-stage retrieval stores, besides the SID table and the trie, one dense vector per item for
stage 2. :func:`build_rerank_store` keeps them in a :class:`~grcm.rerank.index.DenseIndex` of kind
``flat`` (float32, exact), ``sq8`` (8-bit scalar quantiser) or ``pq`` (product quantiser): every
item's code is kept and decoded by id. :func:`rerank_from_store` decodes only a batch's distinct
candidates (``reconstruct``) and ranks them with :func:`~grcm.rerank.candidate_rerank.rerank_candidates`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from grcm.errors import GrcmError
from grcm.rerank.candidate_rerank import DEFAULT_MAX_GATHER_ELEMENTS, PAD_ITEM, rerank_candidates
from grcm.rerank.index import DenseIndex, DenseIndexConfig

__all__ = ["RERANK_STORE_KINDS", "build_rerank_store", "check_rerank_store_kind", "rerank_from_store"]

#: The index kinds that keep every item's code, decodable by id (the IVF and HNSW kinds are for search).
RERANK_STORE_KINDS = ("flat", "sq8", "pq")


def check_rerank_store_kind(config: DenseIndexConfig) -> None:
    """Raise a :class:`~grcm.errors.GrcmError` unless ``config.kind`` is one of :data:`RERANK_STORE_KINDS`."""
    if config.kind not in RERANK_STORE_KINDS:
        raise GrcmError(
            f"TwoStageEvaluation.rerank_store.kind={config.kind!r}: a rerank store is one of 'flat', 'sq8' or "
            "'pq' (every item's code kept, decoded by id); the IVF and HNSW kinds are for search"
        )


def build_rerank_store(item_embeddings: Any, config: DenseIndexConfig | None = None) -> DenseIndex:
    """The compact rerank store: a CPU :class:`DenseIndex` over (N, E) item embeddings.

    ``config`` picks the kind (``flat``, ``sq8``, ``pq``; default ``flat``). The store is
    always built on CPU (FAISS has no GPU ``sq8``/``pq`` flat-code index); the vectors
    decoded from it move to the evaluation device.
    """
    config = config or DenseIndexConfig()
    check_rerank_store_kind(config)
    return DenseIndex.build(item_embeddings, replace(config, use_gpu=False))


def rerank_from_store(
    query_embeddings: Tensor,
    candidate_items: Tensor,
    store: DenseIndex,
    k: int,
    max_gather_elements: int = DEFAULT_MAX_GATHER_ELEMENTS,
    generative_scores: Tensor | None = None,
    generative_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """:func:`rerank_candidates` with the item embeddings held in a FAISS index.

    Only the distinct candidates of the batch are decoded from the store
    (``store.reconstruct``: exact for ``flat``, the quantised vectors for ``sq8``
    and ``pq``) and scored by inner product with the queries; the rest of the
    corpus is never decoded. Conventions (padding, duplicates, ties by ascending
    item index, ``-1``/``-inf`` padding of short rows) and the score fusion are those of
    :func:`rerank_candidates`, so a ``flat`` store gives exactly its result.

    Args:
        query_embeddings: (Q, E) float query vectors.
        candidate_items: (Q, M) integer item indices, ``-1`` = padding, duplicates allowed.
        store: index over the (N, E) item embeddings, row i = item i.
        k: ranked items returned per query, >= 1.
        max_gather_elements: memory bound of one chunk (see :func:`rerank_candidates`).
        generative_scores: (Q, M) stage-1 scores of the candidates, for ``generative_weight`` != 0.
        generative_weight: weight of the stage-1 score in the fused score (see :func:`rerank_candidates`).

    Returns:
        ``(ranked, scores)``: LongTensor (Q, k) item indices padded with ``-1`` and
        float (Q, k) scores, on ``query_embeddings.device``.
    """
    if not isinstance(store, DenseIndex):
        raise TypeError(f"store must be a DenseIndex, got {type(store).__name__}")
    if query_embeddings.dim() == 2 and query_embeddings.shape[1] != store.dim:
        raise ValueError(
            f"query embeddings are {query_embeddings.shape[1]}-d but the rerank store holds {store.dim}-d "
            "vectors; build the store from the same dual-tower model"
        )
    device = query_embeddings.device
    candidates = candidate_items.to(device)
    if candidates.dtype.is_floating_point or candidates.dtype == torch.bool:
        raise ValueError(f"candidate_items must hold integer item indices, got dtype {candidates.dtype}")
    candidates = candidates.long()
    distinct = torch.unique(candidates[candidates != PAD_ITEM])  # (U,) ascending: local order = item order
    if distinct.numel() and (int(distinct[0]) < 0 or int(distinct[-1]) >= store.num_items):
        raise ValueError(
            f"candidate_items span [{int(distinct[0])}, {int(distinct[-1])}] but the rerank store holds items "
            f"[0, {store.num_items}) with -1 as padding; the candidates and the store must come from the same corpus"
        )
    if distinct.numel() == 0:  # nothing recalled: an all-padding table of one row keeps the shapes
        vectors = torch.zeros(1, store.dim, device=device)
        local = torch.full_like(candidates, PAD_ITEM)
    else:
        vectors = torch.from_numpy(store.reconstruct(distinct.cpu().numpy())).to(device)  # (U, E)
        local = torch.searchsorted(distinct, candidates.clamp(min=0).contiguous())
        local = torch.where(candidates == PAD_ITEM, PAD_ITEM, local)
    ranked_local, scores = rerank_candidates(
        query_embeddings, local, vectors, k, max_gather_elements, generative_scores, generative_weight
    )
    if distinct.numel() == 0:
        return ranked_local, scores
    ranked = torch.where(ranked_local == PAD_ITEM, PAD_ITEM, distinct[ranked_local.clamp(min=0)])
    return ranked, scores
