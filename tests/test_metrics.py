"""Item-level metrics against independent pure-Python computations and torchmetrics."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR

from grcm.metrics import (
    ItemRetrievalMetrics,
    candidate_recall,
    deduplicate_ranked,
    first_occurrence,
    item_level_hits,
    ranks_from_scores,
)

# ---------------------------------------------------------------- reference loops


def reference_distinct(row: list[int]) -> list[int]:
    seen: list[int] = []
    for item in row:
        if item != -1 and item not in seen:
            seen.append(item)
    return seen


def reference_hits(ranked: list[list[int]], gold: list[list[int]], ks, mrr_k) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {f"recall@{k}": [] for k in ks}
    out[f"mrr@{mrr_k}"] = []
    for row, gold_row in zip(ranked, gold):
        gold_set = {g for g in gold_row if g != -1}
        distinct = reference_distinct(row)
        rank = None
        for position, item in enumerate(distinct, start=1):
            if item in gold_set:
                rank = position
                break
        for k in ks:
            out[f"recall@{k}"].append(1.0 if rank is not None and rank <= k else 0.0)
        out[f"mrr@{mrr_k}"].append(1.0 / rank if rank is not None and rank <= mrr_k else 0.0)
    return out


def random_case(rng: random.Random, num_queries: int, width: int, gold_width: int, num_items: int):
    """Ranked lists with repeats and padding anywhere; gold rows with padding, some empty."""
    ranked, gold = [], []
    for _ in range(num_queries):
        ranked.append([rng.choice([-1] + list(range(num_items))) for _ in range(width)])
        row = [rng.randrange(num_items) if rng.random() < 0.7 else -1 for _ in range(gold_width)]
        gold.append(row)
    return torch.tensor(ranked, dtype=torch.long), torch.tensor(gold, dtype=torch.long)


# ---------------------------------------------------------------- deduplicate_ranked


def test_deduplicate_ranked_hand_example():
    ranked = torch.tensor([[3, 3, -1, 5, 3, 7], [-1, -1, -1, -1, -1, -1], [0, 1, 2, 3, 4, 5]])
    expected = torch.tensor([[3, 5, 7, -1, -1, -1], [-1] * 6, [0, 1, 2, 3, 4, 5]])
    assert torch.equal(deduplicate_ranked(ranked), expected)


def test_deduplicate_ranked_matches_reference_on_random_rows():
    rng = random.Random(0)
    for width in (1, 2, 7, 30):
        ranked, _ = random_case(rng, num_queries=40, width=width, gold_width=1, num_items=6)
        got = deduplicate_ranked(ranked)
        for row, got_row in zip(ranked.tolist(), got.tolist()):
            distinct = reference_distinct(row)
            assert got_row == distinct + [-1] * (width - len(distinct))


def test_deduplicate_ranked_carries_each_kept_item_first_score():
    rng = random.Random(1)
    for width in (1, 5, 30):
        ranked, _ = random_case(rng, num_queries=30, width=width, gold_width=1, num_items=6)
        scores = torch.randn(ranked.shape, generator=torch.Generator().manual_seed(width))
        items, kept_scores = deduplicate_ranked(ranked, scores)
        assert torch.equal(items, deduplicate_ranked(ranked))
        for row, score_row, got_items, got_scores in zip(ranked.tolist(), scores.tolist(), items.tolist(),
                                                         kept_scores.tolist()):
            first_score = {}
            for item, score in zip(row, score_row):
                if item >= 0 and item not in first_score:
                    first_score[item] = score
            expected = [first_score[item] for item in got_items if item >= 0]
            assert got_scores[: len(expected)] == pytest.approx(expected)
            assert all(s == float("-inf") for s in got_scores[len(expected):])
    with pytest.raises(ValueError, match="shaped like"):
        deduplicate_ranked(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2))


def test_deduplicate_ranked_empty_and_errors():
    assert deduplicate_ranked(torch.zeros(3, 0, dtype=torch.long)).shape == (3, 0)
    with pytest.raises(ValueError, match="integer"):
        deduplicate_ranked(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="below -1"):
        deduplicate_ranked(torch.tensor([[0, -2]]))
    with pytest.raises(ValueError, match="shape"):
        deduplicate_ranked(torch.tensor([0, 1]))


# ---------------------------------------------------------------- item_level_hits


def test_item_level_hits_hand_example():
    # q0: item 4 decoded twice before gold 9 -> 9 is the 2nd distinct item.
    # q1: no hit. q2: two gold items, the later-listed one is found first, at rank 3.
    # q3: gold at rank 1. q4: no gold at all.
    ranked = torch.tensor(
        [
            [4, 4, 4, 9, 1, 2],
            [1, 2, 3, 4, 5, 6],
            [0, -1, 8, 6, 2, 0],
            [5, 5, 1, -1, -1, -1],
            [1, 2, 3, 4, 5, 6],
        ]
    )
    gold = torch.tensor([[9, -1], [7, -1], [2, 6], [5, -1], [-1, -1]])
    hits = item_level_hits(ranked, gold, ks=(1, 2, 5), mrr_k=10)
    assert list(hits) == ["recall@1", "recall@2", "recall@5", "mrr@10"]
    assert hits["recall@1"].tolist() == [0, 0, 0, 1, 0]
    assert hits["recall@2"].tolist() == [1, 0, 0, 1, 0]
    assert hits["recall@5"].tolist() == [1, 0, 1, 1, 0]
    assert torch.allclose(hits["mrr@10"], torch.tensor([0.5, 0.0, 1 / 3, 1.0, 0.0]))


@pytest.mark.parametrize("width,gold_width", [(1, 1), (3, 1), (12, 1), (12, 3), (25, 2)])
def test_item_level_hits_matches_reference_on_random_inputs(width, gold_width):
    rng = random.Random(width * 100 + gold_width)
    ks, mrr_k = (1, 5, 10), 10
    ranked, gold = random_case(rng, num_queries=200, width=width, gold_width=gold_width, num_items=15)
    hits = item_level_hits(ranked, gold, ks=ks, mrr_k=mrr_k)
    expected = reference_hits(ranked.tolist(), gold.tolist(), ks, mrr_k)
    for name, values in expected.items():
        assert torch.allclose(hits[name], torch.tensor(values)), name
    # The random cases exercise hits, misses and queries without gold items.
    assert 0 < hits["recall@10"].sum() < len(ranked)


def test_mrr_cutoff_differs_from_list_length():
    ranked = torch.tensor([[0, 1, 2, 3, 4]])
    gold = torch.tensor([[4]])
    assert item_level_hits(ranked, gold, ks=(5,), mrr_k=3)["mrr@3"].item() == 0.0
    assert item_level_hits(ranked, gold, ks=(5,), mrr_k=5)["mrr@5"].item() == pytest.approx(0.2)


def test_item_level_hits_validates_inputs():
    with pytest.raises(ValueError, match="queries"):
        item_level_hits(torch.zeros(3, 4, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cut-offs"):
        item_level_hits(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), ks=(0,))
    with pytest.raises(TypeError, match="torch.Tensor"):
        item_level_hits([[0]], torch.zeros(1, 1, dtype=torch.long))


def test_candidate_recall_matches_reference():
    rng = random.Random(3)
    candidates, gold = random_case(rng, num_queries=100, width=9, gold_width=2, num_items=20)
    got = candidate_recall(candidates, gold)
    for value, row, gold_row in zip(got.tolist(), candidates.tolist(), gold.tolist()):
        hit = any(g != -1 and g in row for g in gold_row)
        assert value == float(hit)
    # Recall over the whole list equals recall@K of the ranked metrics.
    assert torch.equal(got, item_level_hits(candidates, gold, ks=(9,))["recall@9"])


# ---------------------------------------------------------------- ties and the torchmetrics oracle


def test_ranks_from_scores_breaks_ties_by_item_index():
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert ranks_from_scores(scores, 4).tolist() == [[1, 2, 4, 0], [0, 1, 2, 3]]
    assert ranks_from_scores(scores[:, :2], 4).tolist() == [[1, 0, -1, -1], [0, 1, -1, -1]]
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(torch.tensor([[0.1, float("nan")]]), 1)


def test_metrics_on_tied_scores_follow_the_documented_tie_break():
    # Items 1, 2, 4 tie for first place. Gold 4 loses the tie to 1 and 2 -> rank 3;
    # gold 1 wins it -> rank 1.
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9], [0.5, 0.9, 0.9, 0.1, 0.9]])
    gold = torch.tensor([[4], [1]])
    hits = item_level_hits(ranks_from_scores(scores, 5), gold, ks=(1, 3))
    assert hits["recall@1"].tolist() == [0.0, 1.0]
    assert hits["recall@3"].tolist() == [1.0, 1.0]
    assert torch.allclose(hits["mrr@10"], torch.tensor([1 / 3, 1.0]))


def test_agrees_with_torchmetrics_where_semantics_coincide():
    # Single gold item, distinct positive scores: hit-rate@k and MRR@k are the same quantity.
    generator = torch.Generator().manual_seed(0)
    num_queries, num_items = 60, 30
    scores = torch.rand(num_queries, num_items, generator=generator) + 0.01
    gold_index = torch.randint(num_items, (num_queries,), generator=generator)
    ranked = ranks_from_scores(scores, num_items)
    hits = item_level_hits(ranked, gold_index[:, None], ks=(1, 5, 10), mrr_k=10)
    target = torch.zeros(num_queries, num_items, dtype=torch.bool)
    target[torch.arange(num_queries), gold_index] = True
    indexes = torch.arange(num_queries)[:, None].expand(num_queries, num_items)
    for k in (1, 5, 10):
        oracle = RetrievalHitRate(top_k=k)(scores.flatten(), target.flatten(), indexes=indexes.flatten())
        assert hits[f"recall@{k}"].mean().item() == pytest.approx(oracle.item(), abs=1e-6)
    oracle_mrr = RetrievalMRR(top_k=10)(scores.flatten(), target.flatten(), indexes=indexes.flatten())
    assert hits["mrr@10"].mean().item() == pytest.approx(oracle_mrr.item(), abs=1e-6)


# ---------------------------------------------------------------- ItemRetrievalMetrics


def test_first_occurrence():
    ids = torch.tensor([5, 3, 5, 9, 3, 3])
    assert first_occurrence(ids).tolist() == [1, 0, 3]


def test_metric_accumulates_batches_like_one_call():
    rng = random.Random(7)
    ranked, gold = random_case(rng, num_queries=50, width=8, gold_width=2, num_items=10)
    metric = ItemRetrievalMetrics(ks=(1, 5), mrr_k=5)
    for start in range(0, 50, 16):
        metric.update(
            ranked[start : start + 16], gold[start : start + 16], torch.arange(start, min(start + 16, 50))
        )
    result = metric.compute()
    expected = reference_hits(ranked.tolist(), gold.tolist(), (1, 5), 5)
    assert set(result) == {"recall@1", "recall@5", "mrr@5"}
    for name, values in expected.items():
        assert result[name].item() == pytest.approx(sum(values) / len(values))
    assert metric.num_queries() == 50


def test_metric_counts_a_repeated_query_id_once():
    metric = ItemRetrievalMetrics(ks=(1,), mrr_k=10)
    hit, miss = torch.tensor([[1, 2]]), torch.tensor([[2, 3]])
    gold = torch.tensor([[1]])
    metric.update(hit, gold, torch.tensor([0]))
    metric.update(miss, gold, torch.tensor([1]))
    # Query 0 again, with a different list: the first value seen is kept.
    metric.update(miss, gold, torch.tensor([0]))
    assert metric.compute()["recall@1"].item() == pytest.approx(0.5)
    assert metric.num_queries() == 2
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute()["recall@1"].item() == 0.0
    with pytest.raises(ValueError, match="query_ids"):
        metric.update(hit, gold, torch.tensor([0, 1]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # Queries 0..4: rank 0 takes 0, 2, 4; rank 1 takes 1, 3 and repeats query 0
        # as padding, the way a DistributedSampler evens out the shards.
        ranked = torch.tensor([[1, 0], [0, 1], [2, 2], [0, 3], [5, 4]])
        gold = torch.tensor([[1], [1], [2], [3], [9]])
        shard = [0, 2, 4] if rank == 0 else [1, 3, 0]
        metric = ItemRetrievalMetrics(ks=(1, 2), mrr_k=2)
        metric.update(ranked[shard], gold[shard], torch.tensor(shard))
        result = metric.compute()
        torch.save({name: value.item() for name, value in result.items()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not dist.is_available() or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed and the fork start method",
)
def test_metric_under_simulated_ddp_counts_padding_once(tmp_path):
    # Forked workers skip re-importing torch, which keeps this test to a few seconds.
    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    # Distinct queries: recall@1 = [1, 0, 1, 0, 0]; recall@2 = [1, 1, 1, 1, 0]; mrr@2 = [1, .5, 1, .5, 0].
    expected = {"recall@1": 2 / 5, "recall@2": 4 / 5, "mrr@2": 3 / 5}
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result == pytest.approx(expected)
