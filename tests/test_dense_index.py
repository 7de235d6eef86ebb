"""FAISS dense index wrapper: exactness against numpy, approximate recall, persistence, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from grcm.rerank.index import (
    DenseIndex,
    DenseIndexConfig,
    auto_nlist,
    auto_pq_m,
    gpu_available,
    sidecar_path,
)

# One FAISS thread: on a small shared machine OpenMP spinning costs more than it gains.
THREADS = {"num_threads": 1}


def numpy_topk(items: np.ndarray, queries: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k with numpy: scores higher-is-better, ties to the lower item index."""
    items64, queries64 = items.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        items64 = items64 / np.linalg.norm(items64, axis=1, keepdims=True)
        queries64 = queries64 / np.linalg.norm(queries64, axis=1, keepdims=True)
    if metric == "l2":
        scores = -((queries64[:, None, :] - items64[None, :, :]) ** 2).sum(-1)
    else:
        scores = queries64 @ items64.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.fixture(scope="module")
def random_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(600, 16)).astype(np.float32), rng.normal(size=(25, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(30, 32)) * 3
    items = centers[rng.integers(30, size=3000)] + rng.normal(size=(3000, 32))
    queries = centers[rng.integers(30, size=80)] + rng.normal(size=(80, 32))
    return items.astype(np.float32), queries.astype(np.float32)


def overlap_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


# ---------------------------------------------------------------- exact search


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_flat_equals_numpy_bruteforce(random_data, metric):
    items, queries = random_data
    index = DenseIndex.build(items, DenseIndexConfig(kind="flat", metric=metric, **THREADS))
    scores, ids = index.search(queries, 10)
    expected_scores, expected_ids = numpy_topk(items, queries, metric, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (25, 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-3)
    assert np.all(np.diff(scores, axis=1) <= 1e-6), "scores must be sorted best first"


def test_flat_with_tied_items_returns_the_exact_scores(random_data):
    # Every item appears three times: FAISS may order tied copies freely, so compare
    # scores and sets rather than positions.
    base, queries = random_data
    items = np.concatenate([base[:100]] * 3)
    index = DenseIndex.build(items, DenseIndexConfig(kind="flat", metric="ip", **THREADS))
    scores, ids = index.search(queries, 9)
    expected_scores, _ = numpy_topk(items, queries, "ip", 9)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)
    exact = queries.astype(np.float64) @ items.astype(np.float64).T
    for row, (row_scores, row_ids) in enumerate(zip(scores, ids)):
        assert len(set(row_ids.tolist())) == 9
        np.testing.assert_allclose(row_scores, exact[row, row_ids], rtol=1e-4, atol=1e-4)
        # The three copies of the best three base items are exactly the returned set.
        best_base = set(np.argsort(-exact[row, :100], kind="stable")[:3].tolist())
        assert {int(i) % 100 for i in row_ids} == best_base


def test_k_larger_than_corpus_pads_with_minus_one(random_data):
    items, queries = random_data
    index = DenseIndex.build(items[:5], DenseIndexConfig(kind="flat", metric="l2", **THREADS))
    scores, ids = index.search(queries[:3], 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert sorted(ids[0, :5].tolist()) == [0, 1, 2, 3, 4]


def test_accepts_torch_tensors_and_float16(random_data):
    items, queries = random_data
    half = items.astype(np.float16)
    index = DenseIndex.build(torch.from_numpy(half), DenseIndexConfig(kind="flat", **THREADS))
    _, ids = index.search(torch.from_numpy(queries), 5)
    _, expected_ids = numpy_topk(half.astype(np.float32), queries, "ip", 5)
    np.testing.assert_array_equal(ids, expected_ids)
    empty_scores, empty_ids = index.search(np.zeros((0, 16), np.float32), 5)
    assert empty_scores.shape == (0, 5) and empty_ids.shape == (0, 5)


# ---------------------------------------------------------------- approximate search


@pytest.mark.parametrize(
    "metric,overrides,threshold",
    [
        ("ip", {"kind": "ivf_flat"}, 0.95),
        ("l2", {"kind": "ivf_flat"}, 0.95),
        ("ip", {"kind": "hnsw"}, 0.95),
        ("cosine", {"kind": "hnsw"}, 0.95),
        ("l2", {"kind": "ivf_pq", "pq_m": 16, "pq_bits": 6}, 0.7),
    ],
)
def test_approximate_indexes_recall_against_flat(clustered_data, metric, overrides, threshold):
    items, queries = clustered_data
    _, exact = DenseIndex.build(items, DenseIndexConfig(kind="flat", metric=metric, **THREADS)).search(
        queries, 10
    )
    index = DenseIndex.build(items, DenseIndexConfig(metric=metric, **overrides, **THREADS))
    _, approx = index.search(queries, 10)
    assert overlap_at_k(approx, exact) >= threshold


def test_ivf_visiting_every_cell_is_exact(clustered_data):
    items, queries = clustered_data
    flat_scores, flat_ids = DenseIndex.build(items, DenseIndexConfig(kind="flat", **THREADS)).search(
        queries, 10
    )
    index = DenseIndex.build(items, DenseIndexConfig(kind="ivf_flat", nprobe=1, **THREADS))
    assert index.config.nlist == auto_nlist(3000) and 3000 / index.config.nlist >= 39
    _, one_cell = index.search(queries, 10)
    index.set_search_params(nprobe=index.config.nlist)
    scores, ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, flat_ids)
    np.testing.assert_allclose(scores, flat_scores, rtol=1e-5, atol=1e-4)
    assert overlap_at_k(one_cell, flat_ids) < 1.0  # nprobe really changed the search


def test_auto_sizes():
    assert auto_nlist(2000) == 51 and auto_nlist(10) == 1 and auto_nlist(1_000_000) == 4000
    assert auto_pq_m(256) == 64 and auto_pq_m(32) == 8 and auto_pq_m(1024) == 64 and auto_pq_m(12) == 3


# ---------------------------------------------------------------- persistence and size


@pytest.mark.parametrize(
    "overrides",
    [
        {"kind": "flat", "metric": "cosine"},
        {"kind": "ivf_flat", "nlist": 8, "nprobe": 2},
        {"kind": "ivf_pq", "nlist": 4, "pq_m": 8, "pq_bits": 5, "train_size": 400},
        {"kind": "hnsw", "hnsw_m": 8, "ef_search": 16, "metric": "l2"},
        {"kind": "sq8"},
        {"kind": "pq", "pq_m": 4, "pq_bits": 4},
    ],
)
def test_save_load_round_trip(tmp_path, random_data, overrides):
    items, queries = random_data
    index = DenseIndex.build(items, DenseIndexConfig(**overrides, **THREADS))
    scores, ids = index.search(queries, 7)
    path = index.save(tmp_path / "items.faiss")
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["num_items"] == 600 and meta["dim"] == 16 and meta["config"]["kind"] == overrides["kind"]
    assert meta["index_file_bytes"] == path.stat().st_size == index.nbytes()
    loaded = DenseIndex.load(path, expected_dim=16)
    assert loaded.config == index.config and len(loaded) == 600
    loaded_scores, loaded_ids = loaded.search(queries, 7)
    np.testing.assert_array_equal(loaded_ids, ids)
    np.testing.assert_array_equal(loaded_scores, scores)
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files are left behind"


def test_pq_is_smaller_than_flat(clustered_data):
    items, _ = clustered_data
    flat = DenseIndex.build(items, DenseIndexConfig(kind="flat", **THREADS))
    pq = DenseIndex.build(items, DenseIndexConfig(kind="ivf_pq", pq_m=8, pq_bits=6, **THREADS))
    assert flat.bytes_per_item == pytest.approx(4 * 32, rel=0.01)
    assert pq.bytes_per_item < flat.bytes_per_item / 3


def test_reconstruct_of_flat_and_ivf_flat_gives_the_features(random_data):
    items, _ = random_data
    ids = np.array([5, 0, 599, 5])
    for overrides in ({"kind": "flat"}, {"kind": "ivf_flat", "nlist": 4}, {"kind": "hnsw", "hnsw_m": 8}):
        index = DenseIndex.build(items, DenseIndexConfig(**overrides, **THREADS))
        np.testing.assert_array_equal(index.reconstruct(ids), items[ids])
        np.testing.assert_array_equal(index.reconstruct(torch.from_numpy(ids)), items[ids])
        assert index.code_bytes_per_item == 4 * 16 + (1 if overrides["kind"] == "ivf_flat" else 0)
    assert index.reconstruct(np.zeros(0, np.int64)).shape == (0, 16)
    with pytest.raises(ValueError, match=r"span \[-1, 5\]"):
        index.reconstruct(np.array([5, -1]))
    with pytest.raises(ValueError, match="same corpus"):
        index.reconstruct(np.array([600]))


def test_sq8_store_reconstructs_within_one_quantisation_step(random_data):
    items, _ = random_data
    index = DenseIndex.build(items, DenseIndexConfig(kind="sq8", **THREADS))
    decoded = index.reconstruct(np.arange(600))
    step = (items.max(axis=0) - items.min(axis=0)) / 255  # the trained per-dimension range over 255 levels
    assert (np.abs(decoded - items) <= step[None, :]).all()
    assert not np.array_equal(decoded, items)  # really quantised
    assert index.code_bytes_per_item == 16
    assert index.bytes_per_item == pytest.approx(16, abs=0.5)  # codes plus the 2 x 16 float range


def test_pq_store_reconstruct_equals_numpy_decoding_of_its_codes(clustered_data):
    import faiss

    items, _ = clustered_data
    index = DenseIndex.build(items, DenseIndexConfig(kind="pq", pq_m=8, pq_bits=8, **THREADS))
    assert index.config.factory_string() == "PQ8x8" and index.code_bytes_per_item == 8
    pq_index = faiss.downcast_index(index.index)
    centroids = faiss.vector_to_array(pq_index.pq.centroids).reshape(8, 256, 4)  # (M, 2^bits, D / M)
    codes = faiss.vector_to_array(pq_index.codes).reshape(3000, 8)  # one byte per sub-quantiser
    expected = np.concatenate([centroids[m, codes[:, m]] for m in range(8)], axis=1)
    np.testing.assert_array_equal(index.reconstruct(np.arange(3000)), expected)
    # the serialised store is the codes plus the codebooks (8 x 256 x 4 floats) plus a small header
    assert index.bytes_per_item == pytest.approx(8 + 8 * 256 * 4 * 4 / 3000, abs=0.1)
    small = DenseIndex.build(items, DenseIndexConfig(kind="pq", pq_m=16, pq_bits=4, **THREADS))
    assert small.code_bytes_per_item == 8 and small.bytes_per_item < index.bytes_per_item
    assert DenseIndex.build(items, DenseIndexConfig(kind="pq", **THREADS)).config.pq_m == auto_pq_m(32)


# ---------------------------------------------------------------- errors


def test_load_errors(tmp_path, random_data):
    items, _ = random_data
    with pytest.raises(FileNotFoundError, match="no FAISS index"):
        DenseIndex.load(tmp_path / "missing.faiss")
    path = DenseIndex.build(items, DenseIndexConfig(**THREADS)).save(tmp_path / "items.faiss")
    with pytest.raises(ValueError, match="16-d vectors but the features here are 32-d"):
        DenseIndex.load(path, expected_dim=32)
    meta = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps({**meta, "index_file_bytes": 1}))
    with pytest.raises(ValueError, match="different saves"):
        DenseIndex.load(path)
    sidecar_path(path).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        DenseIndex.load(path)
    sidecar_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="json is missing"):
        DenseIndex.load(path)


def test_search_input_errors(random_data):
    items, queries = random_data
    index = DenseIndex.build(items, DenseIndexConfig(**THREADS))
    with pytest.raises(ValueError, match="queries have 8 dimensions"):
        index.search(queries[:, :8], 5)
    bad = queries.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="queries row 3 contains NaN"):
        index.search(bad, 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match="2-D"):
        index.search(queries[0], 5)


def test_build_and_config_errors(random_data):
    items, _ = random_data
    bad = items.copy()
    bad[7, 0] = np.inf
    with pytest.raises(ValueError, match="features row 7 contains NaN or inf"):
        DenseIndex.build(bad, DenseIndexConfig(**THREADS))
    # The same row, found in a sampled training set.
    with pytest.raises(ValueError, match="features row 7 contains NaN or inf"):
        DenseIndex.build(bad, DenseIndexConfig(kind="ivf_flat", nlist=4, train_size=599, **THREADS))
    with pytest.raises(ValueError, match="kind must be one of"):
        DenseIndexConfig(kind="annoy")
    with pytest.raises(ValueError, match="metric must be one of"):
        DenseIndexConfig(metric="dot")
    with pytest.raises(ValueError, match="pq_m=5 must divide"):
        DenseIndex.build(items, DenseIndexConfig(kind="ivf_pq", pq_m=5, **THREADS))
    with pytest.raises(ValueError, match="nlist=1000 IVF cells"):
        DenseIndex.build(items, DenseIndexConfig(kind="ivf_flat", nlist=1000, **THREADS))
    with pytest.raises(ValueError, match="at least 256 training vectors"):
        DenseIndex.build(items[:100], DenseIndexConfig(kind="ivf_pq", nlist=2, **THREADS))
    with pytest.raises(ValueError, match="no GPU HNSW"):
        DenseIndexConfig(kind="hnsw", use_gpu=True)
    with pytest.raises(ValueError, match="no GPU PQ"):
        DenseIndexConfig(kind="pq", use_gpu=True)
    with pytest.raises(ValueError, match="pq with pq_bits=8 needs at least 256"):
        DenseIndex.build(items[:100], DenseIndexConfig(kind="pq", **THREADS))
    with pytest.raises(ValueError, match="at least one row"):
        DenseIndex.build(np.zeros((0, 16), np.float32))


@pytest.mark.skipif(gpu_available(), reason="checks the error raised when no GPU is available")
def test_use_gpu_true_without_gpu_fails_clearly(random_data):
    items, _ = random_data
    with pytest.raises(RuntimeError, match="FAISS sees no GPU"):
        DenseIndex.build(items, DenseIndexConfig(use_gpu=True))
    assert not DenseIndex.build(items, DenseIndexConfig(use_gpu="auto", **THREADS)).on_gpu


# ---------------------------------------------------------------- GPU


@pytest.mark.skipif(not gpu_available(), reason="needs faiss-gpu and a CUDA device")
@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "ivf_pq"])
def test_gpu_index_matches_cpu_and_saves_for_cpu(tmp_path, clustered_data, kind):
    items, queries = clustered_data
    overrides = {"kind": kind, "nlist": 16, "nprobe": 16, "pq_m": 8, "seed": 0}
    cpu = DenseIndex.build(items, DenseIndexConfig(use_gpu=False, **overrides))
    gpu = DenseIndex.build(items, DenseIndexConfig(use_gpu=True, **overrides))
    assert gpu.on_gpu and not cpu.on_gpu
    _, cpu_ids = cpu.search(queries, 10)
    _, gpu_ids = gpu.search(queries, 10)
    # IVF cells and PQ codebooks are trained separately on each device, so only flat is exact.
    assert overlap_at_k(gpu_ids, cpu_ids) >= (0.99 if kind != "ivf_pq" else 0.7)
    # The saved GPU index is the same trained index, searched on CPU.
    loaded = DenseIndex.load(gpu.save(tmp_path / "gpu.faiss"), use_gpu=False)
    assert not loaded.on_gpu and loaded.config.nlist == gpu.config.nlist
    assert overlap_at_k(loaded.search(queries, 10)[1], gpu_ids) >= 0.95
