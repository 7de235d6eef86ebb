"""Coarse and hierarchical K-Means tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grcm.tokenizers.kmeans import (
    CoarseKMeans,
    HierarchicalKMeans,
    assign_to_centroids,
    fit_kmeans,
    nearest_centroid,
)


def _blobs(num_clusters: int = 6, per_cluster: int = 40, dim: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim)).astype(np.float32) * 10
    labels = np.repeat(np.arange(num_clusters), per_cluster)
    x = centres[labels] + 0.05 * rng.standard_normal((len(labels), dim)).astype(np.float32)
    return x, labels


def test_kmeans_recovers_well_separated_clusters():
    x, labels = _blobs()
    centroids = fit_kmeans(x, 6, seed=0)
    assigned = assign_to_centroids(x, centroids)
    # a perfect clustering is a bijection between true labels and assigned clusters
    pairs = set(zip(labels.tolist(), assigned.tolist()))
    assert len(pairs) == 6 and len({a for _, a in pairs}) == 6
    assert np.array_equal(fit_kmeans(x, 6, seed=0), centroids)  # same seed, same centroids


def test_nearest_centroid_matches_brute_force_and_faiss():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((100, 7)).astype(np.float32)
    centroids = rng.standard_normal((9, 7)).astype(np.float32)
    brute = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(assign_to_centroids(x, centroids), brute)
    assert np.array_equal(nearest_centroid(torch.from_numpy(x), torch.from_numpy(centroids)).numpy(), brute)


def test_fewer_points_than_clusters_and_bad_input():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    centroids = fit_kmeans(x, 5)
    assert centroids.shape == (5, 2)
    assert np.array_equal(assign_to_centroids(x, centroids), [0, 1, 2])
    with pytest.raises(ValueError, match="NaN"):
        fit_kmeans(np.array([[np.nan, 0.0]], dtype=np.float32), 1)
    with pytest.raises(ValueError, match="2-D"):
        fit_kmeans(np.zeros(4, dtype=np.float32), 1)


def test_coarse_kmeans_residual():
    x, _ = _blobs()
    coarse = CoarseKMeans(feature_dim=5, num_clusters=6)
    coarse.fit(x, seed=0)
    features = torch.from_numpy(x)
    tokens = coarse(features)
    assert torch.equal(tokens, torch.from_numpy(assign_to_centroids(x, coarse.centroids.numpy())))
    torch.testing.assert_close(coarse.residual(features, tokens) + coarse.centroids[tokens], features)


def test_hierarchical_codes_reproduce_from_a_fresh_module_state():
    x, labels = _blobs(num_clusters=4, per_cluster=30)
    tree = HierarchicalKMeans(feature_dim=5, num_levels=2, branching=4)
    codes = tree.fit(x, seed=0)
    assert codes.shape == (120, 2)
    # level 0 separates the blobs
    assert len(set(zip(labels.tolist(), codes[:, 0].tolist()))) == 4
    fresh = HierarchicalKMeans(feature_dim=5, num_levels=2, branching=4)
    fresh.load_state_dict(tree.state_dict())
    assert torch.equal(fresh(torch.from_numpy(x)), codes)


def test_hierarchical_small_nodes_give_each_item_its_own_code_under_parents():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 3)).astype(np.float32)
    parents = np.array([0] * 5 + [2] * 7)
    tree = HierarchicalKMeans(feature_dim=3, num_levels=2, branching=8)
    codes = tree.fit(x, parents, num_roots=3, seed=0)
    # groups of <= branching items: DSI-style, item i of the group gets its own level-0 code
    assert sorted(codes[:5, 0].tolist()) == [0, 1, 2, 3, 4]
    assert sorted(codes[5:, 0].tolist()) == list(range(7))
    assert codes[:, 1].tolist() == [0] * 12
    assert torch.equal(tree(torch.from_numpy(x), torch.from_numpy(parents)), codes)
    with pytest.raises(ValueError, match="empty hierarchical K-Means node"):
        tree(torch.from_numpy(x[:1]), torch.tensor([1]))
