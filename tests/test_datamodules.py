"""DataModules: batch contracts, val subsets, trained vocabularies, on-disk corpora."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grcm.data import CorpusDataModule, CorpusError, SyntheticDataModule, save_corpus


@pytest.fixture(scope="module")
def queries_dm():
    dm = SyntheticDataModule(num_items=120, feature_dim=16, batch_size=32, eval_batch_size=50, max_val_queries=40)
    dm.setup()
    return dm


def test_sizes_known_before_setup():
    dm = SyntheticDataModule(num_items=50, feature_dim=24)
    assert dm.corpus is None and dm.feature_dim == 24 and dm.vocab_size == 30522 and dm.pad_token_id == 0


def test_train_batches_pair_queries_with_their_items(queries_dm):
    corpus = queries_dm.corpus
    batch = next(iter(queries_dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 32
    assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"][:, 0].all()
    assert (batch["input_ids"][~batch["attention_mask"]] == queries_dm.pad_token_id).all()
    for query, item in zip(batch["query_index"].tolist(), batch["item_index"].tolist()):
        assert corpus.caption_item[query] == item and corpus.caption_split[query] == "train"
    # every train caption is served once per epoch
    served = torch.cat([b["query_index"] for b in queries_dm.train_dataloader()])
    assert sorted(served.tolist()) == corpus.captions_of_split("train").tolist()


def test_eval_batches_carry_gold_items(queries_dm):
    corpus = queries_dm.corpus
    val = list(queries_dm.val_dataloader())
    assert sum(len(b["query_index"]) for b in val) == 40  # max_val_queries subset
    test = next(iter(queries_dm.test_dataloader()))
    assert test["gold_items"].shape == (50, 1)
    np.testing.assert_array_equal(test["gold_items"][:, 0].numpy(), corpus.caption_item[test["query_index"].numpy()])
    assert all(corpus.caption_split[q] == "test" for q in test["query_index"].tolist())
    again = SyntheticDataModule(num_items=120, feature_dim=16, max_val_queries=40)
    assert again.query_batches("val").query_index.tolist() == queries_dm.query_batches("val").query_index.tolist()


def test_item_batches_return_feature_rows():
    dm = SyntheticDataModule(num_items=100, feature_dim=8, serve="items", batch_size=16)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    np.testing.assert_array_equal(batch["features"].numpy(), dm.corpus.features[batch["item_index"].numpy()])
    assert sum(len(b["item_index"]) for b in dm.val_dataloader()) == 100


def test_trained_wordpiece_vocabulary_travels_in_state_dict():
    dm = SyntheticDataModule(num_items=80, feature_dim=8, query_vocab="wordpiece", wordpiece_vocab_size=500)
    dm.setup()
    state = dm.state_dict()
    restored = SyntheticDataModule(num_items=80, feature_dim=8, query_vocab="wordpiece", wordpiece_vocab_size=500)
    restored.load_state_dict(state)
    texts = ["a brown puppy running on a beach", "slow motion clip of a car"]
    assert torch.equal(dm.query_tokenizer.encode(texts)[0], restored.query_tokenizer.encode(texts)[0])
    assert dm.query_tokenizer.vocab_size <= 500


def test_corpus_directory_and_dimension_mismatch(tmp_path):
    source = SyntheticDataModule(num_items=60, feature_dim=12)
    source.setup()
    save_corpus(source.corpus, tmp_path / "corpus")
    dm = CorpusDataModule(corpus_dir=str(tmp_path / "corpus"))
    assert dm.feature_dim == 12
    dm.setup()
    assert dm.corpus.item_ids == source.corpus.item_ids
    wrong = CorpusDataModule(corpus_dir=str(tmp_path / "corpus"))
    wrong.feature_dim = 13  # as if the config asked for another dimension
    with pytest.raises(CorpusError, match="data.feature_dim=12"):
        wrong.setup()
    with pytest.raises(ValueError, match="serve"):
        SyntheticDataModule(serve="pairs")
