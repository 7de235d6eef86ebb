"""Item-level retrieval metrics: hit-style Recall@K and MRR@K over ranked item lists.

Definitions (the ones the ACE and GRDR papers report):

* A ranked list is a row of item indices, best first; ``-1`` is padding (no item).
  Before ranks are counted the row is de-duplicated, keeping the first occurrence
  of each item, so an item decoded through several of its semantic IDs counts once
  and a repeated candidate does not push the others down.
* ``recall@K`` of a query is 1 when any of its gold items is among the first K
  distinct items, else 0. It is *not* the fraction of gold items retrieved.
* ``mrr@K`` of a query is 1 / rank of the first gold item among the first K
  distinct items (rank 1 is best), 0 when there is none.
* A query's gold items are a row padded with ``-1``; a query with no gold item
  scores 0 everywhere.

Ties: these functions take ranked lists, so any tie between scores is broken
upstream, where the list is made. :func:`ranks_from_scores` is the reference
tie-break used in this project: equal scores are ordered by ascending item index.

Under DDP, Lightning pads the last evaluation batch by repeating samples.
:class:`ItemRetrievalMetrics` therefore keeps one value per query id and, after
gathering all ranks, counts every query id once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, overload

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "ItemRetrievalMetrics",
    "PerQueryMeans",
    "SeenUnseenMetrics",
    "candidate_recall",
    "deduplicate_ranked",
    "fixed_width",
    "first_occurrence",
    "item_level_hits",
    "metric_names",
    "ranks_from_scores",
]

PAD_ITEM = -1


def _check_item_matrix(tensor: Any, name: str) -> Tensor:
    """Validate a (Q, K) integer matrix of item indices padded with -1."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of item indices, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape (num_queries, K), got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer item indices (use .long()), got dtype {tensor.dtype}")
    if tensor.numel() and int(tensor.min()) < PAD_ITEM:
        raise ValueError(
            f"{name} holds values below -1; item indices are >= 0 and -1 is the only padding value"
        )
    return tensor.long()


def _check_ks(ks: Sequence[int], mrr_k: int) -> tuple[tuple[int, ...], int]:
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks) or int(mrr_k) < 1:
        raise ValueError(f"cut-offs must be >= 1, got ks={ks}, mrr_k={mrr_k}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must not repeat a cut-off, got {ks}")
    return ks, int(mrr_k)


def metric_names(ks: Sequence[int] = (1, 5, 10), mrr_k: int = 10) -> list[str]:
    """Names of the values :func:`item_level_hits` returns, in order: ``recall@k`` for each k, then ``mrr@mrr_k``."""
    return [f"recall@{k}" for k in ks] + [f"mrr@{mrr_k}"]


def fixed_width(ranked: Tensor, width: int) -> Tensor:
    """The first ``width`` columns of (Q, M) ranked item indices, padded on the right with ``-1`` when M < width."""
    return torch.nn.functional.pad(ranked, (0, max(0, int(width) - ranked.shape[1])), value=PAD_ITEM)[:, :width]


@overload
def deduplicate_ranked(ranked: Tensor) -> Tensor: ...
@overload
def deduplicate_ranked(ranked: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]: ...


def deduplicate_ranked(ranked: Tensor, scores: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Drop padding and repeated items from each ranked row, keeping first occurrences in order.

    Args:
        ranked: LongTensor (Q, K) of item indices, best first, ``-1`` = padding.
            Padding may appear anywhere in the row.
        scores: optional float (Q, K), one score per entry of ``ranked``; each kept
            item keeps the score of its first occurrence.

    Returns:
        LongTensor (Q, K): the distinct items of each row in their original order,
        followed by ``-1`` padding; with ``scores``, the pair (items, scores) where
        the scores (Q, K) follow their items and are ``-inf`` on padding.
    """
    ranked = _check_item_matrix(ranked, "ranked")
    if scores is not None and scores.shape != ranked.shape:
        raise ValueError(f"scores must be shaped like ranked {tuple(ranked.shape)}; got {tuple(scores.shape)}")
    if ranked.numel() == 0:
        return ranked.clone() if scores is None else (ranked.clone(), scores.clone())
    present = ranked != PAD_ITEM
    # A stable sort groups equal items with their earliest position first; every later member of a
    # group is a repeat. Padding sorts last (as the largest key), so it never marks an item a repeat.
    keys = torch.where(present, ranked, torch.iinfo(ranked.dtype).max)
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)
    repeat_in_sorted = torch.zeros_like(present)
    repeat_in_sorted[:, 1:] = sorted_keys[:, 1:] == sorted_keys[:, :-1]
    is_repeat = torch.zeros_like(repeat_in_sorted).scatter_(1, order, repeat_in_sorted)
    keep = present & ~is_repeat
    # Move kept entries to the front; a stable sort on the drop flag preserves their order.
    front_first = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    items = torch.where(keep, ranked, PAD_ITEM).gather(1, front_first)
    if scores is None:
        return items
    return items, torch.where(keep, scores, float("-inf")).gather(1, front_first)


def _gold_mask(ranked: Tensor, gold_items: Tensor) -> Tensor:
    """Bool (Q, K): whether ``ranked[q, j]`` is one of query q's gold items. Padding never matches."""
    gold = gold_items.to(ranked.device)
    matches = (ranked.unsqueeze(2) == gold.unsqueeze(1)) & (gold.unsqueeze(1) != PAD_ITEM)
    return matches.any(dim=2) & (ranked != PAD_ITEM)


def _check_pair(ranked_items: Any, gold_items: Any) -> tuple[Tensor, Tensor]:
    ranked_items = _check_item_matrix(ranked_items, "ranked_items")
    gold_items = _check_item_matrix(gold_items, "gold_items")
    if ranked_items.shape[0] != gold_items.shape[0]:
        raise ValueError(
            f"ranked_items has {ranked_items.shape[0]} queries but gold_items has {gold_items.shape[0]}; "
            "pass one row of each per query"
        )
    return ranked_items, gold_items


def item_level_hits(
    ranked_items: Tensor,
    gold_items: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    mrr_k: int = 10,
) -> dict[str, Tensor]:
    """Per-query hit-style Recall@k and MRR@mrr_k over distinct items.

    Args:
        ranked_items: LongTensor (Q, K) ranked item indices, best first, ``-1`` = padding.
            Repeated items count once, at their first position.
        gold_items: LongTensor (Q, G) gold item indices per query, ``-1`` = padding.
        ks: cut-offs for ``recall@k``. A cut-off larger than K counts the whole list.
        mrr_k: cut-off for ``mrr@mrr_k``.

    Returns:
        Dict ``{"recall@k": FloatTensor (Q,), ..., "mrr@mrr_k": FloatTensor (Q,)}``
        in the order of :func:`metric_names`.
    """
    ranked_items, gold_items = _check_pair(ranked_items, gold_items)
    ks, mrr_k = _check_ks(ks, mrr_k)
    distinct = deduplicate_ranked(ranked_items)
    hit = _gold_mask(distinct, gold_items)
    num_queries, width = hit.shape
    has_hit = hit.any(dim=1)
    if width == 0:
        first_rank = torch.ones(num_queries, dtype=torch.long, device=hit.device)
    else:
        # argmax returns the first maximal position, i.e. the first gold hit.
        first_rank = hit.to(torch.uint8).argmax(dim=1) + 1
    values = {f"recall@{k}": (has_hit & (first_rank <= k)).float() for k in ks}
    within = has_hit & (first_rank <= mrr_k)
    values[f"mrr@{mrr_k}"] = torch.where(within, 1.0 / first_rank.float(), 0.0)
    return values


def candidate_recall(candidates: Tensor, gold_items: Tensor) -> Tensor:
    """Per-query hit of a whole candidate list (e.g. the stage-1 pool of a two-stage retriever).

    Args:
        candidates: LongTensor (Q, M) item indices in any order, ``-1`` = padding.
        gold_items: LongTensor (Q, G) gold item indices, ``-1`` = padding.

    Returns:
        FloatTensor (Q,): 1 when any gold item is anywhere in the list, else 0.
    """
    candidates, gold_items = _check_pair(candidates, gold_items)
    return _gold_mask(candidates, gold_items).any(dim=1).float()


def ranks_from_scores(scores: Tensor, k: int) -> Tensor:
    """Top-k item indices by descending score; ties go to the lower item index.

    This is the project's reference tie-break, exact and deterministic (a full
    stable sort, so meant for tests and small corpora, not for serving).

    Args:
        scores: FloatTensor (Q, N), higher is better. NaN is rejected.
        k: number of items to return per query, >= 1.

    Returns:
        LongTensor (Q, k) item indices, padded with ``-1`` when k > N.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError("scores must be a torch.Tensor of shape (num_queries, num_items)")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; fix the scoring model or mask those entries with -inf")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : int(k)]
    if order.shape[1] < k:
        padding = order.new_full((order.shape[0], int(k) - order.shape[1]), PAD_ITEM)
        order = torch.cat([order, padding], dim=1)
    return order


def first_occurrence(ids: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct id.

    Args:
        ids: LongTensor (Q,).

    Returns:
        LongTensor (U,) positions into ``ids``, one per distinct id, in ascending id order.
    """
    unique, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((unique.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")


class ItemRetrievalMetrics(Metric):
    """Dataset-level item Recall@k and MRR@k, counting each query id once (DDP-safe).

    States are concatenated per-query values and query ids (synced with ``cat``);
    :meth:`compute` keeps the first value seen for each query id, so the samples
    DDP repeats to pad the last batch, or a query evaluated twice, do not bias the
    mean.

    Args:
        ks: cut-offs for ``recall@k``.
        mrr_k: cut-off for ``mrr@mrr_k``.
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``dist_sync_on_step``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10), mrr_k: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks, self.mrr_k = _check_ks(ks, mrr_k)
        self.names = metric_names(self.ks, self.mrr_k)
        self.add_state("query_ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, ranked_items: Tensor, gold_items: Tensor, query_ids: Tensor) -> None:
        """Add a batch.

        Args:
            ranked_items: LongTensor (B, K) ranked item indices, ``-1`` = padding.
            gold_items: LongTensor (B, G) gold item indices, ``-1`` = padding.
            query_ids: LongTensor (B,) dataset-wide query ids (e.g. ``batch["query_index"]``).
        """
        if not isinstance(query_ids, Tensor) or query_ids.dim() != 1:
            raise ValueError("query_ids must be a 1-D torch.Tensor with one id per query")
        if query_ids.numel() != ranked_items.shape[0]:
            raise ValueError(
                f"query_ids has {query_ids.numel()} entries but ranked_items has {ranked_items.shape[0]} rows"
            )
        hits = item_level_hits(ranked_items, gold_items, ks=self.ks, mrr_k=self.mrr_k)
        self.query_ids.append(query_ids.to(device=self.device, dtype=torch.long))
        self.values.append(torch.stack([hits[name] for name in self.names], dim=1).to(self.device))

    def compute(self) -> dict[str, Tensor]:
        """Mean of each metric over distinct query ids; zeros when nothing was added."""
        if isinstance(self.query_ids, list) and not self.query_ids:
            return {name: torch.zeros((), device=self.device) for name in self.names}
        ids = dim_zero_cat(self.query_ids)
        values = dim_zero_cat(self.values).reshape(-1, len(self.names))
        kept = values[first_occurrence(ids)]
        return {name: kept[:, column].mean() for column, name in enumerate(self.names)}

    def num_queries(self) -> int:
        """Number of distinct query ids added so far (on this process, before sync)."""
        if isinstance(self.query_ids, list) and not self.query_ids:
            return 0
        return int(torch.unique(dim_zero_cat(self.query_ids)).numel())


class PerQueryMeans(Metric):
    """Means of named per-query values over distinct query ids (DDP-safe, like :class:`ItemRetrievalMetrics`).

    A mean over batches would count the queries DDP repeats to pad the last shard twice; this keeps
    the first value seen for each query id after gathering all ranks.

    Args:
        names: the value names; :meth:`update` takes one (B,) tensor per name.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.names = list(names)
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"PerQueryMeans needs distinct value names, got {self.names}")
        self.add_state("query_ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, values: Mapping[str, Tensor], query_ids: Tensor) -> None:
        """Add a batch: ``values[name]`` (B,) per name, ``query_ids`` (B,) dataset-wide ids."""
        missing = set(self.names) - set(values)
        if missing:
            raise ValueError(f"PerQueryMeans.update is missing values {sorted(missing)}")
        if not isinstance(query_ids, Tensor) or query_ids.dim() != 1 or any(
            values[name].numel() != query_ids.numel() for name in self.names
        ):
            raise ValueError("query_ids must be a 1-D torch.Tensor with one id per value")
        self.query_ids.append(query_ids.to(device=self.device, dtype=torch.long))
        self.values.append(torch.stack([values[name].float().to(self.device) for name in self.names], dim=1))

    def compute(self) -> dict[str, Tensor]:
        """Mean of every value over distinct query ids (the first value seen per id); zeros when empty."""
        if isinstance(self.query_ids, list) and not self.query_ids:
            return {name: torch.zeros((), device=self.device) for name in self.names}
        ids = dim_zero_cat(self.query_ids)
        values = dim_zero_cat(self.values).reshape(-1, len(self.names))[first_occurrence(ids)]
        return {name: values[:, column].mean() for column, name in enumerate(self.names)}


class SeenUnseenMetrics(Metric):
    """Item-level metrics of two query groups, *seen* and *unseen* (gold items without training queries).

    Per query: ``recall@k`` and ``mrr@k`` of its ranked list (:func:`item_level_hits`) and
    ``candidate_recall`` (its gold item anywhere in the recalled pool, :func:`candidate_recall`).
    Each query id counts once (DDP-safe, as :class:`ItemRetrievalMetrics`).

    :meth:`compute` returns ``{group}/{name}`` for both groups and every name, plus
    ``{group}/queries`` (distinct query ids); a group without queries reports zeros.
    """

    is_differentiable = False
    full_state_update = False
    GROUPS = ("seen", "unseen")

    def __init__(self, ks: Sequence[int] = (1, 5, 10), mrr_k: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks, self.mrr_k = _check_ks(ks, mrr_k)
        self.names = [*metric_names(self.ks, self.mrr_k), "candidate_recall"]
        self.add_state("query_ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("unseen", default=[], dist_reduce_fx="cat")

    def update(self, ranked_items: Tensor, pool_hits: Tensor, gold_items: Tensor, query_ids: Tensor,
               unseen: Tensor) -> None:
        """Add a batch: ranked items (B, K), pool hits (B,) (e.g. :func:`candidate_recall`), gold items (B, G),
        query ids (B,) and (B,) bool, True for a query of the unseen group."""
        if query_ids.dim() != 1 or not (query_ids.numel() == ranked_items.shape[0] == pool_hits.numel()
                                        == unseen.numel()):
            raise ValueError("SeenUnseenMetrics.update needs one ranked row, pool hit, query id and group per query")
        hits = item_level_hits(ranked_items, gold_items, ks=self.ks, mrr_k=self.mrr_k)
        columns = [hits[name] for name in self.names[:-1]] + [pool_hits.float().to(ranked_items.device)]
        self.query_ids.append(query_ids.to(device=self.device, dtype=torch.long))
        self.values.append(torch.stack(columns, dim=1).to(self.device))
        self.unseen.append(unseen.to(device=self.device, dtype=torch.bool))

    def compute(self) -> dict[str, Tensor]:
        zero = torch.zeros((), device=self.device)
        if isinstance(self.query_ids, list) and not self.query_ids:
            return {f"{g}/{name}": zero for g in self.GROUPS for name in [*self.names, "queries"]}
        ids = dim_zero_cat(self.query_ids)
        first = first_occurrence(ids)
        values = dim_zero_cat(self.values).reshape(-1, len(self.names))[first]
        unseen = dim_zero_cat(self.unseen).reshape(-1)[first]
        result = {}
        for group, rows in zip(self.GROUPS, (~unseen, unseen)):
            count = rows.sum()
            for column, name in enumerate(self.names):
                result[f"{group}/{name}"] = values[rows, column].sum() / count.clamp(min=1)
            result[f"{group}/queries"] = count.float()
        return result
