"""The ``minilm_compact`` query vocabulary: MiniLM's tokenization over the tokens the training queries use.

Covered: MiniLM's exact pieces (remapped ids) on val/test words made of kept tokens, unseen words, the
capacity warning, a vocabulary that depends on the training split alone, the state-dict and checkpoint
round trips (``grcm fit`` / ``grcm test --ckpt_path`` and an in-process restore), the dense checkpoint's
tokenizer for two-stage rerank, and an exact mid-epoch resume of a retriever on the compact vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from test_cli_runs import grcm
from test_resume import KillAt, Killed
from toy_sid import save_toy_bundle

from grcm.checkpoint import ModelCheckpoint
from grcm.data import SyntheticDataModule
from grcm.data.query_tokenizer import SPECIAL_TOKENS, QueryTokenizer
from grcm.rerank.dense_models import dense_query_tokenizer
from grcm.rerank.dual_tower import DualTower
from grcm.rerank.query_bridge import dense_tokenizer_for
from grcm.rerank.two_stage import TwoStageEvaluation
from grcm.retriever.module import GenerativeRetriever

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
UNSEEN = [
    "a quokka juggling xylophones in zürich",
    "淡水 fish 🐟 swimming",
    "supercalifragilisticexpialidocious hyperventilating",
    "",
]
# MiniLM's [MASK] is kept only when the training queries use it; otherwise it is plain text
SPECIAL_TEXT = "[MASK] [CLS] plain [SEP] words"


@pytest.fixture(scope="module")
def compact_dm():
    dm = SyntheticDataModule(num_items=200, feature_dim=8, batch_size=64, query_vocab="minilm_compact")
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def minilm():
    return QueryTokenizer.minilm()


def _words(encoding) -> dict[int, list[str]]:
    """Pieces of each word of an encoding (special tokens left out)."""
    words: dict[int, list[str]] = {}
    for token, word in zip(encoding.tokens, encoding.word_ids):
        if word is not None:
            words.setdefault(word, []).append(token)
    return words


def _train_texts(dm) -> list[str]:
    corpus = dm.corpus
    texts = [corpus.caption_text[i] for i in corpus.captions_of_split("train")]
    return texts + (list(corpus.extra_text) if dm.use_extra_queries else [])


def test_sizes_before_setup_and_special_ids():
    dm = SyntheticDataModule(num_items=50, feature_dim=8, query_vocab="minilm_compact")
    assert dm.query_tokenizer is None and dm.vocab_size == 4096 and dm.pad_token_id == 0
    assert SyntheticDataModule(query_vocab="minilm_compact", compact_vocab_size=300).vocab_size == 300
    with pytest.raises(ValueError, match="minilm_compact"):
        SyntheticDataModule(query_vocab="minilm_compressed")
    dm.setup()
    vocab = dm.query_tokenizer.tokenizer.get_vocab()
    assert [vocab[token] for token in SPECIAL_TOKENS] == [0, 1, 2, 3] and dm.pad_token_id == 0
    assert sorted(vocab.values()) == list(range(dm.query_tokenizer.vocab_size)), "contiguous ids"
    batch = next(iter(dm.train_dataloader()))
    assert (batch["input_ids"][:, 0] == 2).all(), "[CLS] first"
    assert (batch["input_ids"][~batch["attention_mask"]] == 0).all() and batch["input_ids"].max() < dm.vocab_size


def test_vocabulary_is_exactly_the_training_tokens(compact_dm, minilm):
    used = {token for text in _train_texts(compact_dm) for token in minilm.tokenizer.encode(text).tokens}
    assert set(compact_dm.query_tokenizer.tokenizer.get_vocab()) == used | set(SPECIAL_TOKENS)
    assert compact_dm.query_tokenizer.vocab_size < 1000


@pytest.mark.parametrize("split", ["val", "test"])
def test_kept_words_tokenize_exactly_as_minilm(compact_dm, minilm, split):
    """Every val/test word whose MiniLM pieces are all kept gets exactly those pieces (remapped ids); whole
    captions made of kept tokens give the same token sequence."""
    corpus, compact = compact_dm.corpus, compact_dm.query_tokenizer
    vocab, minilm_vocab = compact.tokenizer.get_vocab(), minilm.tokenizer.get_vocab()
    texts = [corpus.caption_text[i] for i in corpus.captions_of_split(split)] + UNSEEN
    checked_words = unseen_words = whole = 0
    for text, theirs, mine in zip(texts, minilm.tokenizer.encode_batch(texts), compact.tokenizer.encode_batch(texts)):
        ours, reference = _words(mine), _words(theirs)
        assert ours.keys() == reference.keys(), "MiniLM's normalizer and pre-tokenizer: the same words"
        for word, pieces in reference.items():
            if all(piece in vocab for piece in pieces):
                assert ours[word] == pieces, (text, word)
                checked_words += 1
            else:  # unseen: other kept pieces or [UNK], never a crash
                assert ours[word] == ["[UNK]"] or all(piece in vocab for piece in ours[word]), (text, word)
                unseen_words += 1
        if all(token in vocab for token in theirs.tokens):
            assert mine.tokens == theirs.tokens
            assert mine.ids == [vocab[token] for token in theirs.tokens]
            assert [minilm_vocab[token] for token in mine.tokens] == theirs.ids
            whole += 1
    assert checked_words > 5 * len(texts) and unseen_words >= 6 and whole >= 0.9 * len(texts)
    # the served batches hold these ids
    batches = compact_dm.query_batches(split)
    ids, mask = compact.encode([corpus.caption_text[i] for i in batches.query_index.tolist()])
    assert torch.equal(batches.input_ids, ids) and torch.equal(batches.attention_mask, mask)


def test_unseen_words_become_unk_or_kept_pieces(compact_dm):
    compact = compact_dm.query_tokenizer
    ids, mask = compact.encode([*UNSEEN, SPECIAL_TEXT])
    assert ids.max() < compact.vocab_size and ids.min() >= 0
    tokens = [compact.tokenizer.encode(text).tokens for text in [*UNSEEN, SPECIAL_TEXT]]
    assert tokens[3] == ["[CLS]", "[SEP]"]
    assert "[UNK]" in tokens[0] and "[UNK]" in tokens[2]
    assert tokens[4][1:4] == ["[UNK]"] * 3, "[MASK] is no training token: plain text, '[', 'mask', ']' unseen"
    assert tokens[4].count("[CLS]") == 2, "MiniLM's special tokens keep theirs"


def test_capacity_keeps_the_most_frequent_tokens_and_warns(compact_dm, minilm):
    texts = _train_texts(compact_dm)
    distinct = compact_dm.query_tokenizer.vocab_size - len(SPECIAL_TOKENS)
    with pytest.warns(UserWarning, match=rf"use {distinct} distinct MiniLM tokens .* holds 40 \(36 after .*"
                                         rf"other {distinct - 36} tokens .* at least {distinct + 4}"):
        small = QueryTokenizer.minilm_compact(texts, vocab_size=40)
    assert small.vocab_size == 40
    counts: dict[str, int] = {}
    for encoding in minilm.tokenizer.encode_batch(texts, add_special_tokens=False):
        for token in encoding.tokens:
            counts[token] = counts.get(token, 0) + 1
    ranked = sorted(counts, key=lambda token: (-counts[token], minilm.tokenizer.token_to_id(token)))
    assert set(small.tokenizer.get_vocab()) == set(ranked[:36]) | set(SPECIAL_TOKENS)
    ids, _ = small.encode(texts[:50])
    assert ids.max() < 40 and (ids == 1).any(), "dropped tokens: [UNK] (or other kept pieces)"
    with pytest.raises(ValueError, match="vocab_size=4"):
        QueryTokenizer.minilm_compact(texts, vocab_size=4)
    # the data module warns the same way, and its model size stays the capacity
    dm = SyntheticDataModule(num_items=200, feature_dim=8, query_vocab="minilm_compact", compact_vocab_size=40)
    with pytest.warns(UserWarning, match="data.compact_vocab_size"):
        dm.setup()
    assert dm.vocab_size == dm.query_tokenizer.vocab_size == 40


def test_vocabulary_depends_on_the_training_queries_alone(compact_dm):
    """Built from the train split deterministically: every rank (and every resume) gets the same one."""
    again = SyntheticDataModule(num_items=200, feature_dim=8, query_vocab="minilm_compact", max_val_queries=17,
                                eval_batch_size=7, batch_size=5)
    again.setup()
    assert again.query_tokenizer.to_json() == compact_dm.query_tokenizer.to_json()
    # extra (generated) queries used in training add their tokens
    plain = SyntheticDataModule(num_items=40, feature_dim=8, query_vocab="minilm_compact")
    extra = SyntheticDataModule(num_items=40, feature_dim=8, query_vocab="minilm_compact",
                                generated_queries_per_item=1)
    plain.setup()
    extra.setup()
    assert len(extra.corpus.extra_text) and extra.query_tokenizer.vocab_size > plain.query_tokenizer.vocab_size
    minilm = QueryTokenizer.minilm().tokenizer
    used = {token for text in extra.corpus.extra_text for token in minilm.encode(text).tokens}
    assert used <= set(extra.query_tokenizer.tokenizer.get_vocab())


def test_state_dict_round_trip(compact_dm):
    state = compact_dm.state_dict()
    payload = state["query_tokenizer"]
    assert QueryTokenizer.from_json(payload).to_json() == payload == compact_dm.query_tokenizer.to_json()
    assert json.loads(payload)["model"]["type"] == "WordPiece"
    # restored before set-up, and after set-up on other training queries: the stored vocabulary wins
    before = SyntheticDataModule(num_items=200, feature_dim=8, query_vocab="minilm_compact")
    before.load_state_dict(state)
    after = SyntheticDataModule(num_items=200, feature_dim=8, query_vocab="minilm_compact", captions_per_item=1)
    after.setup()
    assert after.query_tokenizer.to_json() != payload
    after.load_state_dict(state)
    for dm in (before, after):
        assert dm.query_tokenizer.to_json() == payload and dm.pad_token_id == 0
    assert torch.equal(before.query_batches("test").input_ids, compact_dm.query_batches("test").input_ids)
    texts = [after.corpus.caption_text[i] for i in after.query_batches("test").query_index.tolist()]
    assert torch.equal(after.query_batches("test").input_ids, compact_dm.query_tokenizer.encode(texts)[0])


# ----------------------------------------------------------------------------- checkpoints

def _tiny_dual_tower(vocab_size: int) -> DualTower:
    return DualTower(vocab_size=vocab_size, feature_dim=8, embed_dim=16, text_layers=1, text_width=16, text_heads=2,
                     text_ffn=32, warmup_steps=1)


def _trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=root, num_sanity_val_steps=0, **kwargs)


def test_checkpoint_restores_the_vocabulary_and_serves_it_to_two_stage(tmp_path, compact_dm):
    """A dual tower fitted for two steps on minilm_compact: its checkpoint carries the vocabulary, a test on
    ``ckpt_path`` restores it (over one built from other training queries), the dense checkpoint's tokenizer
    is that vocabulary, and two-stage rerank needs no re-tokenization on the same vocabulary."""
    L.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(num_items=200, feature_dim=8, batch_size=64, eval_batch_size=100,
                             query_vocab="minilm_compact", compact_vocab_size=512)
    model = _tiny_dual_tower(dm.vocab_size)
    assert model.text_tower.token_embedding.num_embeddings == 512
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "dual.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    payload = checkpoint["SyntheticDataModule"]["query_tokenizer"]
    assert payload == dm.query_tokenizer.to_json()

    other = SyntheticDataModule(num_items=200, feature_dim=8, eval_batch_size=100, query_vocab="minilm_compact",
                                compact_vocab_size=512, captions_per_item=1)
    restored = _tiny_dual_tower(other.vocab_size)
    result = _trainer(tmp_path).test(restored, datamodule=other, ckpt_path=str(path), verbose=False)[0]
    assert other.query_tokenizer.to_json() == payload
    texts = [other.corpus.caption_text[i] for i in other.query_batches("test").query_index.tolist()]
    assert torch.equal(other.query_batches("test").input_ids, dm.query_tokenizer.encode(texts)[0])
    reference = _trainer(tmp_path).test(model, datamodule=other, verbose=False)[0]  # the fitted weights
    assert result["test/recall@10"] == pytest.approx(reference["test/recall@10"])

    # the dense checkpoint's query tokenizer is the stored compact vocabulary
    assert dense_query_tokenizer(path, 512).to_json() == payload
    callback = TwoStageEvaluation(str(path), beam_size=2)
    vocab_size = int(callback.load_dense_model().hparams.vocab_size)
    loaded = callback._dense_checkpoint_tokenizer  # what the callback bridges the batches' queries with
    assert dense_tokenizer_for(dm, loaded, vocab_size) is None, "same vocabulary: the batch ids as they are"
    minilm_dm = SyntheticDataModule(num_items=200, feature_dim=8)
    dense = dense_tokenizer_for(minilm_dm, loaded, vocab_size)
    assert dense is not None and dense.to_json() == payload, "a MiniLM retriever: queries re-tokenized"


def test_grcm_fit_and_test_with_ckpt_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [
        "-c", str(ROOT / "experiments" / "synthetic" / "dual_tower.yaml"),
        "--data.init_args.query_vocab=minilm_compact", "--data.init_args.compact_vocab_size=300",
        "--data.init_args.num_items=40", "--data.init_args.feature_dim=16", "--data.init_args.batch_size=64",
        "--data.init_args.max_val_queries=40",
        "--model.init_args.embed_dim=16", "--model.init_args.text_layers=1", "--model.init_args.text_width=16",
        "--model.init_args.text_heads=2", "--model.init_args.text_ffn=32", "--model.init_args.warmup_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1", "--trainer.default_root_dir=runs/dt",
    ]
    assert grcm("fit", *args, "--trainer.max_epochs=1") == 0
    ckpt = tmp_path / "runs" / "dt" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["vocab_size"] == 300, "the capacity is linked into the model"
    built = SyntheticDataModule(num_items=40, feature_dim=16, query_vocab="minilm_compact", compact_vocab_size=300)
    built.setup()
    assert state["SyntheticDataModule"]["query_tokenizer"] == built.query_tokenizer.to_json()
    assert grcm("test", *args, f"--ckpt_path={ckpt}") == 0
    assert "error" not in capsys.readouterr().err
    # a checkpoint of another capacity is refused with the sizes named
    assert grcm("test", *args, "--data.init_args.compact_vocab_size=301", f"--ckpt_path={ckpt}") == 2
    assert "vocab_size=300" in capsys.readouterr().err


# ----------------------------------------------------------------------------- exact resume

def test_retriever_on_compact_vocabulary_resumes_exactly(tmp_path):
    """A retriever killed mid-epoch and resumed from last.ckpt ends bit-identical to an uninterrupted fit."""
    num_items = 40
    data = SyntheticDataModule(num_items=num_items, feature_dim=16)
    data.setup()
    bundle_dir = save_toy_bundle(data.corpus.item_ids, tmp_path / "bundle", vocab_sizes=[4, 3, 4])

    def fit(root: Path, kill: int | None = None, resume: bool = False):
        L.seed_everything(0, verbose=False)
        dm = SyntheticDataModule(num_items=num_items, feature_dim=16, batch_size=32, eval_batch_size=40,
                                 query_vocab="minilm_compact", compact_vocab_size=256)
        model = GenerativeRetriever(
            bundle_dir=bundle_dir, vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id, d_model=16, num_heads=2,
            num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, beam_size=4, lr=3e-3, dropout=0.1,
            warmup_epochs=0.5,
        )
        callbacks = [ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=kill or 100, save_last=True)]
        trainer = _trainer(root, max_epochs=2, callbacks=callbacks + ([KillAt(kill)] if kill else []),
                           limit_val_batches=0)
        if kill:
            with pytest.raises(Killed):
                trainer.fit(model, dm)
            return None
        trainer.fit(model, dm, ckpt_path="last" if resume else None)
        assert trainer.global_step == 14 and dm.query_tokenizer.vocab_size < 256
        return model

    straight = fit(tmp_path / "straight")
    fit(tmp_path / "killed", kill=3)
    resumed = fit(tmp_path / "killed", resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and not [name for name in a if not torch.equal(a[name], b[name])]
