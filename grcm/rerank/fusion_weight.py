"""Picking the fused two-stage score's weight on validation queries.

The fused rerank scores a recalled item by its dense score plus ``w`` times its generative log-probability
(:class:`~grcm.rerank.two_stage.TwoStageEvaluation`'s ``generative_weight``). ``w`` is picked on validation:
one decode of the validation queries with one callback per weight of :data:`FUSION_WEIGHTS`
(:func:`fusion_weight_callbacks`), then the weight with the best R@1, ties broken by MRR@10 and then by the
smaller weight (:func:`pick_fusion_weight`). No test query is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grcm.rerank.two_stage import TwoStageEvaluation

#: The weights tried, 0 (pure dense rerank) first.
FUSION_WEIGHTS = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def fusion_weight_callbacks(dense_checkpoint: str, prefix: str = "w", **kwargs: Any) -> list[TwoStageEvaluation]:
    """One :class:`TwoStageEvaluation` per weight, named ``{prefix}{index}``, without the full-dense reference;
    ``kwargs`` go to every callback (e.g. ``beam_size``, ``rerank_store``)."""
    from grcm.rerank.two_stage import TwoStageEvaluation  # Lightning: imported when callbacks are built

    return [TwoStageEvaluation(dense_checkpoint=dense_checkpoint, name=f"{prefix}{index}", generative_weight=weight,
                               full_dense_reference=False, **kwargs)
            for index, weight in enumerate(FUSION_WEIGHTS)]


def pick_fusion_weight(validation: Mapping[str, Any], prefix: str = "w",
                       stage: str = "val") -> tuple[float, dict[float, tuple[float, float]]]:
    """The best weight of the callbacks of :func:`fusion_weight_callbacks` in ``validation`` (the dict a
    ``trainer.validate`` returns), and every weight's (R@1, MRR@10)."""
    scores = {weight: (float(validation[f"{stage}/{prefix}{index}/recall@1"]),
                       float(validation[f"{stage}/{prefix}{index}/mrr@10"]))
              for index, weight in enumerate(FUSION_WEIGHTS)}
    return max(scores, key=lambda weight: (*scores[weight], -weight)), scores
