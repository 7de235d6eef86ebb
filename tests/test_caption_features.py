"""Caption-derived corpora: held-out captions become features and are never queries."""

from pathlib import Path

import numpy as np
import pytest

from grcm.data.caption_features import CaptionSplitPlan, caption_feature_corpus
from grcm.data.corpus import CorpusError
from grcm.data.datasets import read_captions
from grcm.data.datasets.captions import CaptionSet
from grcm.rerank.sentence_embedding import embed_sentences

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _captions(per_item=(8, 8, 3)) -> CaptionSet:
    items, texts = [], []
    for item, count in enumerate(per_item):
        for n in range(count):
            items.append(item)
            texts.append(f"caption {n} of item {item}")
    texts.append("caption 0 of item 0")  # an exact repeat must not leak into both features and queries
    items.append(0)
    return CaptionSet("toy", "video", ["a", "b", "c"], np.array(items), texts, np.array(["train"] * len(texts)))


def _fake_embed(texts):
    """Deterministic unit vectors: one-hot of a hash bucket, so means can be checked exactly."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        out[row, sum(map(ord, text)) % 64] = 1.0
    return out


def test_held_out_captions_are_features_and_never_queries():
    captions = _captions()
    plan = CaptionSplitPlan(held_out=4, test=1, val=1, max_train=None)
    held_out_texts = []
    corpus = caption_feature_corpus(captions, lambda t: held_out_texts.extend(t) or _fake_embed(t), plan)
    assert corpus.item_ids == ["a", "b"]  # "c" has 3 < 4 + 1 + 1 + 1 distinct captions
    for item in range(2):
        mine = held_out_texts[4 * item : 4 * item + 4]
        expected = _fake_embed(mine).mean(0)
        np.testing.assert_allclose(corpus.features[item], expected / np.linalg.norm(expected), rtol=1e-6)
        queries = {t for t, i in zip(corpus.caption_text, corpus.caption_item) if i == item}
        assert not queries & set(mine)
        assert len(queries) == 8 - 4  # 8 distinct captions: 4 features, 1 test, 1 val, 2 train
    assert (corpus.caption_split == "test").sum() == 2 and (corpus.caption_split == "val").sum() == 2


def test_too_few_captions_is_a_clear_error():
    with pytest.raises(CorpusError, match="lower held_out"):
        caption_feature_corpus(_captions((3, 3, 3)), _fake_embed, CaptionSplitPlan(held_out=10))


def test_msvd_captions_make_a_transductive_corpus():
    msvd = SHARED_DATA / "msvd"
    if not msvd.is_dir():
        pytest.skip(f"real annotation files not available at {msvd}")
    captions = read_captions("msvd", msvd)
    corpus = caption_feature_corpus(captions, _fake_embed, CaptionSplitPlan(held_out=10, max_train=2), max_items=50)
    assert corpus.num_items == 50
    assert set(corpus.caption_item[corpus.caption_split == "test"]) <= set(corpus.caption_item[corpus.caption_split == "train"])


class _CountingEncoder:
    max_length = 64

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        return _fake_embed(texts)


def test_sentence_embeddings_are_cached_on_disk(tmp_path):
    encoder = _CountingEncoder()
    first = embed_sentences(["a dog runs", "a cat sleeps"], tmp_path, encoder)
    second = embed_sentences(["a dog runs", "a cat sleeps"], tmp_path, encoder)
    np.testing.assert_array_equal(first, second)
    assert encoder.calls == 1
    embed_sentences(["a cat sleeps", "a dog runs"], tmp_path, encoder)  # other order: other key
    assert encoder.calls == 2
