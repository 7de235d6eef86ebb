"""K-Means for semantic IDs: the coarse token and the hierarchical (DSI/NCI-style) fine tokens.

Clustering runs on faiss (`faiss.Kmeans`): multi-threaded BLAS distance
computations, a fixed seed gives the same centroids on every DDP rank, and it
subsamples at most ``max_points_per_centroid`` points per centroid, so a
million items cluster in seconds. Assignment is an exact nearest-centroid
search (``faiss.IndexFlatL2``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import numpy as np
import torch
from torch import nn

#: Below this many multiply-adds per pass, faiss runs single-threaded: OpenMP start-up and
#: barriers cost more than the arithmetic (hundreds of times more on a busy machine).
SMALL_JOB_FLOPS = 1e8


@contextmanager
def _faiss_threads_for(flops: float) -> Iterator[None]:
    """Run the faiss calls inside single-threaded when one pass costs fewer than SMALL_JOB_FLOPS."""
    previous = faiss.omp_get_max_threads()
    if flops < SMALL_JOB_FLOPS:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _as_float32_matrix(x: np.ndarray | torch.Tensor, name: str = "features") -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 numpy matrix (N, D)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D); got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values; clean the features before tokenizing")
    return x


def fit_kmeans(
    x: np.ndarray | torch.Tensor,
    num_clusters: int,
    *,
    seed: int = 0,
    num_iters: int = 25,
    max_points_per_centroid: int = 256,
) -> np.ndarray:
    """Cluster ``x`` (N, D) into ``num_clusters`` centroids; returns (num_clusters, D) float32.

    Seeding is k-means++ (where faiss offers it). With N <= num_clusters the
    points themselves (and repeats of them) become centroids. The result
    depends only on ``x`` and ``seed``.
    """
    x = _as_float32_matrix(x)
    n, dim = x.shape
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1; got {num_clusters}")
    if n == 0:
        raise ValueError("cannot cluster an empty feature matrix")
    if n <= num_clusters:
        return x[np.arange(num_clusters) % n].copy()
    options = {}
    if hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):  # faiss >= 1.13; random init before
        options["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    kmeans = faiss.Kmeans(
        dim,
        num_clusters,
        niter=num_iters,
        seed=seed,
        min_points_per_centroid=1,
        max_points_per_centroid=max_points_per_centroid,
        verbose=False,
        **options,
    )
    with _faiss_threads_for(float(min(n, num_clusters * max_points_per_centroid)) * num_clusters * dim):
        kmeans.train(x)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def assign_to_centroids(x: np.ndarray | torch.Tensor, centroids: np.ndarray | torch.Tensor) -> np.ndarray:
    """Index of the nearest centroid (squared L2) for each row: x (N, D), centroids (K, D) -> (N,) int64."""
    x = _as_float32_matrix(x)
    centroids = _as_float32_matrix(centroids, "centroids")
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    with _faiss_threads_for(float(x.shape[0]) * centroids.shape[0] * centroids.shape[1]):
        _, nearest = index.search(x, 1)
    return nearest[:, 0].astype(np.int64)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Torch nearest-centroid search usable on any device: x (B, D), centroids (K, D) -> (B,) long."""
    distances = x.pow(2).sum(-1, keepdim=True) - 2.0 * x @ centroids.T + centroids.pow(2).sum(-1).unsqueeze(0)
    return distances.argmin(dim=-1)


class CoarseKMeans(nn.Module):
    """Coarse token k = nearest of K centroids fitted by K-Means over all item embeddings.

    The centroids live in a buffer, so a checkpoint alone reproduces the token.
    """

    def __init__(self, feature_dim: int, num_clusters: int = 128) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.register_buffer("centroids", torch.zeros(num_clusters, feature_dim))

    @torch.no_grad()
    def fit(self, features: np.ndarray | torch.Tensor, *, seed: int = 0, num_iters: int = 25) -> None:
        """Fit the centroids on features (N, D)."""
        centroids = fit_kmeans(features, self.num_clusters, seed=seed, num_iters=num_iters)
        self.centroids.copy_(torch.from_numpy(centroids))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Coarse token per item: features (B, D) -> (B,) long in [0, K)."""
        return nearest_centroid(features.to(self.centroids.dtype), self.centroids)

    def residual(self, features: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Embedding minus its centroid: features (B, D), coarse (B,) -> (B, D)."""
        return features.to(self.centroids.dtype) - self.centroids[coarse]


class HierarchicalKMeans(nn.Module):
    """Fixed-depth hierarchical K-Means codes (DSI/NCI-style semantic IDs).

    Level 0 clusters all items into ``branching`` groups; every group is
    clustered again on its own items, and so on for ``num_levels`` levels.
    A group with at most ``branching`` items gives each item its own code
    (its points become the centroids), as in DSI. When ``parent_codes`` are
    given, the tree hangs below them (one subtree per parent code, e.g. per
    coarse K-Means token).

    The tree is stored as flat buffers: ``centroids`` (T, D) holds every
    child centroid; node ``n`` (root or subtree roots first, then node
    ``num_roots + t`` for centroid row ``t``) owns rows
    ``child_offsets[n]:child_offsets[n + 1]``.
    """

    def __init__(self, feature_dim: int, num_levels: int = 2, branching: int = 128) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1; got {num_levels}")
        self.feature_dim = feature_dim
        self.num_levels = num_levels
        self.branching = branching
        self.register_buffer("centroids", torch.zeros(0, feature_dim))
        self.register_buffer("child_offsets", torch.zeros(1, dtype=torch.long))
        self.register_buffer("num_roots", torch.ones((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Resize the tree buffers to the stored tree before loading it."""
        for name in ("centroids", "child_offsets"):
            stored = state_dict.get(prefix + name)
            if stored is not None and stored.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit(
        self,
        features: np.ndarray | torch.Tensor,
        parent_codes: np.ndarray | torch.Tensor | None = None,
        *,
        num_roots: int | None = None,
        seed: int = 0,
        num_iters: int = 25,
    ) -> torch.Tensor:
        """Build the tree over features (N, D); returns the codes of those items (N, num_levels) long.

        ``parent_codes`` (N,) in [0, num_roots) puts each item under one of
        ``num_roots`` subtree roots; without it all items share one root.
        """
        x = _as_float32_matrix(features)
        n = x.shape[0]
        if parent_codes is None:
            roots = np.zeros(n, dtype=np.int64)
            num_roots = 1
        else:
            roots = np.asarray(parent_codes, dtype=np.int64)
            num_roots = int(num_roots if num_roots is not None else roots.max() + 1)
        codes = np.zeros((n, self.num_levels), dtype=np.int64)
        node_of_item = roots.copy()
        centroid_blocks: list[np.ndarray] = []
        children_count: dict[int, int] = {}
        next_row = 0
        for level in range(self.num_levels):
            order = np.argsort(node_of_item, kind="stable")
            nodes, starts = np.unique(node_of_item[order], return_index=True)
            bounds = np.append(starts, n)
            new_node_of_item = np.empty_like(node_of_item)
            for node, start, stop in zip(nodes.tolist(), bounds[:-1], bounds[1:]):
                members = order[start:stop]
                k = min(self.branching, len(members))
                node_seed = seed + 7919 * level + node
                child_centroids = fit_kmeans(x[members], k, seed=node_seed, num_iters=num_iters)
                child = assign_to_centroids(x[members], child_centroids)
                centroid_blocks.append(child_centroids)
                children_count[node] = k
                codes[members, level] = child
                new_node_of_item[members] = num_roots + next_row + child
                next_row += k
            node_of_item = new_node_of_item
        num_nodes = num_roots + next_row
        counts = np.zeros(num_nodes, dtype=np.int64)
        for node, k in children_count.items():
            counts[node] = k
        # Rows are laid out in the order nodes were visited, which is increasing node id.
        offsets = np.concatenate([[0], np.cumsum(counts)])
        device = self.centroids.device
        self.centroids = torch.from_numpy(np.concatenate(centroid_blocks)).to(device)
        self.child_offsets = torch.from_numpy(offsets).to(device)
        self.num_roots = torch.tensor(num_roots, device=device)
        return torch.from_numpy(codes)

    @torch.no_grad()
    def forward(self, features: torch.Tensor, parent_codes: torch.Tensor | None = None) -> torch.Tensor:
        """Descend the tree: features (B, D), parent_codes (B,) or None -> codes (B, num_levels) long."""
        if self.centroids.shape[0] == 0:
            raise RuntimeError("HierarchicalKMeans is not fitted; call fit() or load a fitted state_dict")
        x = features.to(self.centroids.dtype)
        b = x.shape[0]
        node = (
            torch.zeros(b, dtype=torch.long, device=x.device)
            if parent_codes is None
            else parent_codes.to(x.device, torch.long)
        )
        roots = int(self.num_roots)
        codes = torch.zeros(b, self.num_levels, dtype=torch.long, device=x.device)
        for level in range(self.num_levels):
            next_node = torch.empty_like(node)
            for value in torch.unique(node).tolist():
                members = (node == value).nonzero(as_tuple=True)[0]
                start, stop = int(self.child_offsets[value]), int(self.child_offsets[value + 1])
                if stop == start:
                    raise ValueError(
                        f"item falls into an empty hierarchical K-Means node {value} at level {level}; "
                        "refit the tokenizer on a corpus that covers these items"
                    )
                child = nearest_centroid(x[members], self.centroids[start:stop])
                codes[members, level] = child
                next_node[members] = roots + start + child
            node = next_node
        return codes
