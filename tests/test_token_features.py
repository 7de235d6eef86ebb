"""Multi-token item features: schema, on-disk round trip, validation errors, synthetic tokens, batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from grcm.data import CorpusError, SyntheticDataModule, generate_synthetic_corpus, load_corpus, save_corpus
from grcm.data.datamodules import item_token_batch
from grcm.data.synthetic import ASPECTS


@pytest.fixture(scope="module")
def corpus():
    return generate_synthetic_corpus(60, feature_dim=16, token_features=True, noise_tokens=3)


def test_synthetic_tokens_shapes_padding_and_pooled_mean(corpus):
    plain = generate_synthetic_corpus(60, feature_dim=16)
    assert plain.token_features is None and corpus.caption_text == plain.caption_text  # same captions
    tokens, lengths = corpus.token_features, corpus.token_lengths
    assert tokens.shape == (60, len(ASPECTS) + 3, 16) and tokens.dtype == np.float32
    assert lengths.min() >= len(ASPECTS) and lengths.max() <= len(ASPECTS) + 3 and len(set(lengths.tolist())) > 1
    valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    np.testing.assert_allclose(np.linalg.norm(tokens[valid], axis=1), 1.0, atol=1e-5)
    assert not tokens[~valid].any()  # padding is zero
    mean = tokens.sum(1) / lengths[:, None]
    np.testing.assert_allclose(corpus.features, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)
    again = generate_synthetic_corpus(60, feature_dim=16, token_features=True, noise_tokens=3)
    np.testing.assert_array_equal(again.token_features, tokens)


def test_round_trip_memory_maps_tokens(tmp_path, corpus):
    save_corpus(corpus, tmp_path)
    header = json.loads((tmp_path / "corpus.json").read_text())
    assert header["token_features"] == "token_features.npy" and header["token_lengths"] == "token_lengths.npy"
    loaded = load_corpus(tmp_path)
    assert isinstance(loaded.token_features, np.memmap)
    np.testing.assert_array_equal(loaded.token_features, corpus.token_features)
    np.testing.assert_array_equal(loaded.token_lengths, corpus.token_lengths)
    # without token_lengths every item has all T tokens
    del header["token_lengths"]
    (tmp_path / "corpus.json").write_text(json.dumps(header))
    assert (load_corpus(tmp_path).item_token_lengths() == corpus.max_tokens).all()


def test_bad_token_features_name_file_field_and_fix(tmp_path, corpus):
    save_corpus(corpus, tmp_path)
    tokens = np.load(tmp_path / "token_features.npy")
    np.save(tmp_path / "token_features.npy", tokens[:-1])
    with pytest.raises(CorpusError, match=r"token_features have shape \(59, 7, 16\) but there are 60 items"):
        load_corpus(tmp_path)
    np.save(tmp_path / "token_features.npy", tokens[:, :, :8])
    with pytest.raises(CorpusError, match="16-d pooled features"):
        load_corpus(tmp_path)
    bad = tokens.copy()
    bad[5, 6, 0] = np.nan  # even a padding position
    np.save(tmp_path / "token_features.npy", bad)
    with pytest.raises(CorpusError, match=rf"token_features of item\(s\) '{corpus.item_ids[5]}'.*NaN.*write zeros"):
        load_corpus(tmp_path)
    np.save(tmp_path / "token_features.npy", tokens)
    lengths = corpus.token_lengths.copy()
    lengths[2] = 0
    np.save(tmp_path / "token_lengths.npy", lengths)
    with pytest.raises(CorpusError, match=rf"token_lengths: item\(s\) '{corpus.item_ids[2]}' \(0\).*\[1, 7\]"):
        load_corpus(tmp_path)
    (tmp_path / "token_lengths.npy").unlink()
    with pytest.raises(CorpusError, match=r"token_lengths.npy: corpus.json field 'token_lengths' names a missing"):
        load_corpus(tmp_path)


def test_item_batches_and_token_batch_mask(corpus):
    items = np.array([3, 0, 7])
    tokens, mask = item_token_batch(corpus, torch.as_tensor(items))
    width = int(corpus.token_lengths[items].max())
    assert tokens.shape == (3, width, 16) and mask.shape == (3, width) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == corpus.token_lengths[items].tolist()
    np.testing.assert_array_equal(tokens.numpy(), corpus.token_features[items, :width])
    dm = SyntheticDataModule(num_items=60, feature_dim=16, serve="items", eval_batch_size=25,
                             token_features=True, noise_tokens=3)
    batch = next(iter(dm.val_dataloader()))
    assert batch["token_features"].shape[:2] == batch["token_mask"].shape and batch["features"].shape == (25, 16)
    plain = SyntheticDataModule(num_items=60, feature_dim=16, serve="items")
    assert "token_features" not in next(iter(plain.val_dataloader()))
    with pytest.raises(CorpusError, match="no token features.*data.init_args.token_features=true"):
        item_token_batch(plain.corpus, items)
