"""The fused rerank's weight picked on validation: best R@1, then MRR@10, then the smaller weight."""

from __future__ import annotations

import pytest

from grcm.rerank.fusion_weight import FUSION_WEIGHTS, fusion_weight_callbacks, pick_fusion_weight


def _validation(recall: list[float], mrr: list[float], prefix: str = "w") -> dict[str, float]:
    logged = {f"val/{prefix}{i}/recall@1": r for i, r in enumerate(recall)}
    logged.update({f"val/{prefix}{i}/mrr@10": m for i, m in enumerate(mrr)})
    return logged


def test_best_recall_wins_then_mrr_then_the_smaller_weight():
    n = len(FUSION_WEIGHTS)
    recall = [0.30] * n
    recall[2] = recall[4] = 0.35
    mrr = [0.4] * n
    mrr[4] = 0.5
    weight, scores = pick_fusion_weight(_validation(recall, mrr))
    assert weight == FUSION_WEIGHTS[4]  # R@1 tie between 2 and 4 broken by MRR@10
    assert scores[FUSION_WEIGHTS[2]] == (0.35, 0.4)
    mrr[2] = 0.5  # a full tie: the smaller weight
    assert pick_fusion_weight(_validation(recall, mrr))[0] == FUSION_WEIGHTS[2]
    assert pick_fusion_weight(_validation(recall, mrr, prefix="r1w"), prefix="r1w")[0] == FUSION_WEIGHTS[2]
    with pytest.raises(KeyError):
        pick_fusion_weight(_validation(recall, mrr), prefix="r1w")


def test_one_callback_per_weight_named_by_prefix():
    callbacks = fusion_weight_callbacks("dense.ckpt", prefix="r0w", beam_size=7)
    assert [c.name for c in callbacks] == [f"r0w{i}" for i in range(len(FUSION_WEIGHTS))]
    assert [c.generative_weight for c in callbacks] == list(FUSION_WEIGHTS)
    assert {c.beam_size for c in callbacks} == {7} and not any(c.full_dense_reference for c in callbacks)
