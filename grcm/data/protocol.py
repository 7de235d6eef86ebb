"""Which gallery items a generative retriever can return: training-query coverage of the evaluation items.

A generative retriever only decodes SIDs it was trained to spell, i.e. items that have
training queries (captions or generated ``extra_queries.csv``). The standard protocols of
MSVD, MSR-VTT 1k-A, Flickr30K, COCO, Clotho and AudioCaps are *inductive*: the test
items have no training captions at all, so a generative retriever trained on them scores
near zero there however good it is. :class:`QueryCoverage` measures this at set-up so the
DataModule can say so, with the fix, before any training happens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grcm.data.corpus import Corpus

FIX = (
    "A generative retriever can only return items it was trained on. Fix: give those items training queries "
    "(`grcm generate-queries` writes extra_queries.csv beside captions.csv), or train transductively "
    "(data.init_args.transductive_holdout=<k> moves all but k test captions of each test item into training; "
    "`grcm prepare msrvtt --transductive` for MSR-VTT), or rank with a dense model (dual tower) instead. "
    "Set data.init_args.uncovered_items=ignore to evaluate anyway."
)


@dataclass(frozen=True)
class QueryCoverage:
    """Training-query coverage of the items the val/test queries point at.

    Attributes:
        num_items: gallery size N.
        trained: ``(N,)`` bool, True where an item has at least one training query.
        eval_items: ``{split: (G,) int64}`` distinct gold items of each evaluation split.
        eval_query_share: ``{split: float}`` share of the split's queries whose gold item has training queries.
    """

    num_items: int
    trained: np.ndarray
    eval_items: dict[str, np.ndarray]
    eval_query_share: dict[str, float]

    @classmethod
    def of(cls, corpus: Corpus, train_items: np.ndarray, eval_splits=("val", "test")) -> QueryCoverage:
        """Coverage of ``corpus`` when the training queries point at ``train_items`` ``(Q_train,)``."""
        trained = np.zeros(corpus.num_items, dtype=bool)
        trained[np.asarray(train_items, dtype=np.int64)] = True
        eval_items, share = {}, {}
        for split in eval_splits:
            gold = corpus.caption_item[corpus.caption_split == split]
            eval_items[split] = np.unique(gold)
            share[split] = float(trained[gold].mean()) if gold.size else 1.0
        return cls(corpus.num_items, trained, eval_items, share)

    def uncovered(self, split: str) -> np.ndarray:
        """Gold items of ``split`` without training queries ``(U,)``."""
        items = self.eval_items.get(split, np.zeros(0, dtype=np.int64))
        return items[~self.trained[items]]

    def setting(self, split: str = "test") -> str:
        """``"transductive"`` (every gold item has training queries), ``"inductive"`` (none has) or ``"mixed"``."""
        items = self.eval_items.get(split, np.zeros(0, dtype=np.int64))
        covered = int(self.trained[items].sum())
        if covered == items.size:
            return "transductive"
        return "inductive" if covered == 0 else "mixed"

    def describe(self, split: str = "test") -> str:
        items = self.eval_items.get(split, np.zeros(0, dtype=np.int64))
        return (
            f"{split}: {self.setting(split)} protocol; {items.size - self.uncovered(split).size} of {items.size} "
            f"{split} items have training queries ({self.eval_query_share.get(split, 1.0):.1%} of {split} queries "
            f"can be answered by a generative retriever); {int(self.trained.sum())} of {self.num_items} gallery items "
            "have training queries."
        )
