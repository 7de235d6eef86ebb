"""The real-language benchmark's inductive protocol (``--protocol inductive``): the corpora it re-splits by the
standard item split, and the retriever checkpoint it restricts to an evaluation pool.

A toy caption set (30 items: 12 train, 6 val, 12 test, 8 distinct captions each) stands in for MSVD; a hashed
random vector per caption stands in for MiniLM, so no model is downloaded and the corpora build in milliseconds.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

from grcm.data.caption_features import CaptionSplitPlan, caption_feature_corpus
from grcm.data.corpus import save_corpus
from grcm.data.datamodules import CorpusDataModule
from grcm.data.datasets.captions import CaptionSet
from grcm.index_items import restrict_sid_table
from grcm.retriever.module import GenerativeRetriever
from grcm.tokenizers.module import ACETokenizer

SPLIT_OF = ["train", "test", "train", "val", "test"] * 6  # 12 train, 6 val, 12 test items, interleaved
CAPTIONS, HELD_OUT, TEST, VAL = 8, 3, 2, 1
DIM = 16

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _benchmark():
    return load_benchmark("real_language_inductive")


def _captions(split_of=SPLIT_OF) -> CaptionSet:
    items = [i for i in range(len(split_of)) for _ in range(CAPTIONS)]
    return CaptionSet(
        name="toy", modality="video", item_ids=[f"vid{i}" for i in range(len(split_of))],
        caption_item=np.asarray(items, dtype=np.int64),
        caption_text=[f"video {i} shows scene number {j}" for i in range(len(split_of)) for j in range(CAPTIONS)],
        caption_split=np.asarray([split_of[i] for i in items]),
    )


def _embed(texts):
    """(T, DIM) unit vectors, a fixed random vector per text (a MiniLM stand-in)."""
    rows = [np.random.default_rng(abs(hash(text)) % 2**32).standard_normal(DIM) for text in texts]
    vectors = np.asarray(rows, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built():
    benchmark = _benchmark()
    captions = _captions()
    corpus = caption_feature_corpus(captions, _embed, CaptionSplitPlan(held_out=HELD_OUT, test=1, val=1), seed=0)
    corpora = benchmark.inductive_corpora(corpus, benchmark.standard_item_splits(captions), test=TEST, val=VAL,
                                          max_train=None)
    return benchmark, corpus, corpora


def _pairs(corpus, split: str) -> set[tuple[str, str]]:
    """(item id, caption text) of every caption of ``split``."""
    return {(corpus.item_ids[corpus.caption_item[r]], corpus.caption_text[r]) for r in corpus.captions_of_split(split)}


def test_no_val_or_test_video_has_training_captions_and_the_pools_hold_their_split(built):
    _, transductive, corpora = built
    full = corpora["all"]
    ids_of = {split: [f"vid{i}" for i, s in enumerate(SPLIT_OF) if s == split] for split in ("train", "val", "test")}
    assert full.item_ids == transductive.item_ids and np.array_equal(full.features, transductive.features)
    # every caption sits in its item's standard split: training captions only of train videos
    for split in ("train", "val", "test"):
        assert {item for item, _ in _pairs(full, split)} == set(ids_of[split]), split
    per_item = np.bincount(full.caption_item, minlength=full.num_items)
    expected = {"train": CAPTIONS - HELD_OUT, "val": VAL, "test": TEST}  # a train video keeps every query caption
    assert per_item.tolist() == [expected[s] for s in SPLIT_OF]
    # queries are queries of the transductive corpus (never an item's held-out feature captions)
    queries = set().union(*(_pairs(transductive, s) for s in ("train", "val", "test")))
    assert set().union(*(_pairs(full, s) for s in ("train", "val", "test"))) <= queries

    for key, split in (("pool_test", "test"), ("pool_val", "val")):
        pool = corpora[key]
        assert pool.item_ids == ids_of[split], key  # exactly that split's videos, in corpus order
        rows = [full.item_ids.index(item) for item in pool.item_ids]
        assert np.array_equal(pool.features, full.features[rows]), key
        assert set(pool.caption_split.tolist()) == {split}, key
        assert _pairs(pool, split) == _pairs(full, split), key  # the same queries, pointing at the same videos


def test_items_without_one_standard_split_are_refused(built):
    benchmark, corpus, _ = built
    mixed = _captions()
    mixed.caption_split[0] = "test"  # vid0 is a train video with one test caption
    with pytest.raises(ValueError, match="vid0"):
        benchmark.standard_item_splits(mixed)
    splits = benchmark.standard_item_splits(_captions())
    del splits["vid4"]
    with pytest.raises(ValueError, match="vid4"):
        benchmark.inductive_corpora(corpus, splits, test=1, val=1, max_train=None)


def test_restricted_checkpoint_decodes_only_into_the_pool_with_the_trained_sids(built, tmp_path):
    benchmark, _, corpora = built
    full_dir, pool_dir = save_corpus(corpora["all"], tmp_path / "all"), save_corpus(corpora["pool_test"], tmp_path / "pool")
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, max_epochs=1,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    tokenizer = ACETokenizer(feature_dim=DIM, bundle_dir=str(tmp_path / "bundle"), coarse_codebook_size=3,
                             codebook_size=4, latent_dim=4, hidden_dims=(16,), warmup_epochs=1, health_pairs=50)
    trainer.fit(tokenizer, datamodule=CorpusDataModule(str(full_dir), serve="items", batch_size=30))
    data = CorpusDataModule(str(full_dir), eval_batch_size=64, uncovered_items="ignore")
    retriever = GenerativeRetriever(bundle_dir=str(tmp_path / "bundle"), vocab_size=data.vocab_size, d_model=16,
                                    num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, beam_size=2)
    trainer.test(retriever, datamodule=data, verbose=False)
    trainer.save_checkpoint(tmp_path / "trained.ckpt")

    pool = corpora["pool_test"]
    path = restrict_sid_table(tmp_path / "trained.ckpt", list(pool.item_ids), tmp_path / "pool.ckpt")
    cap = benchmark.pool_cap(0.5, pool.num_items)
    module = GenerativeRetriever.load_from_checkpoint(path, weights_only=True, recall_levels=1, beam_size=3,
                                                      max_pool_items=cap)
    rows = [corpora["all"].item_ids.index(item) for item in pool.item_ids]
    assert module.item_ids == list(pool.item_ids)
    assert torch.equal(module.sid_codes, retriever.sid_codes[rows])  # each pool item keeps its trained SID
    pool_data = CorpusDataModule(str(pool_dir), eval_batch_size=64, uncovered_items="ignore")
    logged = trainer.test(module, datamodule=pool_data, verbose=False)[0]  # the bundle/corpus item check passes
    assert 0 < logged["test/pool_items"] <= cap
    # the share is of the pool (the test videos), not of every trained item
    assert logged["test/pool_share"] == pytest.approx(logged["test/pool_items"] / pool.num_items)
    # the cap cuts the items under the decoded prefixes, which are pool items too
    assert logged["test/pool_items"] <= logged["test/prefix_items"] <= pool.num_items
    assert logged["test/prefix_share"] == pytest.approx(logged["test/prefix_items"] / pool.num_items)
    assert logged["test/unseen/queries"] == TEST * pool.num_items  # no test video has a training caption
    batch = next(iter(pool_data.test_dataloader()))
    recalled = module.retrieve(batch["input_ids"], batch["attention_mask"], max_items=pool.num_items)
    assert int(recalled.max()) < pool.num_items and bool((recalled >= 0).any())  # pool indices only

    with pytest.raises(ValueError, match="vid0"):  # a train video is not in the test pool's checkpoint
        restrict_sid_table(path, ["vid0"], tmp_path / "bad.ckpt")


def test_restricted_grdr_table_keeps_both_tables_rows_of_the_pool(built, tmp_path):
    benchmark, _, _ = built
    codes = torch.arange(5 * 2 * 3).reshape(5, 2, 3)
    torch.save({"state_dict": {"sids.sid_codes": codes, "sids.anchor_codes": codes + 100},
                "grdr_sid_table": {"item_ids": [f"v{i}" for i in range(5)]}}, tmp_path / "grdr.ckpt")
    restrict_sid_table(tmp_path / "grdr.ckpt", ["v3", "v1"], tmp_path / "pool.ckpt")
    out = torch.load(tmp_path / "pool.ckpt", weights_only=True)
    assert out["grdr_sid_table"]["item_ids"] == ["v3", "v1"]
    assert torch.equal(out["state_dict"]["sids.sid_codes"], codes[[3, 1]])
    assert torch.equal(out["state_dict"]["sids.anchor_codes"], codes[[3, 1]] + 100)
