"""Stage 2 of two-stage retrieval as pure tensor functions: rank each query's recalled candidates.

Stage 1 (a generative retriever) recalls, per query, the items of its top beams: a ``(Q, M)``
table of item indices, ``-1`` padded, an item possibly repeated (recalled through several SIDs),
with the log-probability of the beam that recalled each (its *generative score*). Here:

* :func:`rerank_candidates` scores each query's distinct candidates by inner product with
  its dense embedding (a gathered matmul ``item_embeddings[candidates] @ query``), optionally
  fused with the generative score, and returns the best k with the project's tie-break;
* :func:`count_candidates` counts each query's distinct candidates (the work stage 2 does);
* :func:`full_dense_ranking` is the reference: exact dense retrieval over the whole corpus.

No FAISS and no Lightning: :mod:`grcm.rerank.rerank_store` runs the same rerank over a
compressed store, :mod:`grcm.rerank.two_stage` evaluates it behind a retriever.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grcm.metrics import deduplicate_ranked, ranks_from_scores

__all__ = [
    "DEFAULT_MAX_GATHER_ELEMENTS",
    "PAD_ITEM",
    "count_candidates",
    "full_dense_ranking",
    "rerank_candidates",
]

PAD_ITEM = -1
DEFAULT_MAX_GATHER_ELEMENTS = 1 << 25  # gathered (queries x candidates x dim) entries per chunk: 128 MiB in float32


def _check_rerank_inputs(query_embeddings: Tensor, candidate_items: Tensor, item_embeddings: Tensor) -> None:
    if not all(isinstance(t, Tensor) for t in (query_embeddings, candidate_items, item_embeddings)):
        raise TypeError("rerank_candidates takes torch tensors (query_embeddings, candidate_items, item_embeddings)")
    if query_embeddings.dim() != 2 or item_embeddings.dim() != 2:
        raise ValueError(
            f"query_embeddings must be (Q, E) and item_embeddings (N, E); got {tuple(query_embeddings.shape)} "
            f"and {tuple(item_embeddings.shape)}"
        )
    if query_embeddings.shape[1] != item_embeddings.shape[1]:
        raise ValueError(
            f"query embeddings are {query_embeddings.shape[1]}-d but item embeddings are "
            f"{item_embeddings.shape[1]}-d; encode both with the same dual-tower model"
        )
    if candidate_items.dim() != 2 or candidate_items.shape[0] != query_embeddings.shape[0]:
        raise ValueError(
            f"candidate_items must be (Q, M) with one row per query (Q={query_embeddings.shape[0]}); "
            f"got shape {tuple(candidate_items.shape)}"
        )
    if candidate_items.dtype.is_floating_point or candidate_items.dtype == torch.bool:
        raise ValueError(f"candidate_items must hold integer item indices, got dtype {candidate_items.dtype}")
    if candidate_items.numel():
        low, high = int(candidate_items.min()), int(candidate_items.max())
        if low < PAD_ITEM or high >= item_embeddings.shape[0]:
            raise ValueError(
                f"candidate_items span [{low}, {high}] but item indices must lie in [0, "
                f"{item_embeddings.shape[0]}) with -1 as padding; the candidates and the item embeddings "
                "must come from the same corpus"
            )


def _distinct_candidates(
    candidate_items: Tensor, generative_scores: Tensor | None, generative_weight: float, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Each row's distinct candidates ``(Q, M)`` (``-1`` padded) and, when fusing, each one's best stage-1 score."""
    candidates = candidate_items.to(device)
    if generative_weight == 0.0:
        return deduplicate_ranked(candidates), None
    if generative_scores is None:
        raise ValueError(
            f"generative_weight={generative_weight} fuses the stage-1 scores into the rerank, but no "
            "generative_scores were given; pass the (Q, M) beam scores of the candidates or set the weight to 0"
        )
    if generative_scores.shape != candidate_items.shape or not generative_scores.dtype.is_floating_point:
        raise ValueError(
            f"generative_scores must be a float tensor shaped like candidate_items {tuple(candidate_items.shape)}; "
            f"got {generative_scores.dtype} {tuple(generative_scores.shape)}"
        )
    padding = candidates == PAD_ITEM
    dtype = torch.promote_types(generative_scores.dtype, torch.float32)
    beam_scores = generative_scores.to(device=device, dtype=dtype).masked_fill(padding, float("-inf"))
    if not bool(torch.isfinite(beam_scores[~padding]).all()):
        raise ValueError("generative_scores must be finite for every candidate (only -1 padding may be -inf)")
    # best stage-1 score first, then keep each item's first occurrence: an item recalled by several
    # beams keeps its best beam's score (the rerank's output order does not depend on the input order)
    order = beam_scores.argsort(dim=1, descending=True, stable=True)
    return deduplicate_ranked(candidates.gather(1, order), beam_scores.gather(1, order))


def rerank_candidates(
    query_embeddings: Tensor,
    candidate_items: Tensor,
    item_embeddings: Tensor,
    k: int,
    max_gather_elements: int = DEFAULT_MAX_GATHER_ELEMENTS,
    generative_scores: Tensor | None = None,
    generative_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Score each query's candidates by inner product (optionally fused with stage 1) and return its k best.

    Each query is scored only against its own candidates, through a gathered
    matmul: ``item_embeddings[candidates]`` (Q, M, E) times the query (Q, E, 1).
    Queries are processed in chunks so that at most ``max_gather_elements``
    gathered entries exist at a time.

    Conventions:

    * ``-1`` is padding: it is never scored and never ranked.
    * A candidate repeated in a row (an item recalled through several SIDs) is
      scored once; it appears at most once in the output.
    * Ties: equal scores are ordered by ascending item index, the tie-break of
      :func:`grcm.metrics.ranks_from_scores`. The result therefore equals
      ``ranks_from_scores`` over the full score matrix with every
      non-candidate set to ``-inf``, cut at the number of distinct candidates.
    * When a query has fewer than ``k`` distinct candidates the row is padded
      with item ``-1`` and score ``-inf``.
    * Score fusion: with ``generative_weight`` w > 0 a candidate's score is
      ``<query, item> + w * generative_score``, where ``generative_score`` is the
      stage-1 log-probability of the beam that recalled it (the best one when
      several did). ``w = 0`` is the pure dense rerank.

    Args:
        query_embeddings: (Q, E) float query vectors (e.g. ``DualTower.encode_queries``).
        candidate_items: (Q, M) integer item indices, ``-1`` = padding, duplicates allowed.
        item_embeddings: (N, E) float item vectors, row i is item i (e.g. ``DualTower.encode_corpus``).
        k: number of ranked items returned per query, >= 1.
        max_gather_elements: memory bound of one chunk, in gathered scalars.
        generative_scores: (Q, M) float stage-1 score of each candidate (finite except on padding);
            needed only when ``generative_weight`` is not 0.
        generative_weight: w, the weight of the stage-1 score in the fused score.

    Returns:
        ``(ranked, scores)``: LongTensor (Q, k) item indices padded with ``-1``, and
        FloatTensor (Q, k) their scores (``-inf`` on padding), best first. Both live on
        ``item_embeddings.device``; scores have the promoted float dtype of the inputs
        (at least float32).
    """
    _check_rerank_inputs(query_embeddings, candidate_items, item_embeddings)
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = item_embeddings.device
    dtype = torch.promote_types(torch.promote_types(query_embeddings.dtype, item_embeddings.dtype), torch.float32)
    generative_weight = float(generative_weight)
    # (Q, M): distinct items, then -1; best_beam_scores (Q, M): their best stage-1 scores when fusing
    distinct, best_beam_scores = _distinct_candidates(candidate_items, generative_scores, generative_weight, device)
    queries = query_embeddings.to(device=device, dtype=dtype)
    num_queries, width = distinct.shape
    dim = item_embeddings.shape[1]
    scores = torch.full((num_queries, width), float("-inf"), dtype=dtype, device=device)
    chunk = max(1, int(max_gather_elements) // max(width * dim, 1))
    for start in range(0, num_queries, chunk):
        rows = distinct[start : start + chunk]
        gathered = item_embeddings[rows.clamp(min=0)].to(dtype)  # (q, M, E)
        chunk_scores = torch.bmm(gathered, queries[start : start + chunk].unsqueeze(2)).squeeze(2)
        if best_beam_scores is not None:
            chunk_scores = chunk_scores + generative_weight * best_beam_scores[start : start + chunk].to(dtype)
        scores[start : start + chunk] = chunk_scores.masked_fill(rows == PAD_ITEM, float("-inf"))
    if torch.isnan(scores).any():
        raise ValueError("dense scores contain NaN; the query or item embeddings hold NaN values")
    # Sort by item index first, then stably by descending score: ties keep ascending item order.
    by_item = torch.where(distinct == PAD_ITEM, torch.iinfo(torch.long).max, distinct).argsort(dim=1, stable=True)
    items = distinct.gather(1, by_item)
    scores = scores.gather(1, by_item)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    ranked_items, ranked_scores = items.gather(1, order), scores.gather(1, order)
    if ranked_items.shape[1] < k:
        pad = k - ranked_items.shape[1]
        ranked_items = torch.nn.functional.pad(ranked_items, (0, pad), value=PAD_ITEM)
        ranked_scores = torch.nn.functional.pad(ranked_scores, (0, pad), value=float("-inf"))
    return ranked_items, ranked_scores



def count_candidates(candidate_items: Tensor) -> Tensor:
    """Distinct candidates per query: (Q, M) item indices with ``-1`` padding -> (Q,) long."""
    return (deduplicate_ranked(candidate_items) != PAD_ITEM).sum(dim=1)


def full_dense_ranking(
    query_embeddings: Tensor, item_embeddings: Tensor, k: int, max_score_elements: int = 1 << 24
) -> Tensor:
    """Exact dense retrieval over the whole corpus, with the project tie-break (reference only).

    Args:
        query_embeddings: (Q, E) float.
        item_embeddings: (N, E) float.
        k: ranked items per query.
        max_score_elements: queries are scored in chunks of at most this many (query, item) scores.

    Returns:
        LongTensor (Q, k) item indices, best first (ties: lower item index first).
    """
    queries = query_embeddings.to(device=item_embeddings.device, dtype=item_embeddings.dtype)
    chunk = max(1, int(max_score_elements) // max(item_embeddings.shape[0], 1))
    ranked = [
        ranks_from_scores((queries[start : start + chunk] @ item_embeddings.T).float(), k)
        for start in range(0, queries.shape[0], chunk)
    ]
    return torch.cat(ranked) if ranked else torch.zeros(0, k, dtype=torch.long, device=item_embeddings.device)
