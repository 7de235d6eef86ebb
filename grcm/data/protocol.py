"""Which gallery items a generative retriever can return, and the splits that fix it.

A generative retriever only decodes SIDs it was trained to spell, i.e. items that have
training queries (captions or generated ``extra_queries.csv``). The standard protocols of
MSVD, MSR-VTT 1k-A, Flickr30K, COCO, Clotho and AudioCaps are *inductive*: the val and test
items have no training captions at all, so a generative retriever trained on them scores
near zero there however good it is. :class:`QueryCoverage` measures this at set-up so the
DataModule can say so, with the fix, before any training happens.

Two re-splits of a corpus's captions (both return a copy; the corpus on disk is unchanged):

- :func:`transductive_split` (``data.transductive_holdout=k``): each val and test item keeps k of
  its captions of that split as queries, the others become training queries.
- :func:`hold_out_validation` (``data.val_from_train=x``): validation queries drawn from the
  training captions, for corpora without a val split (or whose val items have no training queries).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from grcm.data.corpus import Corpus, CorpusError

FIX = (
    "A generative retriever can only return items it was trained on. Fix: give those items training queries "
    "(`grcm generate-queries` writes extra_queries.csv beside captions.csv), or train transductively "
    "(data.init_args.transductive_holdout=<k>: each val and test item keeps k captions of its split as queries, "
    "its other captions train; `grcm prepare msrvtt --transductive` for MSR-VTT), or rank with a dense model "
    "(dual tower) instead. Set data.init_args.uncovered_items=ignore to evaluate anyway."
)
DEFAULT_VAL_FROM_TRAIN = 0.05
"""``val_from_train`` used when a corpus has no val captions: 5% of the training items give one caption each."""


def needs_training_queries(module: object) -> bool:
    """Whether a LightningModule retrieves by decoding SIDs (it can only return items it was trained on).

    Duck-typed on the SID-retrieval interface (:class:`~grcm.retriever.sid_retrieval.SIDRetrievalModule`'s
    ``trie_sources`` / ``index_table``) so that the data package does not import the retrievers.
    """
    return callable(getattr(module, "trie_sources", None)) and callable(getattr(module, "index_table", None))


def transductive_split(corpus: Corpus, holdout: int, splits: tuple[str, ...] = ("val", "test")) -> Corpus:
    """A copy of ``corpus`` where each item of every split in ``splits`` keeps its first ``holdout`` captions of
    that split as queries and its other captions of that split become training queries."""
    split = corpus.caption_split.copy()
    for name in splits:
        seen = np.zeros(corpus.num_items, dtype=np.int64)
        for row in np.flatnonzero(corpus.caption_split == name).tolist():
            item = corpus.caption_item[row]
            if seen[item] >= holdout:
                split[row] = "train"
            seen[item] += 1
    return dataclasses.replace(corpus, caption_split=split)


@dataclass(frozen=True)
class HeldOut:
    """What :func:`hold_out_validation` did: ``queries`` val queries drawn, ``unseen`` of them from items left
    without training queries, ``replaced`` val captions of the corpus set aside."""

    queries: int
    unseen: int
    replaced: int


def hold_out_validation(corpus: Corpus, amount: float, seed: int) -> tuple[Corpus, HeldOut]:
    """Validation queries taken from the training captions.

    ``n`` training items are drawn (``n = round(amount * training items)`` for ``0 < amount < 1``, else
    ``int(amount)``); each gives one random training caption to ``val``. Items with two or more training
    captions are drawn first, so that they keep training queries (a generative retriever can return them);
    items with a single caption are drawn only when there are fewer than ``n`` of those. The corpus's own val
    captions (if any) are set aside: neither validated nor trained on.

    Returns:
        the re-split copy of ``corpus`` and a :class:`HeldOut` summary.
    """
    if not amount > 0:
        raise CorpusError(f"data.val_from_train must be a share in (0, 1) or a count >= 1, got {amount}.")
    split = corpus.caption_split.copy()
    replaced = int((split == "val").sum())
    split[split == "val"] = ""  # no split: set aside
    rng = np.random.default_rng(seed)
    rows = rng.permutation(np.flatnonzero(split == "train"))
    items, first, counts = np.unique(corpus.caption_item[rows], return_index=True, return_counts=True)
    if not items.size:
        raise CorpusError(f"corpus {corpus.name!r} has no training captions to hold validation queries out of.")
    wanted = max(1, round(amount * items.size)) if amount < 1 else int(amount)
    if wanted >= int(counts.sum()):
        raise CorpusError(
            f"corpus {corpus.name!r}: data.val_from_train={amount} asks for {wanted} val queries but there are only "
            f"{int(counts.sum())} training captions; use a share below 1, e.g. {DEFAULT_VAL_FROM_TRAIN}."
        )
    several = rng.permutation(np.flatnonzero(counts >= 2))
    single = rng.permutation(np.flatnonzero(counts == 1))
    drawn = np.concatenate([several, single])[:wanted]
    split[rows[first[drawn]]] = "val"
    unseen = int(max(0, drawn.size - several.size))
    return dataclasses.replace(corpus, caption_split=split), HeldOut(int(drawn.size), unseen, replaced)


def held_out_notice(name: str, held: HeldOut, explicit: bool) -> str:
    """The notice printed when validation queries are held out of the training captions."""
    how = "data.init_args.val_from_train" if explicit else (
        f"the corpus has no val captions, so data.init_args.val_from_train={DEFAULT_VAL_FROM_TRAIN} applies")
    unseen = f"; {held.unseen} of those items have no other training caption" if held.unseen else ""
    aside = f"; its {held.replaced} val captions are set aside" if held.replaced else ""
    return (
        f"corpus {name!r}: validating on {held.queries} captions held out of training ({how}: one caption each of "
        f"{held.queries} training items{unseen}{aside}). Set data.init_args.val_from_train to another share or "
        "count, or --trainer.limit_val_batches=0 to skip validation (docs/data.md, \"Validation\")."
    )


def uncovered_fix(split: str, holdout: int | None) -> str:
    """The fix for ``split`` items without training queries, given ``data.transductive_holdout`` (None: unset)."""
    if holdout is None:
        return FIX
    alternative = (f", or validate on held-out training captions (data.init_args.val_from_train="
                   f"{DEFAULT_VAL_FROM_TRAIN})" if split == "val" else "")
    return (
        f"data.init_args.transductive_holdout={holdout} is set, but these items have at most {holdout} {split} "
        f"caption(s), all kept as {split} queries. Fix: give them training queries (`grcm generate-queries` writes "
        f"extra_queries.csv beside captions.csv), or a smaller transductive_holdout where they have more than one "
        f"{split} caption{alternative}; data.init_args.uncovered_items=ignore evaluates anyway."
    )


def constant_val_error(name: str, coverage: QueryCoverage, holdout: int | None) -> str | None:
    """One line refusing to fit a generative retriever when no val item has training queries (its val metrics
    would be 0 at every validation and the best checkpoint picked on that constant), else None."""
    items = coverage.eval_items.get("val", np.zeros(0, dtype=np.int64))
    if not items.size or coverage.trained[items].any():
        return None
    cover = (
        "data.init_args.transductive_holdout=<k> (each val and test item keeps k captions as queries, the rest train)"
        if holdout is None else f"generated queries (transductive_holdout={holdout} leaves these items none)"
    )
    return (
        f"corpus {name!r}: none of the {items.size} val items has training queries, so a generative retriever "
        "scores 0 on val at every validation and best.ckpt would be picked on that constant. Fix: "
        f"{cover}, or validate on held-out training captions with data.init_args.val_from_train="
        f"{DEFAULT_VAL_FROM_TRAIN}, or skip validation with --trainer.limit_val_batches=0."
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
