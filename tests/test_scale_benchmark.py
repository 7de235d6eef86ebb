"""benchmarks/scale.py's quick mode (rows, resume), the codebook sizing rule and the 1B bytes table."""

import json

import numpy as np
import pytest
from benchmark_scripts import load_benchmark

from grcm.rerank.fusion_weight import FUSION_WEIGHTS
from grcm.tokenizers.sizing import fine_codebook_size, sid_vocab_sizes


def test_quick_run_writes_every_row_and_resumes_at_the_first_missing_one(tmp_path, monkeypatch):
    import grcm.demo

    scale = load_benchmark("scale")
    argv = ["--quick", "--sizes", "300", "--test-queries", "40", "--val-queries", "40", "--grdr-max-n", "0", "--threads", "2",
            "--root", str(tmp_path)]
    summary = scale.main(argv)
    rows = summary["sizes"]["300"]["rows"]
    expected = {scale.DENSE, scale.HNSW, scale.IVFPQ, scale.ACE, scale.RERANK_FLAT, scale.RERANK_PQ, scale.FUSED}
    assert set(rows) == expected
    for name, row in rows.items():
        assert 0.0 <= row["recall@1"] <= row["recall@10"] <= 1.0, name
        assert row["queries_per_cpu_s"] > 0 and row["index_bytes_per_item"] > 0, name
        assert row["test_queries"] == 40, name  # the fixed test sample, not all 300 test captions
        assert row["train_seconds"] > 0, name
    rerank = rows[scale.RERANK_PQ]
    assert rerank["pool_size"] == pytest.approx(25.0)  # beam 25, one SID per item
    assert rerank["corpus_fraction_scored"] == pytest.approx(25 / 300)
    assert rerank["index_bytes_per_item"] < rows[scale.RERANK_FLAT]["index_bytes_per_item"] / 4
    assert rows[scale.ACE]["candidate_recall"] == rows[scale.RERANK_FLAT]["candidate_recall"]  # one decode
    assert rows[scale.FUSED]["fusion_weight"] in FUSION_WEIGHTS
    assert rows[scale.DENSE]["corpus_fraction_scored"] == 1.0
    assert rows[scale.HNSW]["corpus_fraction_scored"] < 1.0  # FAISS' own count of distances
    assert set(rows[scale.ACE]["train_epochs"]) == {scale.FIT_TOKENIZER, scale.FIT_ACE}
    stage1 = summary["sizes"]["300"]["stage1_comparison"]
    assert stage1["ace_pool_size"] == pytest.approx(25.0) and 0.0 <= stage1["hnsw_top_p_candidate_recall"] <= 1.0
    for name in ("scale.json", "scale.md", "scale.png", "300/results.json"):
        assert (tmp_path / name).is_file(), name

    # a run killed after the PQ rerank row: the fused row and the dense rows are missing
    path = tmp_path / "300" / "results.json"
    before = json.loads(path.read_text())
    for name in (scale.FUSED, scale.DENSE, scale.HNSW, scale.IVFPQ):
        del before["rows"][name]
    path.write_text(json.dumps(before))
    ran: list[str] = []
    real_run_stage = grcm.demo._run_stage

    def spy(stage, *args, **kwargs):
        ran.append(stage.name)
        return real_run_stage(stage, *args, **kwargs)

    real_fit_stage = scale.fit_stage

    def fit_spy(stage, *args, **kwargs):
        ran.append(stage.name)
        return real_fit_stage(stage, *args, **kwargs)

    monkeypatch.setattr(grcm.demo, "_run_stage", spy)
    monkeypatch.setattr(scale, "fit_stage", fit_spy)  # fits run through benchmarks/scale_fit.py
    scale.main(argv)
    after = json.loads(path.read_text())
    assert ran == [scale.FUSED]  # no fit and no finished row again
    assert set(after["rows"]) == expected
    assert after["fits"] == before["fits"]
    assert after["rows"][scale.RERANK_PQ]["recall@1"] == before["rows"][scale.RERANK_PQ]["recall@1"]

    ran.clear()
    scale.main(argv)  # nothing missing: nothing runs
    assert ran == []
    with pytest.raises(SystemExit, match="test queries"):
        scale.main([*argv[:4], "41", *argv[5:]])  # another test sample never mixes into this run's rows


@pytest.mark.parametrize("num_items", [1, 2_000, 50_000, 2_100_000, 10_000_000, 100_000_000, 10**9])
def test_fine_codebooks_give_at_least_one_prefix_per_item_and_keep_the_2k_recipe(num_items):
    coarse, fine = sid_vocab_sizes(num_items)[0], fine_codebook_size(num_items)
    assert coarse == 128 and fine >= 128 and fine & (fine - 1) == 0
    assert coarse * fine**2 >= num_items  # prefixes >= items: the unique token stays small on average
    if fine > 128:  # the smallest power of two that does it
        assert coarse * (fine // 2) ** 2 < num_items
    if num_items <= 128**3:
        assert fine == 128  # every trained corpus here keeps the validated 2k codebooks


def test_fine_codebook_size_rejects_bad_input():
    assert fine_codebook_size(10**8, fine_levels=3) == 128  # 128**4 prefixes already hold 100M items
    assert fine_codebook_size(10**9, fine_levels=3) == 256
    assert fine_codebook_size(10**8, items_per_prefix=4) == 512  # a denser table: fewer codes
    with pytest.raises(ValueError, match="num_items"):
        fine_codebook_size(0)
    with pytest.raises(ValueError, match="items_per_prefix"):
        fine_codebook_size(10, items_per_prefix=0)


def test_sized_random_sids_are_unique_and_within_their_vocabularies():
    decode = load_benchmark("decode_throughput")
    vocab = [4, 8, 16]
    codes = decode.skewed_ace_codes(5_000, seed=1, vocab=vocab, chunk=777)
    assert codes.shape == (5_000, 4)
    for level, size in enumerate(vocab):
        assert 0 <= codes[:, level].min() and codes[:, level].max() < size
    assert len({tuple(row) for row in codes.tolist()}) == 5_000  # the unique token separates shared prefixes
    prefixes = {}
    for row in codes.tolist():
        prefixes.setdefault(tuple(row[:3]), []).append(row[3])
    assert all(sorted(ranks) == list(range(len(ranks))) for ranks in prefixes.values())


def test_projection_table_marks_what_was_measured():
    decode = load_benchmark("decode_throughput")
    runs = [{"num_items": 1_000, "generative_index_bytes_per_item": 12.5, "bytes_per_item": 8.5, "build_s": 0.1,
             "vocab_sizes": [128, 128, 128, 200]}]
    table = decode.projection_table(runs, faiss_items=600, dim=64, seed=0, sizes=(1_000, 10**9))
    by_size = {row["num_items"]: row for row in table["rows"]}
    assert by_size[1_000]["generative"]["bytes_per_item"] == 12.5 and by_size[1_000]["generative"]["measured"]
    projected = by_size[10**9]["generative"]
    assert projected["measured"] is False and "generative" not in by_size[600]  # never projected downwards
    assert projected["vocab_sizes"] == [128, 128, 128, 200 * 10**6]  # the unique token grows with N
    assert projected["bytes_per_item"] == 8.5 + 1 + 1 + 1 + 4  # trie per item + int8 x 3 + int32 SID table
    assert by_size[600]["ivf_pq32"]["measured"] and not by_size[10**9]["ivf_pq32"]["measured"]
    # shared centroids and codebooks spread over more items: fewer bytes per item at 1B than measured
    assert by_size[10**9]["ivf_pq32"]["bytes_per_item"] < by_size[600]["ivf_pq32"]["bytes_per_item"]
    assert by_size[10**9]["hnsw32"]["bytes_per_item"] == pytest.approx(by_size[600]["hnsw32"]["bytes_per_item"])
    assert np.isfinite([row["ivf_pq64"]["bytes_per_item"] for row in table["rows"]]).all()
