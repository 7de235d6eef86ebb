"""The synthetic corpus: deterministic, hierarchical, ambiguous on purpose."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from grcm.data.synthetic import (
    SLOTS,
    SyntheticConfig,
    _sample_attributes,
    generate_synthetic_corpus,
    generate_synthetic_features,
)


def test_deterministic_and_features_match_fast_path():
    a = generate_synthetic_corpus(500, feature_dim=32, seed=3)
    b = generate_synthetic_corpus(500, feature_dim=32, seed=3)
    assert a.caption_text == b.caption_text
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.features, generate_synthetic_features(500, feature_dim=32, seed=3))
    assert not np.array_equal(a.features, generate_synthetic_corpus(500, feature_dim=32, seed=4).features)


_DIGEST = """
import hashlib, sys
from grcm.data.synthetic import generate_synthetic_corpus
plain = generate_synthetic_corpus(300, feature_dim=64, seed=1)
tokens = generate_synthetic_corpus(300, feature_dim=64, seed=1, token_features=True)
digest = hashlib.sha256(plain.features.tobytes() + tokens.token_features.tobytes())
sys.stdout.write(digest.hexdigest())
"""


def test_same_corpus_at_every_thread_count():
    """The corpus is data, not a result: BLAS threads (summation order) must not change a single bit."""
    root = Path(__file__).resolve().parents[1]
    digests = {}
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        digests[threads] = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True,
                                          text=True, check=True, timeout=120).stdout
    plain = generate_synthetic_corpus(300, feature_dim=64, seed=1)
    tokens = generate_synthetic_corpus(300, feature_dim=64, seed=1, token_features=True)
    here = hashlib.sha256(plain.features.tobytes() + tokens.token_features.tobytes()).hexdigest()
    assert digests["1"] == digests["2"] == here


def test_shapes_splits_and_normalisation():
    corpus = generate_synthetic_corpus(300, feature_dim=48, captions_per_item=6)
    assert corpus.features.shape == (300, 48) and corpus.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(corpus.features, axis=1), 1.0, atol=1e-5)
    per_item = np.bincount(corpus.caption_item, minlength=300)
    assert (per_item == 8).all()  # 6 train + 1 val + 1 test
    for split, count in (("train", 6), ("val", 1), ("test", 1)):
        assert (np.bincount(corpus.caption_item[corpus.captions_of_split(split)], minlength=300) == count).all()
    assert len(set(corpus.item_ids)) == 300


def test_captions_are_paraphrased_and_ambiguous():
    corpus = generate_synthetic_corpus(1000)
    texts = corpus.caption_text
    # an item's captions are not copies of one another
    first_item = [texts[i] for i in np.flatnonzero(corpus.caption_item == 0)]
    assert len(set(first_item)) >= 4
    # some test captions are shared verbatim by several items (ambiguous queries exist)
    test_texts = [texts[i] for i in corpus.captions_of_split("test")]
    assert len(set(test_texts)) < len(test_texts)


def test_near_duplicates_and_hierarchy_exist():
    config = SyntheticConfig(num_items=2000)
    attributes = _sample_attributes(config, np.random.default_rng(config.seed))
    assert attributes.shape == (2000, len(SLOTS))
    distinct = np.unique(attributes, axis=0).shape[0]
    assert distinct <= 2000 - 0.9 * config.near_duplicate_fraction * 2000  # copied attribute rows
    features = generate_synthetic_features(2000)
    subject = attributes[:, SLOTS.index("subject")]
    sims = features @ features.T
    same = subject[:, None] == subject[None, :]
    np.fill_diagonal(same, False)
    off_diag = ~np.eye(2000, dtype=bool)
    # items sharing a subject are more similar than random pairs: there is structure to find
    assert sims[same].mean() > sims[off_diag].mean() + 0.05
