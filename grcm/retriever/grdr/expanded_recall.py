"""GRDR's pool metrics: ``expanded_recall@{10,50,100}`` and ``pool_size``, per evaluation stage.

``expanded_recall@k``: the gold item is among the first k items the beams expand to (the whole expanded
pool, not cut at ``eval_max_items``); ``pool_size``: the distinct items the beams expand to. Each query id
counts once (DDP pads the last shard with repeats).
"""

from __future__ import annotations

from torch import Tensor, nn

from grcm.metrics import ItemRetrievalMetrics, PerQueryMeans, fixed_width

#: cut-offs of ``expanded_recall@k``: the gold item among the first k items the beams expand to
EXPANDED_KS = (10, 50, 100)
#: the former name of ``expanded_recall@k``, still logged with the same values (deprecated; removed in the
#: next release). Not the two-stage callback's ``candidate_recall@B`` (gold anywhere in the recalled pool).
DEPRECATED_EXPANDED_NAME = "candidate_recall"


class ExpandedPoolMetrics(nn.Module):
    """The val and test accumulators of the expanded pool's recall and size."""

    def __init__(self) -> None:
        super().__init__()
        self.val_expanded = ItemRetrievalMetrics(ks=EXPANDED_KS, mrr_k=10)
        self.test_expanded = ItemRetrievalMetrics(ks=EXPANDED_KS, mrr_k=10)
        self.val_pool_size, self.test_pool_size = PerQueryMeans(["pool_size"]), PerQueryMeans(["pool_size"])

    def _of(self, stage: str) -> tuple[ItemRetrievalMetrics, PerQueryMeans]:
        return (self.val_expanded, self.val_pool_size) if stage == "val" else (self.test_expanded,
                                                                               self.test_pool_size)

    def update(self, stage: str, pool: Tensor, gold_items: Tensor, query_index: Tensor) -> None:
        """``pool`` (B, P) long: each query's expanded items, best first, -1 padded; ``gold_items``, ``query_index``
        as the batch gives them."""
        expanded, pool_size = self._of(stage)
        expanded.update(fixed_width(pool, max(EXPANDED_KS)), gold_items, query_index)
        pool_size.update({"pool_size": (pool >= 0).sum(1).float()}, query_index)

    def compute_and_reset(self, stage: str) -> dict[str, Tensor]:
        """``{stage}/expanded_recall@k``, its deprecated alias and ``{stage}/pool_size`` (scalars); then reset."""
        expanded, pool_size = self._of(stage)
        values = expanded.compute()
        recalls = {k: values[f"recall@{k}"] for k in EXPANDED_KS}
        logged = {f"{stage}/expanded_recall@{k}": v for k, v in recalls.items()}
        logged.update({f"{stage}/{DEPRECATED_EXPANDED_NAME}@{k}": v for k, v in recalls.items()})
        logged[f"{stage}/pool_size"] = pool_size.compute()["pool_size"]
        expanded.reset()
        pool_size.reset()
        return logged
