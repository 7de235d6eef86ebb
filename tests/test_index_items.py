"""``grcm index-items``: new items get SIDs from the trained tokenizer and join a retriever checkpoint.

A tokenizer and a retriever are trained on the first 100 items of a 120-item corpus; the other 20 are
indexed afterwards. Their SIDs are checked against an independent computation (the tokenizer's codes
of the new features with the bundle's unique-token rule over all 120 items), existing SIDs against the
old checkpoint, and the result is evaluated on the 120-item corpus like ``grcm test``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from cpu_trainer import cpu_trainer

from grcm.data.corpus import save_corpus
from grcm.data.datamodules import CorpusDataModule
from grcm.data.synthetic import generate_synthetic_corpus
from grcm.index_items import IndexItemsError, main, unique_tokens
from grcm.retriever.module import GenerativeRetriever
from grcm.tokenizers.module import ACETokenizer
from grcm.tokenizers.unique_token import append_unique_token

OLD, NEW = 100, 20
SMALL = dict(coarse_codebook_size=6, codebook_size=8, latent_dim=8, hidden_dims=(32, 16), lr=1e-3, warmup_epochs=1,
             health_pairs=100)

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _trainer(root: Path, **overrides) -> L.Trainer:
    return cpu_trainer(root, **{"limit_val_batches": 0, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Corpus dirs (old: 100 items, full: 120), tokenizer and retriever checkpoints, new items' files."""
    root = tmp_path_factory.mktemp("index_items")
    full = generate_synthetic_corpus(OLD + NEW, feature_dim=32, seed=3)
    keep = full.caption_item < OLD
    old = dataclasses.replace(full, item_ids=full.item_ids[:OLD], features=full.features[:OLD],
                              caption_item=full.caption_item[keep],
                              caption_text=[t for t, k in zip(full.caption_text, keep) if k],
                              caption_split=full.caption_split[keep])
    save_corpus(old, root / "old")
    save_corpus(full, root / "full")
    # the grown corpus as it is served after the new items arrive: they have no training queries
    kept = ~((full.caption_split == "train") & (full.caption_item >= OLD))
    save_corpus(dataclasses.replace(full, caption_item=full.caption_item[kept], caption_split=full.caption_split[kept],
                                    caption_text=[t for t, k in zip(full.caption_text, kept) if k]), root / "grown")
    L.seed_everything(0, verbose=False)
    tokenizer = ACETokenizer(feature_dim=32, bundle_dir=str(root / "bundle"), **SMALL)
    trainer = _trainer(root, max_epochs=1)
    trainer.fit(tokenizer, datamodule=CorpusDataModule(str(root / "old"), serve="items", batch_size=50))
    trainer.save_checkpoint(root / "tokenizer.ckpt")
    data = CorpusDataModule(str(root / "old"), batch_size=64, eval_batch_size=64)
    retriever = GenerativeRetriever(bundle_dir=str(root / "bundle"), vocab_size=data.vocab_size, d_model=16,
                                    num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, beam_size=4)
    trainer = _trainer(root, max_steps=2)
    trainer.fit(retriever, datamodule=data)
    trainer.save_checkpoint(root / "retriever.ckpt")
    np.save(root / "new.npy", full.features[OLD:])
    (root / "new_ids.txt").write_text("\n".join(full.item_ids[OLD:]) + "\n")
    return root, full, tokenizer.eval(), retriever


def _index(root: Path, out: Path, *extra: str) -> None:
    main(["--ckpt_path", str(root / "retriever.ckpt"), "--tokenizer", str(root / "tokenizer.ckpt"),
          "--out", str(out), *extra])


def test_new_items_get_the_tokenizers_sids_and_existing_sids_do_not_change(trained, tmp_path):
    root, full, tokenizer, retriever = trained
    out = tmp_path / "indexed.ckpt"
    _index(root, out, "--features", str(root / "new.npy"), "--item_ids", str(root / "new_ids.txt"))
    module = GenerativeRetriever.load_from_checkpoint(out, weights_only=True)
    assert module.item_ids == full.item_ids
    assert torch.equal(module.sid_codes[:OLD], retriever.sid_codes)
    prefix = tokenizer.encode_corpus(full.features)[0]  # all 120 items' prefixes, as one bundle would count them
    expected, unique_vocab = append_unique_token(prefix)
    assert unique_vocab <= module.model.sid_vocab_sizes[-1]  # no new item overflows the unique token here
    assert torch.equal(module.sid_codes[OLD:], expected[OLD:])
    # the trie (rebuilt from the table) maps every new SID to its item
    trie = module.trie
    assert trie.items_of_leaves(trie.lookup(module.sid_codes[OLD:]))[:, 0].tolist() == list(range(OLD, OLD + NEW))
    # --corpus_dir finds the same 20 new items and writes the same table
    again = tmp_path / "from_corpus.ckpt"
    _index(root, again, "--corpus_dir", str(root / "full"))
    assert torch.equal(GenerativeRetriever.load_from_checkpoint(again, weights_only=True).sid_codes, module.sid_codes)


def test_the_indexed_checkpoint_evaluates_on_the_grown_corpus_and_recalls_new_items(trained, tmp_path):
    root, full, _, _ = trained
    out = tmp_path / "indexed.ckpt"
    _index(root, out, "--corpus_dir", str(root / "grown"))
    module = GenerativeRetriever.load_from_checkpoint(out, weights_only=True, recall_levels=1, beam_size=6,
                                                      max_pool_items=120)
    data = CorpusDataModule(str(root / "grown"), eval_batch_size=256, uncovered_items="ignore")
    logged = _trainer(tmp_path).test(module, datamodule=data, verbose=False)[0]
    test_items = full.caption_item[full.caption_split == "test"]
    assert logged["test/unseen/queries"] == (test_items >= OLD).sum()  # the new items' queries, reported apart
    batch = next(iter(data.test_dataloader()))
    pool = module.retrieve(batch["input_ids"], batch["attention_mask"], max_items=120)
    assert bool((pool >= OLD).any())  # prefixes of 6 coarse codes bring new items into the pools
    assert logged["test/unseen/candidate_recall"] > 0


def test_duplicate_ids_and_wrong_feature_dimensions_are_refused_in_one_line(trained, tmp_path):
    root, full, _, _ = trained
    out = tmp_path / "never.ckpt"
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join([full.item_ids[0], *full.item_ids[OLD + 1:]]))  # item 0 is indexed already
    with pytest.raises(IndexItemsError, match="already in the checkpoint") as error:
        _index(root, out, "--features", str(root / "new.npy"), "--item_ids", str(ids))
    assert "\n" not in str(error.value)
    ids.write_text("\n".join(["a", "a", *full.item_ids[OLD + 2:]]))
    with pytest.raises(IndexItemsError, match="given twice"):
        _index(root, out, "--features", str(root / "new.npy"), "--item_ids", str(ids))
    np.save(tmp_path / "narrow.npy", full.features[OLD:, :16])
    with pytest.raises(IndexItemsError, match="32-d features") as error:
        _index(root, out, "--features", str(tmp_path / "narrow.npy"), "--item_ids", str(root / "new_ids.txt"))
    assert "\n" not in str(error.value)
    assert not out.exists()


def test_grdr_checkpoint_gets_every_view_of_the_new_items_from_its_own_tokenizer(tmp_path):
    from grcm.retriever.grdr import GRDRRetriever
    from grcm.retriever.grdr.state import CHECKPOINT_KEY

    torch.manual_seed(0)
    module = GRDRRetriever(vocab_size=40, feature_dim=12, num_views=2, num_levels=2, codebook_size=5, d_model=8,
                           tokenizer_hidden=8, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=16)
    features = torch.randn(30, 12)
    module.sids.attach_corpus([f"v{i}" for i in range(25)], features[:25].numpy(), "toy")
    module.sids.initialised_levels.fill_(2)
    module.sids.refresh(module.tokenizer)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": L.__version__, CHECKPOINT_KEY: module.sids.checkpoint_extras()}
    torch.save(checkpoint, tmp_path / "grdr.ckpt")
    np.save(tmp_path / "new.npy", features[25:].numpy())
    (tmp_path / "ids.txt").write_text("\n".join(f"v{i}" for i in range(25, 30)))
    main(["--ckpt_path", str(tmp_path / "grdr.ckpt"), "--out", str(tmp_path / "out.ckpt"),
          "--features", str(tmp_path / "new.npy"), "--item_ids", str(tmp_path / "ids.txt")])
    indexed = GRDRRetriever.load_from_checkpoint(tmp_path / "out.ckpt", weights_only=True)
    assert indexed.item_ids == [f"v{i}" for i in range(30)]
    with torch.no_grad():
        expected = module.eval().tokenizer.encode(features, 2)  # all 30 items through the same tokenizer
    assert torch.equal(indexed.sid_codes, expected)
    assert torch.equal(indexed.sid_codes[:25], module.sid_codes)


def test_new_items_count_the_items_already_holding_their_prefix():
    """The counter of a new item is the number of items (existing first, then earlier new ones) holding its
    prefix; with a one-code vocabulary (no counter level) that count is the number of new items sharing a leaf."""
    existing = torch.tensor([[0, 1], [2, 3], [0, 1]])
    new = torch.tensor([[0, 1], [4, 5], [4, 5], [2, 3], [6, 7]])
    tokens, over = unique_tokens(existing, new, vocab=3)
    assert tokens.tolist() == [2, 0, 1, 1, 0] and over == 0
    tokens, over = unique_tokens(existing, new, vocab=2)
    assert tokens.tolist() == [1, 0, 1, 1, 0] and over == 1  # the third item of (0, 1) shares the last leaf
    assert unique_tokens(existing, new, vocab=1)[1] == 3  # (0, 1), the second (4, 5) and (2, 3) share a leaf
