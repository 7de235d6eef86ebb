"""The real-language benchmark's caption-token corpus (``--protocol tokens``): an item's tokens are the embeddings
of its held-out captions, never of its queries, and their normalised mean is the item feature the other rows read.
"""

from __future__ import annotations

import numpy as np
from benchmark_scripts import load_benchmark

from grcm.data.caption_features import CaptionSplitPlan, caption_feature_corpus
from grcm.data.datasets.captions import CaptionSet

ITEMS, CAPTIONS, HELD_OUT, DIM = 6, 7, 3, 8


def _benchmark():
    return load_benchmark("real_language_tokens")


def _embed(texts):
    """(T, DIM) unit vectors, a fixed random vector per text (a MiniLM stand-in)."""
    rows = [np.random.default_rng(abs(hash(text)) % 2**32).standard_normal(DIM) for text in texts]
    vectors = np.asarray(rows, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_item_tokens_are_its_held_out_captions_and_average_to_its_feature():
    items = [i for i in range(ITEMS) for _ in range(CAPTIONS)]
    captions = CaptionSet(name="toy", modality="video", item_ids=[f"vid{i}" for i in range(ITEMS)],
                          caption_item=np.asarray(items, dtype=np.int64),
                          caption_text=[f"clip {i} caption {j}" for i in range(ITEMS) for j in range(CAPTIONS)],
                          caption_split=np.asarray(["train"] * len(items)))
    plan = CaptionSplitPlan(held_out=HELD_OUT, test=1, val=1)
    corpus = _benchmark().token_feature_corpus(captions, _embed, plan, seed=1)
    plain = caption_feature_corpus(captions, _embed, plan, seed=1)
    assert corpus.item_ids == plain.item_ids and np.array_equal(corpus.caption_text, plain.caption_text)
    assert np.allclose(corpus.features, plain.features)  # the other rows' item features are unchanged
    assert corpus.token_features.shape == (ITEMS, HELD_OUT, DIM)
    mean = corpus.token_features.mean(axis=1)
    assert np.allclose(mean / np.linalg.norm(mean, axis=1, keepdims=True), corpus.features, atol=1e-6)
    vocabulary = {text: vector for text, vector in zip(captions.caption_text, _embed(captions.caption_text))}
    for item in range(ITEMS):
        texts = [t for t, i in zip(captions.caption_text, items) if i == item]
        queries = {corpus.caption_text[r] for r in np.flatnonzero(corpus.caption_item == item)}
        held_out = [t for t in texts if t not in queries]
        assert len(held_out) == HELD_OUT
        # the tokens are exactly the embeddings of the captions that are no query of the item, in some order
        expected = np.stack([vocabulary[t] for t in held_out])
        got = corpus.token_features[item]
        assert sorted(map(tuple, np.round(got, 5))) == sorted(map(tuple, np.round(expected, 5))), item
