"""GRDR's query routing under DDP: computed once on rank 0, broadcast to every rank.

Which view of its item each training query is trained to decode (:mod:`grcm.tokenizers.query_routing`):
``first_query`` (alias ``cluster``) and ``random`` routes are set once in ``setup``; ``matched`` starts
from the facet prototypes in ``setup`` and re-matches each item's query groups to its current views
every epoch; ``nearest`` re-routes every query to the item's closest view every epoch. The embeddings and K-Means come from one process so that every replica holds
the same routes (:class:`grcm.ddp.ReplicaConsistencyCheck`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from grcm.ddp import broadcast_from_rank_zero, is_rank_zero
from grcm.tokenizers.multiview import MultiViewTokenizer
from grcm.tokenizers.query_routing import (
    cluster_routes,
    embed_queries,
    facet_routes,
    matched_routes,
    nearest_view_routes,
    random_routes,
)


def route_training_queries(
    module: L.LightningModule,
    query_index: np.ndarray,
    item: np.ndarray,
    corpus: Any,
    routing: str,
    query_encoder: str,
    num_views: int,
    seed: int,
    need_embeddings: bool,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Guidance embeddings (n, E) (or None), routes (n,) and groups (n,) (or None) of n training queries.

    Rank 0 embeds the query texts (``corpus.caption_text`` then ``corpus.extra_text`` by query id, ids
    (n,), items (n,)) with ``query_encoder``, clusters each item's queries into groups and routes them
    (``random``: seeded per item, no groups; ``matched``: groups matched to the facet prototypes; else
    group g -> view g); the other ranks receive all three.
    """
    embeddings = routes = groups = None
    if is_rank_zero(module):
        if need_embeddings:
            offset = len(corpus.caption_text)
            texts = [corpus.caption_text[q] if q < offset else corpus.extra_text[q - offset] for q in query_index]
            embeddings = embed_queries(texts, query_encoder)
        if routing == "random":
            routes = random_routes(item, num_views, seed)
        else:
            routes = groups = cluster_routes(embeddings, item, num_views, seed)
            if routing == "matched" and num_views > 1:
                routes, _ = facet_routes(embeddings, item, groups, num_views, seed)
    return broadcast_from_rank_zero(module, (embeddings, routes, groups))


@torch.no_grad()
def nearest_routes(
    module: L.LightningModule,
    tokenizer: MultiViewTokenizer,
    query_embeddings: Tensor,
    query_items: Tensor,
    features: Tensor,
) -> Tensor:
    """(n,) long: the closest view of each query's item, for n queries' embeddings (n, E) and items (n,).

    Computed on rank 0 from the projected query embeddings and the items' view latents (of ``features``
    (N, D)), broadcast; returned on ``features.device``.
    """
    routes = None
    if is_rank_zero(module):
        device = features.device
        queries = tokenizer.query_projection(query_embeddings.to(device))
        routes = nearest_view_routes(queries, tokenizer.view_latents(features[query_items.to(device)])).cpu()
    return broadcast_from_rank_zero(module, routes).to(features.device)


@torch.no_grad()
def rematched_routes(
    module: L.LightningModule,
    tokenizer: MultiViewTokenizer,
    query_embeddings: Tensor,
    query_items: Tensor,
    query_groups: Tensor,
    features: Tensor,
) -> Tensor:
    """(n,) long: each item's query groups matched one-to-one to its current views (:func:`matched_routes`).

    For n queries' guidance embeddings (n, E), items (n,) and groups (n,); the view latents are those of
    ``features`` (N, D). Computed on rank 0, broadcast; returned on ``features.device``.
    """
    routes = None
    if is_rank_zero(module):
        device = features.device
        queries = tokenizer.query_projection(query_embeddings.to(device))
        routes = matched_routes(queries, query_items.to(device), query_groups.to(device),
                                tokenizer.view_latents(features)).cpu()
    return broadcast_from_rank_zero(module, routes).to(features.device)


def reroute(module: L.LightningModule, tokenizer: MultiViewTokenizer, sids: Any, nearest: bool) -> Tensor:
    """Route each training query of ``sids`` (:class:`~grcm.retriever.grdr.state.GRDRState`) to its item's
    closest view (``nearest``) or re-match each item's query groups to its current views; writes
    ``sids.query_routes`` and returns the () share of training queries whose route changed."""
    known = (sids.query_item >= 0).nonzero().flatten()
    embeddings, items, features = sids.query_embeddings[known], sids.query_item[known], sids.features_on_device()
    if nearest:
        routes = nearest_routes(module, tokenizer, embeddings, items, features)
    else:
        routes = rematched_routes(module, tokenizer, embeddings, items, sids.query_groups[known], features)
    known = known.to(routes.device)
    changed = (sids.query_routes[known] != routes).float().mean()
    sids.query_routes[known] = routes
    return changed
