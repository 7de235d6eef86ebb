"""Caption-derived corpora: real human captions as queries, held-out captions as the item "features".

No video or audio is at hand offline, but the annotation files hold many human captions per
item (MSVD ~41, MSR-VTT 20). This module turns such a :class:`CaptionSet` into a corpus whose
item features are the mean sentence embedding of ``held_out_per_item`` captions that are never
served as queries -- a stand-in for a well-aligned media encoder -- and whose remaining captions
are re-split per item into train / val / test queries. Every item therefore has training
queries (the *transductive* setting a generative retriever needs: it can only decode SIDs it
learned), and the test queries are human sentences none of the models saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from grcm.data.corpus import Corpus, CorpusError
from grcm.data.datasets.captions import CaptionSet


@dataclass(frozen=True)
class CaptionSplitPlan:
    """How the captions of one item are used (taken in a seeded random order per item).

    Attributes:
        held_out: captions averaged into the item feature (never queries).
        test: test queries per item.
        val: validation queries per item.
        max_train: at most this many training queries per item (None = all the rest).
        min_captions: items with fewer distinct captions than ``held_out + test + val + 1`` are dropped.
    """

    held_out: int = 10
    test: int = 1
    val: int = 1
    max_train: int | None = None

    @property
    def min_captions(self) -> int:
        return self.held_out + self.test + self.val + 1


def split_item_captions(
    captions: CaptionSet, plan: CaptionSplitPlan, seed: int = 0, max_items: int | None = None
) -> tuple[list[str], list[list[str]], dict[str, list[tuple[int, str]]]]:
    """Assign every caption of every usable item to held-out / train / val / test.

    Args:
        captions: a reader's caption set; its own splits are ignored (all captions are pooled per item).
        plan: how many captions go where.
        seed: order of captions within each item (and the item subsample).
        max_items: keep a seeded random subset of this many usable items (None = all).

    Returns:
        ``(item_ids, held_out_texts, queries)``: the kept item ids; per item its held-out captions;
        ``queries[split]`` = list of ``(item position, text)``.
    """
    per_item: list[list[str]] = [[] for _ in range(captions.num_items)]
    for item, text in zip(captions.caption_item.tolist(), captions.caption_text):
        if text not in per_item[item]:  # exact repeats would leak a query into the features
            per_item[item].append(text)
    usable = [i for i, texts in enumerate(per_item) if len(texts) >= plan.min_captions]
    if not usable:
        raise CorpusError(
            f"{captions.name}: no item has {plan.min_captions} distinct captions (held_out={plan.held_out}, "
            f"test={plan.test}, val={plan.val}, plus one for training); lower held_out."
        )
    rng = np.random.default_rng(seed)
    if max_items is not None and max_items < len(usable):
        usable = sorted(rng.choice(usable, size=max_items, replace=False).tolist())
    item_ids, held_out = [], []
    queries: dict[str, list[tuple[int, str]]] = {"train": [], "val": [], "test": []}
    for position, item in enumerate(usable):
        texts = [per_item[item][i] for i in rng.permutation(len(per_item[item]))]
        item_ids.append(captions.item_ids[item])
        held_out.append(texts[: plan.held_out])
        rest = texts[plan.held_out :]
        queries["test"] += [(position, t) for t in rest[: plan.test]]
        queries["val"] += [(position, t) for t in rest[plan.test : plan.test + plan.val]]
        train = rest[plan.test + plan.val :]
        queries["train"] += [(position, t) for t in train[: plan.max_train]]
    return item_ids, held_out, queries


def caption_feature_corpus(
    captions: CaptionSet,
    embed: Callable[[Sequence[str]], np.ndarray],
    plan: CaptionSplitPlan = CaptionSplitPlan(),
    seed: int = 0,
    max_items: int | None = None,
) -> Corpus:
    """A :class:`Corpus` whose item features are mean embeddings of held-out captions.

    Args:
        captions: a reader's caption set (e.g. ``read_msvd(...)``).
        embed: texts -> ``(T, D)`` unit vectors (e.g. :func:`grcm.rerank.sentence_embedding.embed_sentences`).
        plan: caption budget per item.
        seed: caption order / item subsample seed.
        max_items: optional item subsample.

    Returns:
        Corpus with ``(N, D)`` float32 L2-normalised features; captions split train/val/test per item.
    """
    item_ids, held_out, queries = split_item_captions(captions, plan, seed, max_items)
    flat = [text for texts in held_out for text in texts]
    vectors = np.asarray(embed(flat), dtype=np.float32).reshape(len(item_ids), plan.held_out, -1)
    features = vectors.mean(axis=1)
    features /= np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    rows = [(item, text, split) for split in ("train", "val", "test") for item, text in queries[split]]
    return Corpus(
        name=f"{captions.name}-captions",
        modality="text-derived",
        item_ids=item_ids,
        features=features,
        caption_item=np.asarray([r[0] for r in rows], dtype=np.int64),
        caption_text=[r[1] for r in rows],
        caption_split=np.asarray([r[2] for r in rows], dtype="<U5"),
    ).validate(source=f"{captions.source} (caption-derived)")
