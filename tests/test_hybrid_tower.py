"""Hybrid tower (PIG): its maths against an independent recomputation, masking, the training loss and its
gradients, retrieval after a short fit, query-independent item vectors, FAISS, two-stage."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

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
from grcm.rerank.pseudo_query import HybridItemEncoder, token_generation_loss
from grcm.rerank.two_stage import TwoStageEvaluation

DIM = 16
PIG = {"interaction": "pig", "pseudo_tokens": 3, "interaction_layers": 2}
FLAGS = [{}, {"use_selector": False}, {"use_generator": False}, {"top_k": 8}, PIG, {**PIG, "use_generator": False},
         {**PIG, "use_selector": False, "interaction_layers": 0, "generator_layers": 2}]
FLAG_IDS = ["full", "all", "xpool", "k8", "pig", "pig-slots", "pig-depth0"]
ENCODER_FLAGS = pytest.mark.parametrize("flags", FLAGS, ids=FLAG_IDS)


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _padded_tokens(lengths: list[int], width: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    tokens = torch.randn(len(lengths), width, DIM)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return tokens.masked_fill(~mask[..., None], 0.0), mask


def _encoder(flags: dict) -> HybridItemEncoder:
    torch.manual_seed(0)
    return HybridItemEncoder(DIM, embed_dim=12, width=DIM, num_heads=2, **{"top_k": 3, **flags}).eval()


# -- an independent recomputation of the item tower, one item at a time, from its parameters only ------------
def _linear(layer, x):
    return x @ layer.weight.T + layer.bias


def _layer_norm(layer, x):
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + layer.eps) * layer.weight + layer.bias


def _ffn(seq, x):  # Linear -> GELU (erf) -> Linear
    hidden = _linear(seq[0], x)
    return _linear(seq[2], 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))))


def _attend(attention, queries, tokens, bias=None):
    """``(L, d)`` queries over ``(n, d)`` real tokens (no padding), optional ``(n,)`` logit bias -> ``(L, d)``."""
    heads = attention.num_heads
    q, k, v = _linear(attention.query, queries), _linear(attention.key, tokens), _linear(attention.value, tokens)
    size = q.shape[-1] // heads
    outputs = []
    for h in range(heads):
        part = slice(h * size, (h + 1) * size)
        logits = q[:, part] @ k[:, part].T / math.sqrt(size) + (0 if bias is None else bias[None, :])
        weights = torch.exp(logits - logits.max(-1, keepdim=True).values)
        outputs.append(weights / weights.sum(-1, keepdim=True) @ v[:, part])
    return _linear(attention.out, torch.cat(outputs, dim=-1))


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _block(block, x, kv, bias=None):
    """A pre-norm attention block on one item: ``(L, d)`` queries over ``(n, d)`` real keys/values."""
    x = x + _attend(block.attention, _layer_norm(block.norm, x), _layer_norm(block.kv_norm, kv), bias)
    return x + _ffn(block.ffn, _layer_norm(block.ffn_norm, x))


def _reference_item(encoder: HybridItemEncoder, tokens: torch.Tensor):
    """One item's ``(n, D)`` real tokens -> its ``(E,)`` embedding and pseudo-query (or None): ``(E,)``, or
    ``(L, E)`` pseudo-query tokens with ``interaction="pig"``."""
    te = encoder.token_encoder
    hidden = _linear(te.input, tokens)
    hidden = hidden + _ffn(te.mlp[1:], _layer_norm(te.mlp[0], hidden))  # LayerNorm, Linear, GELU, Linear
    pseudo = None
    chosen, bias = hidden, None
    if encoder.selector is not None:
        sel = encoder.selector
        logits = _linear(sel.key, hidden) @ _linear(sel.query, hidden.mean(0)) / math.sqrt(hidden.shape[-1])
        log_attention = logits - torch.logsumexp(logits, 0)
        keep = torch.topk(log_attention, min(sel.top_k, len(hidden))).indices
        chosen, bias = hidden[keep], log_attention[keep]
    if encoder.interaction == "pig":
        if encoder.generator is None:
            slots = encoder.learned_query[0]
        else:
            slots = encoder.generator.slots[0]
            for block in encoder.generator.blocks:
                slots = _block(block, slots, chosen, bias)
            pseudo = _linear(encoder.generator.projection, slots)  # (L, E)
        for layer in encoder.interactions:
            hidden = _block(layer.items_read_pseudo, hidden, slots)
            slots = _block(layer.pseudo_reads_items, slots, hidden)
        query = slots.mean(0)
    elif encoder.generator is not None:
        gen = encoder.generator
        g = gen.query[0] + _attend(gen.attention, gen.query[0], chosen, bias)
        g = g + _ffn(gen.ffn, _layer_norm(gen.norm, g))
        pseudo = _unit(_linear(gen.projection, g))[0]
        query = pseudo
    else:
        query = encoder.learned_query[0]
    pool = encoder.pooling
    pooled = _attend(pool.attention, _linear(pool.query_projection, query)[None, :], hidden)
    pooled = pooled + _ffn(pool.ffn, _layer_norm(pool.norm, pooled))
    return _unit(_linear(pool.projection, _layer_norm(pool.final_norm, pooled)))[0], pseudo


@ENCODER_FLAGS
def test_item_encoder_equals_an_independent_recomputation(flags):
    """Embeddings and pseudo-queries of a padded batch equal a per-item recomputation on the real tokens only;
    without the generator every item is pooled by the one learned query (no generator, no selector)."""
    encoder = _encoder(flags)
    tokens, mask = _padded_tokens([1, 2, 3, 4, 6])
    with torch.no_grad():
        embedding, pseudo = encoder(tokens, mask)
        for b, length in enumerate(mask.sum(1).tolist()):
            ref_embedding, ref_pseudo = _reference_item(encoder, tokens[b, :length])
            torch.testing.assert_close(embedding[b], ref_embedding, atol=2e-5, rtol=0)
            if ref_pseudo is None:
                assert pseudo is None
            else:
                torch.testing.assert_close(pseudo[b], ref_pseudo, atol=2e-5, rtol=0)


@ENCODER_FLAGS
def test_item_embedding_depends_on_its_own_tokens_as_a_set(flags):
    """New token values for one item move that item's vector only; reordering its real tokens moves nothing;
    swapping two items' tokens swaps their vectors."""
    encoder = _encoder(flags)
    tokens, mask = _padded_tokens([2, 3, 4, 6, 5])
    with torch.no_grad():
        embedding, _ = encoder(tokens, mask)
        changed = tokens.clone()
        changed[2, :4] = torch.randn(4, DIM)
        moved, _ = encoder(changed, mask)
        assert (moved[2] - embedding[2]).norm() > 1e-2
        torch.testing.assert_close(moved[[0, 1, 3, 4]], embedding[[0, 1, 3, 4]], atol=1e-6, rtol=0)
        reordered = tokens.clone()
        reordered[3] = tokens[3, torch.tensor([4, 1, 5, 0, 3, 2])]
        reordered[4, :5] = tokens[4, torch.tensor([2, 4, 0, 3, 1])]
        torch.testing.assert_close(encoder(reordered, mask)[0], embedding, atol=1e-5, rtol=0)
        swapped_tokens, swapped_mask = tokens[[0, 1, 2, 4, 3]], mask[[0, 1, 2, 4, 3]]
        torch.testing.assert_close(encoder(swapped_tokens, swapped_mask)[0], embedding[[0, 1, 2, 4, 3]],
                                   atol=1e-6, rtol=0)


@ENCODER_FLAGS
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



@pytest.fixture(scope="module")
def data():
    """A tiny synthetic corpus with token features (items have 4 to 6 real tokens)."""
    torch.manual_seed(0)
    return SyntheticDataModule(num_items=120, feature_dim=DIM, batch_size=64, eval_batch_size=50,
                               token_features=True, noise_tokens=2)


def _small_tower(dm, **kwargs) -> HybridTower:
    torch.manual_seed(0)
    return HybridTower(vocab_size=dm.vocab_size, feature_dim=DIM, embed_dim=DIM, text_layers=1, text_width=DIM,
                       text_heads=2, text_ffn=32, item_width=DIM, item_heads=2, top_k=3, dropout=0.0, **kwargs)


def _reference_nce(queries, row_vectors, items, scale) -> torch.Tensor:
    """Symmetric InfoNCE, by hand: ``(B, E)`` queries, ``(B, E)`` each row's item vector, ``items`` ids."""
    distinct = sorted(set(items))
    item_vectors = torch.stack([row_vectors[items.index(u)] for u in distinct])  # (U, E)
    scores = scale * queries @ item_vectors.T  # (B, U)
    column = torch.tensor([distinct.index(i) for i in items])
    query_to_item = (torch.logsumexp(scores, 1) - scores[torch.arange(len(items)), column]).mean()
    item_to_query = torch.stack([
        torch.logsumexp(scores[:, u], 0) - torch.logsumexp(scores[column == u, u], 0) for u in range(len(distinct))
    ]).mean()
    return 0.5 * (query_to_item + item_to_query)


def _caption_token_embeddings(model: HybridTower, input_ids, attention_mask) -> list[torch.Tensor]:
    """Each caption alone, trimmed to its real tokens (no padding, no padding mask), through the scratch text
    tower's layers -> a list of ``(n, E)`` projected token states (the token-level generation target)."""
    tower, out = model.text_tower, []
    for ids, mask in zip(input_ids, attention_mask):
        n = int(mask.sum())
        assert mask[:n].all(), "captions are right-padded"
        hidden = tower.token_embedding(ids[None, :n]) + tower.position_embedding(torch.arange(n))[None]
        out.append(_linear(tower.projection, tower.final_norm(tower.encoder(hidden)))[0])
    return out


def _chamfer(pseudo: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """``(L, E)`` pseudo-query tokens vs ``(n, E)`` caption tokens: mean of (coverage, precision), 2 - 2 cos."""
    cos = _unit(caption) @ _unit(pseudo).T  # (n, L)
    return 0.5 * ((2 - 2 * cos.max(1).values).mean() + (2 - 2 * cos.max(0).values).mean())


def _reference_loss(model: HybridTower, dm, batch) -> torch.Tensor:
    """Symmetric InfoNCE over the batch's distinct items + the generation terms, with every item encoded alone
    from its real tokens and every caption alone from its real tokens; every generation target detached.
    "pooling": generation_weight * mean |pseudo - query|^2. "pig": generation_weight * the Chamfer distance
    to the caption's token embeddings (or |mean-pseudo-token direction - query|^2 for the sentence target),
    plus generation_contrastive * InfoNCE(query, mean-pseudo-token direction) at the detached scale."""
    corpus, items, hp = dm.corpus, batch["item_index"].tolist(), model.hparams
    queries = model.encode_queries(batch["input_ids"], batch["attention_mask"])
    alone = [torch.tensor(corpus.token_features[i, : corpus.token_lengths[i]], dtype=torch.float32) for i in items]
    encoded = [model.item_tower(t[None], torch.ones(1, len(t), dtype=torch.bool)) for t in alone]
    scale = model.log_logit_scale.exp().clamp(max=100.0)
    loss = _reference_nce(queries, torch.stack([e[0][0] for e in encoded]), items, scale)
    if model.item_tower.generator is None:
        return loss
    pseudo = [e[1][0] for e in encoded]
    if hp.interaction == "pooling":
        sentence = torch.stack(pseudo)
        generation = (sentence - queries.detach()).pow(2).sum(-1).mean()
    else:
        sentence = torch.stack([_unit(p.mean(0)) for p in pseudo])
        if hp.generation_target == "tokens":
            captions = _caption_token_embeddings(model, batch["input_ids"], batch["attention_mask"])
            generation = torch.stack([_chamfer(p, c.detach()) for p, c in zip(pseudo, captions)]).mean()
        else:
            generation = (sentence - queries.detach()).pow(2).sum(-1).mean()
    loss = loss + hp.generation_weight * generation
    if hp.generation_contrastive > 0:
        loss = loss + hp.generation_contrastive * _reference_nce(queries.detach(), sentence, items, scale.detach())
    return loss


def test_caption_token_target_equals_each_caption_encoded_alone(data):
    """The token-level generation target (one text-tower pass over the padded batch) equals each caption's
    projected token states computed alone from its real tokens; the query embedding of that pass is
    :meth:`encode_queries`' (the normalised mean of the same token embeddings)."""
    model = _small_tower(data, interaction="pig").eval()
    train = data.query_batches("train")
    rows = torch.arange(0, 40, 3)
    ids, mask = train.input_ids[rows], train.attention_mask[rows]
    assert len(set(mask.sum(1).tolist())) > 1  # captions of several lengths: padding is exercised
    with torch.no_grad():
        queries, tokens = model._queries_and_caption_tokens(ids, mask)
        for b, reference in enumerate(_caption_token_embeddings(model, ids, mask)):
            torch.testing.assert_close(tokens[b, : len(reference)], reference, atol=2e-5, rtol=0)
        torch.testing.assert_close(queries, model.encode_queries(ids, mask), atol=2e-6, rtol=0)


def test_token_generation_loss_is_a_chamfer_distance_between_token_sets():
    """Against a per-row loop; zero when the pseudo-query tokens are the caption's tokens (any order, any
    positive scale); the padding of a caption never counts."""
    torch.manual_seed(0)
    pseudo, caption = torch.randn(3, 4, 6), torch.randn(3, 5, 6)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 2, 3])[:, None]
    loss = token_generation_loss(pseudo, caption, mask)
    expected = torch.stack([_chamfer(pseudo[b], caption[b, : int(mask[b].sum())]) for b in range(3)]).mean()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    padded = caption.masked_fill(~mask[..., None], 0.0) + 50 * torch.randn_like(caption) * ~mask[..., None]
    torch.testing.assert_close(token_generation_loss(pseudo, padded, mask), loss, atol=1e-6, rtol=0)
    same = caption[:, [2, 0, 1, 0]] * torch.tensor([1.0, 3.0, 0.5, 2.0])[None, :, None]  # covers tokens 0, 1, 2
    assert float(token_generation_loss(same, caption, torch.arange(5)[None, :] < 3)) == pytest.approx(0, abs=1e-6)
    assert float(token_generation_loss(same, caption, torch.ones(3, 5, dtype=torch.bool))) > 0.1


LOSS_FLAGS = [{"use_generator": True}, {"use_generator": False}, {**PIG}, {**PIG, "generation_target": "sentence"},
              {**PIG, "generation_contrastive": 0.4}, {**PIG, "use_generator": False}]
LOSS_IDS = ["pooling", "xpool", "pig-tokens", "pig-sentence", "pig-contrastive", "pig-slots"]


@pytest.mark.parametrize("flags", LOSS_FLAGS, ids=LOSS_IDS)
def test_training_loss_and_gradients_equal_an_independent_computation(data, flags):
    """The training step's loss and every parameter's gradient equal :func:`_reference_loss`: the generation
    terms train the generator and item tower but never the text tower; without the generator the loss is
    the contrastive term alone, whatever ``generation_weight`` says."""
    model = _small_tower(data, generation_weight=0.7, **flags)
    model._trainer = SimpleNamespace(datamodule=data)
    model.log = lambda *args, **kwargs: None
    train = data.query_batches("train")
    item_of = train.item_index.numpy()
    rows = np.concatenate([np.flatnonzero(item_of == i)[:n] for i, n in [(5, 3), (9, 1), (17, 2), (40, 4), (77, 1)]])
    rows = np.concatenate([rows, np.random.default_rng(0).choice(len(item_of), 8, replace=False)])
    batch = {"item_index": train.item_index[rows], "input_ids": train.input_ids[rows],
             "attention_mask": train.attention_mask[rows]}
    assert len(set(batch["item_index"].tolist())) < len(rows)  # repeated items in the batch

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                               for n, p in model.named_parameters()}

    loss, grads = loss_and_grads(lambda: model.training_step(batch, 0))
    ref_loss, ref_grads = loss_and_grads(lambda: _reference_loss(model, data, batch))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("item_tower.")), "items get no gradient"
    if model.item_tower.generator is not None:  # the pseudo-query is trained (by both terms), not detached
        assert all(grads[n].abs().sum() > 0 for n, _ in model.named_parameters() if ".generator." in n)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A hybrid tower trained briefly on the tiny corpus, a copy of it untrained, its trainer and checkpoint."""
    root = tmp_path_factory.mktemp("hybrid")
    model = _small_tower(data, warmup_steps=2, lr=2e-2, eval_item_batch_size=32, index_path=str(root / "items.faiss"))
    untrained = copy.deepcopy(model).eval()
    trainer = L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                        num_sanity_val_steps=0, limit_val_batches=0)
    threads = torch.get_num_threads()  # module fixtures set up before the function-scoped single_thread
    torch.set_num_threads(1)
    try:
        trainer.fit(model, datamodule=data)
    finally:
        torch.set_num_threads(threads)
    assert (root / "items.faiss").is_file()  # index_path: the item index is written when fitting ends
    path = root / "hybrid.ckpt"
    trainer.save_checkpoint(path)
    return model.eval(), untrained, trainer, data, str(path)


def _recall_at_10(model: HybridTower, dm) -> float:
    """Test-query recall@10 from the model's query and item vectors (one gold item per query here)."""
    corpus, queries = dm.corpus, dm.query_batches("test")
    with torch.no_grad():
        q = model.encode_queries(queries.input_ids, queries.attention_mask).numpy().astype(np.float64)
    items = model.encode_corpus(corpus.features, corpus.token_features, corpus.token_lengths).astype(np.float64)
    gold = queries.gold_items.numpy()
    assert gold.shape[1] == 1
    scores = q @ items.T
    rank = (scores > scores[np.arange(len(q)), gold[:, 0]][:, None]).sum(1)  # items scored above the gold one
    return float(np.mean(rank < 10))


def test_short_fit_retrieves_far_better_than_chance_and_than_untrained(trained):
    model, untrained, _, dm, _ = trained
    chance = 10 / dm.corpus.num_items
    fitted, before = _recall_at_10(model, dm), _recall_at_10(untrained, dm)
    assert before < 2 * chance, before
    assert fitted > 2.5 * chance and fitted > before + 0.1, (fitted, before, chance)


def test_pig_short_fit_learns_and_stores_one_vector_per_item(data, tmp_path):
    """The paper-style tower (pseudo-query tokens, token-level target, two interaction layers) trains end to
    end: retrieval far above chance and above the untrained tower; one ``(E,)`` vector per item, the same
    whatever the item batch; the test run's index stores ``E`` float32 per item, like the dual tower."""
    model = _small_tower(data, warmup_steps=2, lr=5e-3, eval_item_batch_size=32, **PIG)
    untrained = copy.deepcopy(model).eval()
    trainer = L.Trainer(max_epochs=30, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    model.eval()
    chance = 10 / data.corpus.num_items
    fitted, before = _recall_at_10(model, data), _recall_at_10(untrained, data)
    assert fitted > 2.5 * chance and fitted > before + 0.1, (fitted, before, chance)
    corpus = data.corpus
    items = model.encode_corpus(corpus.features, corpus.token_features, corpus.token_lengths)
    assert items.shape == (corpus.num_items, DIM)
    model.hparams.eval_item_batch_size = 7
    np.testing.assert_allclose(model.encode_corpus(corpus.features, corpus.token_features, corpus.token_lengths),
                               items, atol=1e-6)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    assert DIM * 4 <= result["test/index_bytes_per_item"] < DIM * 4 + 1


def test_item_vectors_are_query_independent_and_faiss_is_exact(trained):
    model, _, trainer, dm, _ = trained
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
    model, _, _, dm, path = trained
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


def test_the_recommended_pig_config_is_the_measured_arm(capsys):
    """``hybrid_tower_pig_depth0_no_generation_loss.yaml`` (the synthetic study's best row, what a user runs) is
    ``hybrid_tower_pig.yaml`` with exactly the benchmark arm's two flags changed: no interaction stack and no
    generation loss; the corpus, trainer and everything else are the same."""
    from pathlib import Path

    import yaml

    from grcm.cli import main

    experiments = Path(__file__).resolve().parents[1] / "experiments" / "synthetic"
    printed = {}
    for name in ("hybrid_tower_pig", "hybrid_tower_pig_depth0_no_generation_loss"):
        with pytest.raises(SystemExit):
            main(["fit", "-c", str(experiments / f"{name}.yaml"), "--print_config"])
        printed[name] = yaml.safe_load(capsys.readouterr().out)
    base, best = printed["hybrid_tower_pig"], printed["hybrid_tower_pig_depth0_no_generation_loss"]
    changed = {k: v for k, v in best["model"]["init_args"].items() if base["model"]["init_args"][k] != v}
    assert changed == {"interaction_layers": 0, "generation_weight": 0.0}
    assert best["model"]["init_args"]["interaction"] == "pig" and best["model"]["init_args"]["use_generator"]
    assert best["data"] == base["data"] and best["data"]["init_args"]["token_features"]
    assert best["trainer"]["default_root_dir"] == "runs/synthetic/hybrid_tower_pig_depth0_no_generation_loss"
    assert {k: v for k, v in best["trainer"].items() if k not in ("default_root_dir", "logger", "callbacks")} == {
        k: v for k, v in base["trainer"].items() if k not in ("default_root_dir", "logger", "callbacks")}
