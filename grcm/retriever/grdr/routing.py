"""GRDR's query routing under DDP: computed once on rank 0, broadcast to every rank.

Which view of its item each training query is trained to decode (:mod:`grcm.tokenizers.query_routing`):
``cluster`` and ``random`` routes are set once in ``setup``; ``nearest`` re-routes every epoch to the
item's closest view. The embeddings and K-Means come from one process so that every replica holds
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
from grcm.tokenizers.query_routing import cluster_routes, embed_queries, nearest_view_routes, random_routes


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
) -> tuple[np.ndarray | None, np.ndarray]:
    """Guidance embeddings (n, E) (or None) and routes (n,) of n training queries (ids (n,), items (n,)).

    Rank 0 embeds the query texts (``corpus.caption_text`` then ``corpus.extra_text`` by query id) with
    ``query_encoder`` and routes them (``random``: seeded per item; else K-Means of each item's queries);
    the other ranks receive both.
    """
    embeddings = routes = None
    if is_rank_zero(module):
        if need_embeddings:
            offset = len(corpus.caption_text)
            texts = [corpus.caption_text[q] if q < offset else corpus.extra_text[q - offset] for q in query_index]
            embeddings = embed_queries(texts, query_encoder)
        if routing == "random":
            routes = random_routes(item, num_views, seed)
        else:
            routes = cluster_routes(embeddings, item, num_views, seed)
    return broadcast_from_rank_zero(module, (embeddings, routes))


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
