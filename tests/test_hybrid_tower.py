"""Hybrid tower (PIG): masking, the generator's loss, query-independent item vectors, FAISS, two-stage."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from grcm.data import SyntheticDataModule
from grcm.metrics import item_level_hits, ranks_from_scores
from grcm.rerank.dense_models import corpus_item_embeddings, load_dense_model
from grcm.rerank.dual_tower import DualTower
from grcm.rerank.hybrid_tower import HybridTower
from grcm.rerank.index import DenseIndex
from grcm.rerank.pseudo_query import HybridItemEncoder, PseudoQueryGenerator, TokenEncoder, pseudo_query_loss
from grcm.rerank.two_stage import TwoStageEvaluation

DIM = 16


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _padded_tokens(lengths: list[int], width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    tokens = torch.randn(len(lengths), width, DIM)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return tokens.masked_fill(~mask[..., None], 0.0), mask


@pytest.mark.parametrize(
    "flags", [{}, {"use_selector": False}, {"use_generator": False}, {"top_k": 8}], ids=["full", "all", "xpool", "k8"]
)
def test_padding_tokens_are_never_attended(flags):
    torch.manual_seed(0)
    encoder = HybridItemEncoder(DIM, embed_dim=12, width=DIM, num_heads=2, **{"top_k": 3, **flags}).eval()
    tokens, mask = _padded_tokens([1, 2, 4, 6])
    embedding, pseudo = encoder(tokens, mask)
    assert embedding.shape == (4, 12)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(4))
    assert (pseudo is None) == (flags.get("use_generator") is False)
    noisy = tokens + 1e3 * torch.randn_like(tokens) * (~mask[..., None])  # only padding changes
    embedding2, pseudo2 = encoder(noisy, mask)
    torch.testing.assert_close(embedding2, embedding, rtol=0, atol=0)
    if pseudo is not None:
        torch.testing.assert_close(pseudo2, pseudo, rtol=0, atol=0)
    # an item alone, trimmed to its real tokens, gets the same vector as inside the padded batch
    alone, _ = encoder(tokens[1:2, :2], mask[1:2, :2])
    torch.testing.assert_close(alone, embedding[1:2], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least one real token"):
        encoder(tokens, torch.zeros_like(mask))


def test_generator_loss_decreases_on_a_toy_case():
    """Pseudo-queries learn to predict a caption vector that is a fixed function of one of the tokens."""
    torch.manual_seed(0)
    tokens, mask = _padded_tokens([2, 3, 4, 5, 6, 3, 4, 5] * 4)
    target = torch.nn.functional.normalize(tokens[:, 0] @ torch.randn(DIM, 12), dim=-1)  # what "captions" say
    token_encoder, generator = TokenEncoder(DIM, 32), PseudoQueryGenerator(32, 12, num_heads=2)
    optimizer = torch.optim.Adam([*token_encoder.parameters(), *generator.parameters()], lr=3e-3)
    losses = []
    for _ in range(60):
        loss = pseudo_query_loss(generator(token_encoder(tokens), mask), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


class LossRecorder(L.Callback):
    """Training losses per epoch."""

    def __init__(self):
        self.epochs: list[list[float]] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.epochs[-1].append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A hybrid tower trained briefly on a tiny token corpus, its trainer, data and checkpoint."""
    torch.manual_seed(0)
    dm = SyntheticDataModule(num_items=120, feature_dim=DIM, batch_size=64, eval_batch_size=50,
                             token_features=True, noise_tokens=2)
    root = tmp_path_factory.mktemp("hybrid")
    model = HybridTower(vocab_size=dm.vocab_size, feature_dim=DIM, embed_dim=DIM, text_layers=1, text_width=DIM,
                        text_heads=2, text_ffn=32, item_width=DIM, item_heads=2, top_k=3, warmup_steps=2, lr=5e-3,
                        eval_item_batch_size=32, index_path=str(root / "items.faiss"))
    losses = LossRecorder()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[losses])
    trainer.fit(model, datamodule=dm)
    assert np.mean(losses.epochs[-1]) < np.mean(losses.epochs[0])  # NCE + generation loss go down
    assert (root / "items.faiss").is_file()  # index_path: the item index is written when fitting ends
    path = root / "hybrid.ckpt"
    trainer.save_checkpoint(path)
    return model.eval(), trainer, dm, str(path)


def test_item_vectors_are_query_independent_and_faiss_is_exact(trained):
    model, trainer, dm, _ = trained
    corpus = dm.corpus
    items = model.encode_corpus(corpus.features, corpus.token_features, corpus.token_lengths)
    model.hparams.eval_item_batch_size = 7  # other item batches, other padding widths: same vectors
    np.testing.assert_allclose(
        model.encode_corpus(corpus.features, corpus.token_features, corpus.token_lengths), items, atol=1e-6
    )
    model.hparams.eval_item_batch_size = 32
    queries = dm.query_batches("test")
    with torch.no_grad():
        q = model.encode_queries(queries.input_ids, queries.attention_mask).numpy()
        q_split = np.concatenate([model.encode_queries(queries.input_ids[i : i + 9], queries.attention_mask[i : i + 9])
                                  .numpy() for i in range(0, len(q), 9)])
    np.testing.assert_allclose(q_split, q, atol=1e-5)
    # FAISS Flat over the stored vectors equals brute force (reference tie-break)
    scores, ranked = DenseIndex.build(items).search(q, 10)
    brute = ranks_from_scores(torch.from_numpy(q.astype(np.float64) @ items.astype(np.float64).T), 10).numpy()
    np.testing.assert_array_equal(ranked, brute)
    # trainer.test: item-level metrics equal an independent computation; index bytes equal the dual tower's
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    expected = {k: v.mean().item() for k, v in item_level_hits(torch.from_numpy(brute), queries.gold_items).items()}
    for key, value in expected.items():
        assert result[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
    assert DIM * 4 <= result["test/index_bytes_per_item"] < DIM * 4 + 1


def test_checkpoint_class_and_two_stage_rerank(trained, tmp_path):
    model, _, dm, path = trained
    loaded = load_dense_model(path)
    assert type(loaded) is HybridTower and loaded.hparams.top_k == 3 and not loaded.training
    items = corpus_item_embeddings(loaded, dm.corpus)
    np.testing.assert_allclose(items, model.encode_corpus(dm.corpus.features, dm.corpus.token_features,
                                                          dm.corpus.token_lengths), atol=1e-6)

    class PoolOfTen(L.LightningModule):
        """Stage 1 stand-in: candidates = the gold item and the next nine items."""

        def validation_step(self, batch, batch_idx):
            start = batch["gold_items"][:, :1]
            return {"candidates": (start + torch.arange(10)) % dm.corpus.num_items, "beam_size": 10}

    callback = TwoStageEvaluation(path, beam_size=10)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback], default_root_dir=tmp_path)
    logged = trainer.validate(PoolOfTen(), datamodule=dm, verbose=False)[0]
    queries = dm.query_batches("val")
    with torch.no_grad():
        q = loaded.encode_queries(queries.input_ids, queries.attention_mask).numpy()
    gold = queries.gold_items[:, 0].numpy()
    pools = (gold[:, None] + np.arange(10)) % dm.corpus.num_items
    best = pools[np.arange(len(gold)), np.argmax(np.einsum("qe,qke->qk", q, items[pools]), axis=1)]
    assert logged["val/two_stage/recall@1"] == pytest.approx(np.mean(best == gold), abs=1e-6)
    assert logged["val/two_stage/candidate_recall@10"] == 1.0
    # a dual-tower checkpoint still loads as a dual tower
    dual = DualTower(vocab_size=dm.vocab_size, feature_dim=DIM, embed_dim=DIM, text_layers=1, text_width=DIM,
                     text_heads=2, text_ffn=32)
    L.Trainer(logger=False).strategy.connect(dual)
    torch.save({"state_dict": dual.state_dict(), "hyper_parameters": dict(dual.hparams),
                "pytorch-lightning_version": L.__version__}, tmp_path / "dual.ckpt")
    assert type(load_dense_model(tmp_path / "dual.ckpt")) is DualTower
