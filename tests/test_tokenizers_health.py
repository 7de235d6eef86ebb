"""Unique-token table and SID health metrics, checked against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grcm.tokenizers.health import code_usage, gini_coefficient, prefix_pair_similarity, sid_health
from grcm.tokenizers.unique_token import append_unique_token, assign_unique_tokens, prefix_groups


def _table_oracle(prefix_codes: torch.Tensor) -> list[int]:
    """The ID table of the paper: walk the items in order, count earlier holders of the prefix."""
    seen: dict[tuple[int, ...], int] = {}
    tokens = []
    for row in prefix_codes.tolist():
        tokens.append(seen.get(tuple(row), 0))
        seen[tuple(row)] = tokens[-1] + 1
    return tokens


def test_unique_token_counts_earlier_holders_of_the_prefix():
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 3, (200, 2), generator=generator)
    unique = assign_unique_tokens(prefix)
    assert unique.tolist() == _table_oracle(prefix)
    sids, vocab = append_unique_token(prefix)
    assert len({tuple(row) for row in sids.tolist()}) == 200
    assert vocab == int(torch.unique(prefix, dim=0, return_counts=True)[1].max())
    assert torch.equal(sids[:, :2], prefix)


def test_unique_token_is_deterministic_and_zero_without_collisions():
    prefix = torch.tensor([[5, 1], [2, 2], [5, 1], [0, 0], [5, 1]])
    assert assign_unique_tokens(prefix).tolist() == [0, 0, 1, 0, 2]
    assert torch.equal(assign_unique_tokens(prefix), assign_unique_tokens(prefix.clone()))
    distinct = torch.arange(12).view(6, 2)
    assert append_unique_token(distinct)[1] == 1
    assert assign_unique_tokens(distinct).tolist() == [0] * 6


@pytest.mark.parametrize("high", [5, 2**40])  # 2**40: the int64 key overflows, row-wise unique is used
def test_prefix_groups_match_row_wise_unique(high: int):
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 5, (500, 3), generator=generator) * (high // 5)
    group, sizes = prefix_groups(codes)
    _, expected_group, expected_sizes = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    assert torch.equal(group, expected_group) and torch.equal(sizes, expected_sizes)


def test_gini_matches_the_mean_absolute_difference_definition():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 20, size=50).astype(float)
    pairwise = np.abs(sizes[:, None] - sizes[None, :]).sum() / (2 * len(sizes) ** 2 * sizes.mean())
    assert math.isclose(gini_coefficient(sizes), pairwise, rel_tol=1e-9)
    assert gini_coefficient(np.full(10, 4.0)) == pytest.approx(0.0, abs=1e-12)
    assert gini_coefficient(np.array([0, 0, 3, 3])) == pytest.approx(0.0, abs=1e-12)  # empty buckets ignored
    assert gini_coefficient(np.array([1.0, 0, 0, 99.0])) == pytest.approx(0.49)


def test_code_usage_utilisation_and_entropy():
    codes = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    usage = code_usage(codes, vocab_size=8)
    assert usage["utilisation"] == 0.5
    assert usage["entropy_bits"] == pytest.approx(2.0)
    assert usage["normalised_entropy"] == pytest.approx(2.0 / 3.0)


def test_sid_health_collisions_and_buckets():
    prefix = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 2], [1, 3], [1, 3]])
    health = sid_health(prefix, [2, 4])
    assert health["num_unique_prefixes"] == 3
    assert health["collision_rate"] == pytest.approx(1 - 3 / 6)
    assert health["colliding_item_fraction"] == pytest.approx(5 / 6)
    assert health["largest_bucket"] == 3
    assert health["gini"] == pytest.approx(gini_coefficient(np.array([3, 1, 2])))
    assert health["level0_utilisation"] == 1.0 and health["level1_utilisation"] == 0.75
    with pytest.raises(ValueError, match="vocab sizes"):
        sid_health(prefix, [2])


def test_prefix_similarity_separates_semantic_groups():
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(4), 25)
    features = np.eye(8)[group] + 0.01 * rng.standard_normal((100, 8))
    same, different = prefix_pair_similarity(features, group, num_pairs=500, rng=rng)
    assert same > 0.99 and abs(different) < 0.05
    prefix = torch.from_numpy(np.stack([group, np.arange(100) % 2], axis=1))
    health = sid_health(prefix, [4, 2], features, num_pairs=500)
    assert health["prefix0_same_similarity"] > 0.99
    assert abs(health["prefix0_different_similarity"]) < 0.05
    assert 0.15 < health["random_pair_similarity"] < 0.35  # a quarter of random pairs share a group


def test_same_prefix_pairs_never_pair_an_item_with_itself():
    group = np.array([0, 0, 1, 2, 2, 2])
    features = np.eye(6)  # every item orthogonal to every other: self-pairs would score 1
    same, _ = prefix_pair_similarity(features, group, num_pairs=300, rng=np.random.default_rng(1))
    assert same == pytest.approx(0.0)
