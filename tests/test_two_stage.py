"""Two-stage retrieval: candidate rerank against brute force, and the evaluation callback end to end."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from cpu_trainer import cpu_trainer

from grcm.data.datamodules import SyntheticDataModule
from grcm.decoding import beams_to_items
from grcm.errors import GrcmError
from grcm.metrics import PerQueryMeans, ranks_from_scores
from grcm.rerank.candidate_rerank import count_candidates, full_dense_ranking, rerank_candidates
from grcm.rerank.dual_tower import DualTower
from grcm.rerank.index import DenseIndex, DenseIndexConfig
from grcm.rerank.rerank_store import build_rerank_store, rerank_from_store
from grcm.rerank.two_stage import TwoStageEvaluation
from grcm.retriever.module import GenerativeRetriever
from grcm.tokenizers.bundle import SIDBundle

NUM_ITEMS = 120
FEATURE_DIM = 16
BEAM = 6


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


# --------------------------------------------------------------------------- brute-force references
def brute_force_rerank(queries: np.ndarray, items: np.ndarray, candidates: np.ndarray, k: int):
    """Full (Q, N) score matrix in numpy, non-candidates masked to -inf, ranked by the reference tie-break.

    The ranking is cut at each query's number of distinct candidates and padded with -1 / -inf.
    """
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    allowed = np.zeros_like(scores, dtype=bool)
    for row, cands in enumerate(candidates):
        allowed[row, cands[cands >= 0]] = True
    masked = np.where(allowed, scores, -np.inf)
    ranked = ranks_from_scores(torch.from_numpy(masked), k).numpy()
    counts = allowed.sum(axis=1)
    positions = np.arange(k)[None, :]
    ranked = np.where(positions < counts[:, None], ranked, -1)
    ranked_scores = np.where(ranked >= 0, np.take_along_axis(masked, np.maximum(ranked, 0), axis=1), -np.inf)
    return ranked, ranked_scores


def python_rerank(query: np.ndarray, items: np.ndarray, row: list[int]) -> list[int]:
    """One query, plain Python: distinct candidates sorted by (-score, item index)."""
    distinct = {item for item in row if item >= 0}
    return sorted(distinct, key=lambda item: (-float(np.dot(query, items[item])), item))


def hits(ranked: list[int], gold: int, ks=(1, 5, 10), mrr_k: int = 10) -> dict[str, float]:
    values = {f"recall@{k}": float(gold in ranked[:k]) for k in ks}
    position = ranked.index(gold) if gold in ranked else None
    values[f"mrr@{mrr_k}"] = 1.0 / (position + 1) if position is not None and position < mrr_k else 0.0
    return values


# --------------------------------------------------------------------------- rerank_candidates
def test_rerank_equals_brute_force_with_ties_shared_candidates_padding_and_duplicates():
    rng = np.random.default_rng(0)
    # small integers: every dot product is exact, so ties are real and the tie-break is tested
    items = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    items[7] = items[3]  # identical items: always tied
    items[21] = items[3]
    queries = rng.integers(-2, 3, size=(5, 6)).astype(np.float32)
    candidates = np.array(
        [
            [21, 3, 7, 12, -1, 3, 30, -1],  # tie group {3, 7, 21}, a duplicate, padding in the middle
            [21, 3, 7, 12, -1, 3, 30, -1],  # the same pool as query 0, another query vector
            [5, 5, 5, -1, -1, -1, -1, -1],  # one distinct candidate, repeated
            [-1, -1, -1, -1, -1, -1, -1, -1],  # nothing recalled
            [39, 0, 12, 30, 7, 18, 25, 33],  # shares 12, 30, 7 with queries 0 and 1
        ]
    )
    for k in (1, 4, 10):
        ranked, scores = rerank_candidates(
            torch.from_numpy(queries), torch.from_numpy(candidates), torch.from_numpy(items), k
        )
        expected_ranked, expected_scores = brute_force_rerank(queries, items, candidates, k)
        assert ranked.dtype == torch.long and ranked.shape == (5, k)
        np.testing.assert_array_equal(ranked.numpy(), expected_ranked)
        np.testing.assert_array_equal(scores.numpy(), expected_scores.astype(np.float32))
        for row in range(5):
            reference = python_rerank(queries[row], items, candidates[row].tolist())[:k]
            assert ranked[row, : len(reference)].tolist() == reference
    # the tie group of query 0 comes out in ascending item order wherever it lands
    ranked, _ = rerank_candidates(torch.from_numpy(queries), torch.from_numpy(candidates), torch.from_numpy(items), 8)
    group = [item for item in ranked[0].tolist() if item in (3, 7, 21)]
    assert group == [3, 7, 21]
    assert (ranked[3] == -1).all() and ranked[2].tolist()[:2] == [5, -1]


def test_rerank_random_float_pools_in_chunks_match_brute_force():
    rng = np.random.default_rng(1)
    num_items, num_queries, width, dim = 500, 60, 30, 24
    items = rng.standard_normal((num_items, dim))
    queries = rng.standard_normal((num_queries, dim))
    shared_pool = rng.choice(num_items, size=width)
    candidates = rng.integers(-1, num_items, size=(num_queries, width))
    candidates[::3] = shared_pool  # every third query recalls the same pool
    candidates[1::7, 5:9] = candidates[1::7, :4]  # duplicates inside a row
    expected_ranked, expected_scores = brute_force_rerank(queries, items, candidates, 10)
    for max_gather in (1 << 25, width * dim * 7, 1):  # one chunk, several chunks, one query per chunk
        ranked, scores = rerank_candidates(
            torch.from_numpy(queries), torch.from_numpy(candidates), torch.from_numpy(items), 10, max_gather
        )
        assert scores.dtype == torch.float64
        np.testing.assert_array_equal(ranked.numpy(), expected_ranked)
        np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-12)
    # float32 inputs: same ranking, float32 scores
    ranked32, scores32 = rerank_candidates(
        torch.from_numpy(queries).float(), torch.from_numpy(candidates), torch.from_numpy(items).float(), 10
    )
    assert scores32.dtype == torch.float32
    np.testing.assert_array_equal(ranked32.numpy(), expected_ranked)
    np.testing.assert_allclose(scores32.numpy(), expected_scores, rtol=1e-4, atol=1e-4)


def test_rerank_rejects_bad_inputs():
    queries, items = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="same corpus"):
        rerank_candidates(queries, torch.tensor([[1, 10], [0, -1]]), items, 3)
    with pytest.raises(ValueError, match="same corpus"):
        rerank_candidates(queries, torch.tensor([[1, -2], [0, -1]]), items, 3)
    with pytest.raises(ValueError, match="same dual-tower model"):
        rerank_candidates(torch.randn(2, 5), torch.tensor([[1, 2], [0, -1]]), items, 3)
    with pytest.raises(ValueError, match="one row per query"):
        rerank_candidates(queries, torch.tensor([[1, 2]]), items, 3)
    with pytest.raises(ValueError, match="integer"):
        rerank_candidates(queries, torch.tensor([[1.0, 2.0], [0.0, 1.0]]), items, 3)
    with pytest.raises(ValueError, match="k must be"):
        rerank_candidates(queries, torch.tensor([[1, 2], [0, -1]]), items, 0)
    items[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rerank_candidates(queries, torch.tensor([[1, 3], [0, -1]]), items, 3)


def python_fused_rerank(query, items, row, row_scores, weight) -> list[tuple[int, float]]:
    """One query, plain Python: each distinct candidate's best stage-1 score, fused with its dot product,
    sorted by (-fused score, item index)."""
    best: dict[int, float] = {}
    for item, score in zip(row, row_scores):
        if item >= 0:
            best[item] = max(best.get(item, -np.inf), float(score))
    fused = {item: float(np.dot(query, items[item])) + weight * score for item, score in best.items()}
    return sorted(fused.items(), key=lambda pair: (-pair[1], pair[0]))


@pytest.mark.parametrize("weight", [0.25, 4.0])
def test_fused_rerank_equals_a_python_reference(weight):
    rng = np.random.default_rng(3)
    num_items, num_queries, width, dim = 80, 12, 14, 8
    items = rng.standard_normal((num_items, dim))
    queries = rng.standard_normal((num_queries, dim))
    candidates = rng.integers(-1, num_items, size=(num_queries, width))
    candidates[:, 6:9] = candidates[:, :3]  # items recalled twice, with other scores
    candidates[4] = -1  # nothing recalled
    generative = -rng.exponential(2.0, size=(num_queries, width))
    generative[candidates < 0] = -np.inf
    store = build_rerank_store(items.astype(np.float32))
    for max_gather in (1 << 25, width * dim * 3):
        ranked, scores = rerank_candidates(
            torch.from_numpy(queries), torch.from_numpy(candidates), torch.from_numpy(items), 10, max_gather,
            torch.from_numpy(generative), weight,
        )
        for row in range(num_queries):
            reference = python_fused_rerank(queries[row], items, candidates[row], generative[row], weight)[:10]
            assert ranked[row, : len(reference)].tolist() == [item for item, _ in reference]
            np.testing.assert_allclose(scores[row, : len(reference)].numpy(), [s for _, s in reference], rtol=1e-12)
            assert (ranked[row, len(reference) :] == -1).all()
    # the same over a flat store (float32 vectors)
    from_store, _ = rerank_from_store(
        torch.from_numpy(queries).float(), torch.from_numpy(candidates), store, 10,
        generative_scores=torch.from_numpy(generative).float(), generative_weight=weight,
    )
    exact, _ = rerank_candidates(
        torch.from_numpy(queries).float(), torch.from_numpy(candidates), torch.from_numpy(items).float(), 10,
        generative_scores=torch.from_numpy(generative).float(), generative_weight=weight,
    )
    assert torch.equal(from_store, exact)
    # the fusion moves items: the fused ranking is not the dense one
    dense, _ = rerank_candidates(torch.from_numpy(queries), torch.from_numpy(candidates), torch.from_numpy(items), 10)
    assert not torch.equal(ranked, dense)
    # weight 0 ignores the scores (even -inf ones) and is the dense rerank
    zero, _ = rerank_candidates(
        torch.from_numpy(queries), torch.from_numpy(candidates), torch.from_numpy(items), 10,
        generative_scores=torch.full(candidates.shape, float("-inf"), dtype=torch.float64), generative_weight=0.0,
    )
    assert torch.equal(zero, dense)


def test_fused_rerank_rejects_bad_scores():
    queries, items = torch.randn(2, 4), torch.randn(10, 4)
    candidates = torch.tensor([[1, 2], [0, -1]])
    with pytest.raises(ValueError, match="no generative_scores"):
        rerank_candidates(queries, candidates, items, 3, generative_weight=0.5)
    with pytest.raises(ValueError, match="shaped like candidate_items"):
        rerank_candidates(queries, candidates, items, 3, generative_scores=torch.zeros(2, 3), generative_weight=0.5)
    with pytest.raises(ValueError, match="finite for every candidate"):
        bad = torch.tensor([[-1.0, float("-inf")], [-2.0, float("-inf")]])
        rerank_candidates(queries, candidates, items, 3, generative_scores=bad, generative_weight=0.5)
    ok = torch.tensor([[-1.0, -3.0], [-2.0, float("-inf")]])  # -inf on padding is fine
    ranked, _ = rerank_candidates(queries, candidates, items, 3, generative_scores=ok, generative_weight=0.5)
    assert ranked[1].tolist() == [0, -1, -1]
    for weight in (-0.1, float("nan"), float("inf")):
        with pytest.raises(GrcmError, match="generative_weight"):
            TwoStageEvaluation("dense.ckpt", generative_weight=weight)


# --------------------------------------------------------------------------- rerank_from_store
def _tied_pools():
    rng = np.random.default_rng(0)
    items = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    items[7] = items[3]
    queries = rng.integers(-2, 3, size=(4, 6)).astype(np.float32)
    candidates = np.array(
        [[21, 3, 7, 12, -1, 3, 30, -1], [5, 5, 5, -1, -1, -1, -1, -1], [-1] * 8, [39, 0, 12, 30, 7, 18, 25, 33]]
    )
    return torch.from_numpy(items), torch.from_numpy(queries), torch.from_numpy(candidates)


def test_flat_store_gives_exactly_the_rerank_of_the_embedding_table():
    items, queries, candidates = _tied_pools()
    store = build_rerank_store(items)
    assert store.config.kind == "flat" and not store.on_gpu
    for k in (1, 5, 10):
        expected = rerank_candidates(queries, candidates, items, k)
        got = rerank_from_store(queries, candidates, store, k)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    rng = np.random.default_rng(3)
    items = torch.from_numpy(rng.standard_normal((300, 24)).astype(np.float32))
    queries = torch.from_numpy(rng.standard_normal((50, 24)).astype(np.float32))
    candidates = torch.from_numpy(rng.integers(-1, 300, size=(50, 30)))
    store = build_rerank_store(items, DenseIndexConfig(kind="flat"))
    for chunk in (1 << 25, 30 * 24 * 4):
        expected = rerank_candidates(queries, candidates, items, 10, chunk)
        got = rerank_from_store(queries, candidates, store, 10, chunk)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # a batch that recalled nothing
    ranked, scores = rerank_from_store(queries[:2], torch.full((2, 5), -1), store, 3)
    assert (ranked == -1).all() and torch.isinf(scores).all()


@pytest.mark.parametrize("config", [{"kind": "sq8"}, {"kind": "pq", "pq_m": 6, "pq_bits": 4}, {"kind": "pq"}])
def test_compressed_store_scores_equal_numpy_on_the_reconstructed_vectors(config):
    rng = np.random.default_rng(4)
    items = rng.standard_normal((400, 24)).astype(np.float32)
    queries = rng.standard_normal((40, 24)).astype(np.float32)
    candidates = rng.integers(-1, 400, size=(40, 25))
    candidates[::4] = candidates[0]
    store = build_rerank_store(items, DenseIndexConfig(**config, num_threads=1))
    decoded = store.reconstruct(np.arange(400))
    assert np.abs(decoded - items).max() > 1e-3  # really compressed
    ranked, scores = rerank_from_store(torch.from_numpy(queries), torch.from_numpy(candidates), store, 10)
    expected_ranked, expected_scores = brute_force_rerank(queries, decoded, candidates, 10)
    np.testing.assert_array_equal(ranked.numpy(), expected_ranked)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5, atol=1e-5)


def test_rerank_from_store_and_store_config_reject_bad_inputs():
    items, queries, candidates = _tied_pools()
    store = build_rerank_store(items)
    with pytest.raises(ValueError, match="same corpus"):
        rerank_from_store(queries, torch.tensor([[1, 40]] * 4), store, 3)
    with pytest.raises(ValueError, match="same dual-tower model"):
        rerank_from_store(torch.randn(4, 5), candidates, store, 3)
    with pytest.raises(ValueError, match="integer"):
        rerank_from_store(queries, candidates.float(), store, 3)
    with pytest.raises(GrcmError, match="rerank store is one of"):
        build_rerank_store(items, DenseIndexConfig(kind="hnsw"))
    with pytest.raises(GrcmError, match="rerank store is one of"):
        TwoStageEvaluation("x.ckpt", rerank_store={"kind": "ivf_pq"})
    with pytest.raises(GrcmError, match="beam_size must be >= 1"):
        TwoStageEvaluation("x.ckpt", beam_size=0)
    assert TwoStageEvaluation("x.ckpt", rerank_store={"kind": "pq", "pq_m": 4}).rerank_store_config.pq_m == 4


def test_count_candidates_and_full_dense_ranking():
    counts = count_candidates(torch.tensor([[4, 4, -1, 2], [-1, -1, -1, -1], [0, 1, 2, 3]]))
    assert counts.tolist() == [2, 0, 4]
    queries, items = torch.randn(7, 5), torch.randn(33, 5)
    expected = torch.from_numpy(
        np.argsort(-(queries.double() @ items.double().T).numpy(), axis=1, kind="stable")[:, :6]
    )
    for chunk in (1 << 24, 33 * 2, 1):
        assert torch.equal(full_dense_ranking(queries, items, 6, max_score_elements=chunk), expected)


def test_per_query_means_count_each_query_once():
    metric = PerQueryMeans(["a", "b"])
    metric.update({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0, 4.0])}, torch.tensor([10, 11]))
    # a repeated query (DDP padding) with a different value must not count again
    metric.update({"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([6.0, 9.0])}, torch.tensor([11, 12]))
    result = metric.compute()
    assert result["a"].item() == pytest.approx((1 + 0 + 1) / 3)
    assert result["b"].item() == pytest.approx((2 + 4 + 9) / 3)
    with pytest.raises(ValueError, match="missing"):
        metric.update({"a": torch.tensor([1.0])}, torch.tensor([1]))


# --------------------------------------------------------------------------- the callback
@pytest.fixture(scope="module")
def datamodule() -> SyntheticDataModule:
    dm = SyntheticDataModule(num_items=NUM_ITEMS, feature_dim=FEATURE_DIM, batch_size=32, eval_batch_size=48)
    dm.setup()
    return dm


_trainer = cpu_trainer


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory, datamodule) -> str:
    """A real DualTower checkpoint: a few training steps, saved by the trainer."""
    torch.manual_seed(0)
    model = DualTower(
        vocab_size=datamodule.vocab_size, feature_dim=FEATURE_DIM, embed_dim=16, text_layers=1, text_width=16,
        text_heads=2, text_ffn=32, warmup_steps=1, lr=3e-3,
    )
    root = tmp_path_factory.mktemp("dense")
    trainer = _trainer(root, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    path = root / "dense.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _dense_inputs(dense_checkpoint: str, datamodule) -> tuple[list[np.ndarray], np.ndarray, list[dict]]:
    """Query embeddings per val batch, item embeddings, and the val batches (recomputed independently)."""
    dense = DualTower.load_from_checkpoint(dense_checkpoint, weights_only=True).eval()
    batches = list(datamodule.val_dataloader())
    with torch.no_grad():
        queries = [dense.encode_queries(b["input_ids"], b["attention_mask"]).numpy() for b in batches]
    return queries, dense.encode_corpus(datamodule.corpus.features), batches


def _expected_metrics(queries, items, batches, candidates_per_batch, rerank_items=None) -> dict[str, float]:
    """Mean metrics over all val queries from plain-Python per-query reranking (no torch ranking code).

    ``rerank_items`` (default ``items``) are the vectors the rerank scores, e.g. the decoded
    vectors of a compressed store; the full-dense reference always uses ``items``.
    """
    rerank_items = items if rerank_items is None else rerank_items
    rows: dict[str, list[float]] = {}
    for query_block, batch, candidates in zip(queries, batches, candidates_per_batch):
        for query, gold, row in zip(query_block, batch["gold_items"][:, 0].tolist(), candidates.tolist()):
            reranked = python_rerank(query, rerank_items, row)
            stage1 = list(dict.fromkeys(item for item in row if item >= 0))
            full = sorted(range(len(items)), key=lambda item: (-float(np.dot(query, items[item])), item))
            values = hits(reranked, gold)
            values.update({f"stage1_{k}": v for k, v in hits(stage1, gold).items()})
            values.update({f"full_dense_{k}": v for k, v in hits(full, gold).items()})
            values[f"candidate_recall@{BEAM}"] = float(gold in stage1)
            values["candidates_per_query"] = float(len(stage1))
            values["corpus_fraction_scored"] = len(stage1) / len(items)
            for name, value in values.items():
                rows.setdefault(name, []).append(value)
    return {name: float(np.mean(values)) for name, values in rows.items()}


class FakeRetriever(L.LightningModule):
    """Stands in for a generative retriever: returns fixed pseudo-random candidate pools per query."""

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.num_items = num_items
        self.pools: list[torch.Tensor] = []

    def pool(self, query_index: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        rows = []
        for query, item in zip(query_index.tolist(), gold.tolist()):
            generator = torch.Generator().manual_seed(query // 2)  # pairs of queries share a pool
            row = torch.randint(-1, self.num_items, (15,), generator=generator)
            row[3] = row[1]  # a duplicate
            if query % 3:
                row[(query // 3) % 8] = item  # gold recalled for two thirds of the queries
            rows.append(row)
        return torch.stack(rows)

    def validation_step(self, batch, batch_idx):
        candidates = self.pool(batch["query_index"], batch["gold_items"][:, 0])
        self.pools.append(candidates)
        return {"candidates": candidates, "beam_size": BEAM, "decode_seconds": 0.5}


def test_callback_on_retriever_outputs_matches_independent_computation(tmp_path, datamodule, dense_checkpoint):
    module = FakeRetriever(NUM_ITEMS)
    callback = TwoStageEvaluation(dense_checkpoint, beam_size=BEAM)
    trainer = _trainer(tmp_path, callbacks=[callback])
    logged = trainer.validate(module, datamodule=datamodule, verbose=False)[0]

    queries, items, batches = _dense_inputs(dense_checkpoint, datamodule)
    expected = _expected_metrics(queries, items, batches, module.pools)
    assert 0 < expected["recall@1"] < expected[f"candidate_recall@{BEAM}"] < 1  # a non-trivial case
    for name, value in expected.items():
        assert logged[f"val/two_stage/{name}"] == pytest.approx(value, abs=1e-6), name
    assert logged["val/two_stage/recall@1_vs_full_dense"] == pytest.approx(
        expected["recall@1"] / expected["full_dense_recall@1"], rel=1e-6
    )
    # stage-1 time comes from the outputs: 0.5 s per batch
    num_queries = sum(len(b["query_index"]) for b in batches)
    stage1_ms = 1e3 * 0.5 * len(batches) / num_queries
    assert logged["val/two_stage/stage1_ms_per_query"] == pytest.approx(stage1_ms, rel=1e-6)
    assert logged["val/two_stage/latency_ms_per_query"] > stage1_ms
    assert logged["val/two_stage/queries_per_s"] == pytest.approx(
        1e3 / logged["val/two_stage/latency_ms_per_query"], rel=1e-4
    )
    # a flat store: float32 codes plus a small header; the module has no generative index
    flat_bytes = DenseIndex.build(items).bytes_per_item
    assert items.shape[1] * 4 < flat_bytes < items.shape[1] * 4 + 1
    assert logged["val/two_stage/rerank_store_code_bytes_per_item"] == items.shape[1] * 4
    assert logged["val/two_stage/rerank_store_bytes_per_item"] == pytest.approx(flat_bytes)
    assert logged["val/two_stage/index_bytes_per_item"] == pytest.approx(flat_bytes)
    assert logged["val/two_stage/beam_size"] == BEAM

    mismatched = TwoStageEvaluation(dense_checkpoint, beam_size=BEAM + 1)
    with pytest.raises(GrcmError, match=f"set model.init_args.beam_size={BEAM + 1}"):
        _trainer(tmp_path, callbacks=[mismatched]).validate(module, datamodule=datamodule, verbose=False)


@pytest.mark.parametrize("config", [{"kind": "sq8"}, {"kind": "pq", "pq_m": 4, "pq_bits": 4}])
def test_callback_with_a_compressed_store_matches_independent_computation(
    tmp_path, datamodule, dense_checkpoint, config
):
    module = FakeRetriever(NUM_ITEMS)
    # two stores side by side on the same candidates, each under its own name
    callbacks = [
        TwoStageEvaluation(dense_checkpoint, rerank_store={**config, "num_threads": 1}),
        TwoStageEvaluation(dense_checkpoint, name="two_stage_flat"),
    ]
    logged = _trainer(tmp_path, callbacks=callbacks).validate(module, datamodule=datamodule, verbose=False)[0]

    queries, items, batches = _dense_inputs(dense_checkpoint, datamodule)
    store = DenseIndex.build(items, DenseIndexConfig(**config, num_threads=1, use_gpu=False))
    decoded = store.reconstruct(np.arange(NUM_ITEMS))
    assert np.array_equal(decoded, DenseIndex.build(items, store.config).reconstruct(np.arange(NUM_ITEMS)))
    expected = _expected_metrics(queries, items, batches, module.pools, rerank_items=decoded)
    for name, value in expected.items():
        assert logged[f"val/two_stage/{name}"] == pytest.approx(value, abs=1e-6), name
    for name, value in _expected_metrics(queries, items, batches, module.pools).items():
        assert logged[f"val/two_stage_flat/{name}"] == pytest.approx(value, abs=1e-6), name
    assert logged["val/two_stage/rerank_store_bytes_per_item"] == pytest.approx(store.bytes_per_item)
    code_bytes = items.shape[1] if config["kind"] == "sq8" else 2  # 16 dims x 1 byte; 4 x 4 bits
    assert logged["val/two_stage/rerank_store_code_bytes_per_item"] == code_bytes
    assert logged["val/two_stage/index_bytes_per_item"] < items.shape[1] * 4 / 3


class CountingRetriever(GenerativeRetriever):
    """The generative retriever, counting its decode calls and keeping what its steps return."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decode_calls = 0
        self.step_outputs: list[dict] = []

    def decode(self, *args, **kwargs):
        self.decode_calls += 1
        return super().decode(*args, **kwargs)

    def validation_step(self, batch, batch_idx):
        output = super().validation_step(batch, batch_idx)
        self.step_outputs.append(output)
        return output


class RetrieverWithoutOutputs(CountingRetriever):
    """A retriever whose steps return nothing: the callback has to decode itself."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)


def _retriever(tmp_path, datamodule, retriever_class, beam_size=BEAM):
    index = torch.arange(NUM_ITEMS)
    codes = torch.stack([index % 5, (index // 5) % 4, (index // 20) % 3], dim=1)  # every SID holds 2 items
    bundle = SIDBundle(item_ids=datamodule.corpus.item_ids, codes=codes, vocab_sizes=[5, 4, 3])
    bundle_dir = str(bundle.save(tmp_path / "bundle"))
    torch.manual_seed(0)
    return retriever_class(
        bundle_dir=bundle_dir, vocab_size=datamodule.vocab_size, pad_token_id=datamodule.pad_token_id,
        d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, beam_size=beam_size,
    )


@pytest.mark.parametrize(
    "retriever_class, callback_beam",
    [(CountingRetriever, BEAM), (CountingRetriever, None), (RetrieverWithoutOutputs, BEAM)],
    ids=["decode-once", "beam-from-the-retriever", "module-without-outputs"],
)
def test_callback_with_the_generative_retriever(
    tmp_path, datamodule, dense_checkpoint, retriever_class, callback_beam
):
    retriever = _retriever(tmp_path, datamodule, retriever_class)
    callback = TwoStageEvaluation(dense_checkpoint, beam_size=callback_beam)
    logged = _trainer(tmp_path, callbacks=[callback]).validate(retriever, datamodule=datamodule, verbose=False)[0]

    queries, items, batches = _dense_inputs(dense_checkpoint, datamodule)
    # decode once: the step's own decode serves the callback; only a module without outputs is decoded again
    assert retriever.decode_calls == len(batches) * (2 if retriever_class is RetrieverWithoutOutputs else 1)
    assert logged["val/two_stage/beam_size"] == BEAM
    retriever.eval()
    with torch.no_grad():
        pools = [
            beams_to_items(retriever.decode(b["input_ids"], b["attention_mask"], beam_size=BEAM), retriever.trie)
            for b in batches
        ]
    assert all(((pool >= 0).sum(1) == 2 * BEAM).all() for pool in pools)  # B beams x 2 items per SID
    for output, pool in zip(retriever.step_outputs, pools):  # the step returned the pool of its one decode
        assert output["beam_size"] == BEAM and output["decode_seconds"] > 0
        assert torch.equal(output["candidates"], pool)
    expected = _expected_metrics(queries, items, batches, pools)
    for name, value in expected.items():
        assert logged[f"val/two_stage/{name}"] == pytest.approx(value, abs=1e-6), name
    assert logged["val/two_stage/corpus_fraction_scored"] == pytest.approx(2 * BEAM / NUM_ITEMS)
    # the two-stage index: SID table + trie + the (flat) rerank store
    assert logged["val/two_stage/index_bytes_per_item"] == pytest.approx(
        DenseIndex.build(items).bytes_per_item + retriever.index_bytes_per_item()
    )
    # the pool's generative order is the retriever's own ranking
    for k in (1, 5, 10):
        assert logged[f"val/two_stage/stage1_recall@{k}"] == pytest.approx(logged[f"val/recall@{k}"], abs=1e-6)


def test_callback_fuses_the_retrievers_beam_scores(tmp_path, datamodule, dense_checkpoint):
    """Pure and fused rerank side by side on one decode; the fused metrics equal a plain-Python fusion of the
    dense scores and the beam log-probabilities of an independent decode."""
    retriever = _retriever(tmp_path, datamodule, CountingRetriever)
    weight = 0.5
    callbacks = [
        TwoStageEvaluation(dense_checkpoint),
        TwoStageEvaluation(dense_checkpoint, name="fused", generative_weight=weight),
    ]
    logged = _trainer(tmp_path, callbacks=callbacks).validate(retriever, datamodule=datamodule, verbose=False)[0]
    assert retriever.decode_calls == len(list(datamodule.val_dataloader()))  # still one decode per batch

    queries, items, batches = _dense_inputs(dense_checkpoint, datamodule)
    retriever.eval()
    codes = retriever.sid_codes.tolist()
    fused_hits: dict[str, list[float]] = {}
    with torch.no_grad():
        for query_block, batch, output in zip(queries, batches, retriever.step_outputs):
            beams = retriever.decode(batch["input_ids"], batch["attention_mask"], beam_size=BEAM)
            sequences, beam_scores = beams.sequences.tolist(), beams.scores.tolist()
            for row, (query, gold) in enumerate(zip(query_block, batch["gold_items"][:, 0].tolist())):
                pool, pool_scores = [], []  # expanded independently of the trie: the SID table, item by item
                for sid, score in zip(sequences[row], beam_scores[row]):
                    matching = [item for item, code in enumerate(codes) if code == sid]
                    pool.extend(matching)
                    pool_scores.extend([score] * len(matching))
                recalled = output["candidates"][row]
                assert sorted(pool) == sorted(recalled[recalled >= 0].tolist())
                ranked = [item for item, _ in python_fused_rerank(query, items, pool, pool_scores, weight)]
                for name, value in hits(ranked, gold).items():
                    fused_hits.setdefault(name, []).append(value)
    for name, values in fused_hits.items():
        assert logged[f"val/fused/{name}"] == pytest.approx(float(np.mean(values)), abs=1e-6), name
    assert logged["val/fused/generative_weight"] == weight and logged["val/two_stage/generative_weight"] == 0
    # same pool, same pool metrics; only the order differs
    for name in (f"candidate_recall@{BEAM}", "candidates_per_query", "stage1_recall@1", "full_dense_recall@1"):
        assert logged[f"val/fused/{name}"] == logged[f"val/two_stage/{name}"]

    # a retriever whose steps return no candidate scores cannot be fused: one clear error
    fused = TwoStageEvaluation(dense_checkpoint, beam_size=BEAM, generative_weight=weight)
    with pytest.raises(GrcmError, match="without 'candidate_scores'"):
        _trainer(tmp_path, callbacks=[fused]).validate(FakeRetriever(NUM_ITEMS), datamodule=datamodule, verbose=False)


def test_callback_refuses_a_beam_other_than_the_retrievers(tmp_path, datamodule, dense_checkpoint):
    retriever = _retriever(tmp_path, datamodule, CountingRetriever)
    callback = TwoStageEvaluation(dense_checkpoint, beam_size=BEAM + 2)
    with pytest.raises(GrcmError, match=f"decoded its candidates with beam_size={BEAM}"):
        _trainer(tmp_path, callbacks=[callback]).validate(retriever, datamodule=datamodule, verbose=False)
    assert retriever.decode_calls == 1  # refused at the first batch, without decoding a second time


def test_callback_reports_a_missing_checkpoint(tmp_path, datamodule):
    callback = TwoStageEvaluation(str(tmp_path / "nowhere.ckpt"))
    with pytest.raises(FileNotFoundError, match="dense_checkpoint"):
        _trainer(tmp_path, callbacks=[callback]).validate(FakeRetriever(NUM_ITEMS), datamodule=datamodule)


@pytest.mark.parametrize("query_vocab", ["wordpiece", "minilm_compact"])
def test_callback_retokenizes_queries_for_a_dense_model_of_another_vocabulary(
    tmp_path, datamodule, dense_checkpoint, query_vocab
):
    """A retriever on its own vocabulary (a trained WordPiece, or MiniLM's tokens restricted to the training
    queries with new ids), reranked by the MiniLM-vocabulary dual tower: the callback encodes each query's text
    with the dense model's tokenizer, so the metrics equal those computed on the MiniLM batches of the same
    queries."""
    own = SyntheticDataModule(
        num_items=NUM_ITEMS, feature_dim=FEATURE_DIM, batch_size=32, eval_batch_size=48,
        query_vocab=query_vocab, wordpiece_vocab_size=512, compact_vocab_size=512,
    )
    own.setup()
    assert own.vocab_size != datamodule.vocab_size
    module = FakeRetriever(NUM_ITEMS)
    callback = TwoStageEvaluation(dense_checkpoint, beam_size=BEAM)
    logged = _trainer(tmp_path, callbacks=[callback]).validate(module, datamodule=own, verbose=False)[0]
    assert callback._dense_tokenizer is not None
    assert callback._dense_tokenizer.to_json() == datamodule.query_tokenizer.to_json(), "MiniLM's tokenizer"

    queries, items, batches = _dense_inputs(dense_checkpoint, datamodule)  # MiniLM batches, same queries in order
    own_batches = list(own.val_dataloader())
    assert [b["query_index"].tolist() for b in batches] == [b["query_index"].tolist() for b in own_batches]
    assert not torch.equal(batches[0]["input_ids"][:, :4], own_batches[0]["input_ids"][:, :4])
    expected = _expected_metrics(queries, items, batches, module.pools)
    assert 0 < expected["recall@1"]
    for name, value in expected.items():
        assert logged[f"val/two_stage/{name}"] == pytest.approx(value, abs=1e-6), name

    # a dense model on the same vocabulary as the batches is fed the batch ids as they are
    same = TwoStageEvaluation(dense_checkpoint, beam_size=BEAM)
    _trainer(tmp_path, callbacks=[same]).validate(FakeRetriever(NUM_ITEMS), datamodule=datamodule, verbose=False)
    assert same._dense_tokenizer is None
