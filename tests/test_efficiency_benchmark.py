"""benchmarks/efficiency.py --quick: the JSON holds the rows the issue asks for (generative beam 5, HNSW at the
target recall and at its default, the CPU model), the dense settings are the sweep's cheapest reaching the target
on the tuning queries, and the lossless CPU option returns the float32 beams."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_scripts import load_benchmark

from grcm.retriever.cpu_inference import available_inference_quantizations

# the ONNX Runtime candidate where its optional packages are installed (pip install -e .[onnx])
ONNX = ["onnx"] if "onnx" in available_inference_quantizations() else []

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _benchmark():
    return load_benchmark("efficiency")


# the sizes of a smaller trained retriever (--small-checkpoint); --quick's own network: d 64, 1 + 1 layers, ffn 128
SMALL_SHAPE = {"d_model": 32, "num_heads": 4, "num_encoder_layers": 2, "num_decoder_layers": 1, "ffn_dim": 48,
               "fusion": "ace"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficiency")
    small = out / "small.ckpt"  # what --small-checkpoint reads of a GenerativeRetriever checkpoint
    torch.save({"hyper_parameters": {**SMALL_SHAPE, "lr": 3e-3}, "state_dict": {}}, small)
    _benchmark().main(["--quick", "--sizes", "1000", "--candidates", "length_buckets", *ONNX, "--queries", "20",
                       "--tuning-queries", "40", "--small-checkpoint", str(small),
                       "--out", str(out / "efficiency.json"), "--plot", str(out / "efficiency.png")])
    return json.loads((out / "efficiency.json").read_text())


def test_quick_run_holds_the_issue_keys(report):
    methods = report["sizes"][-1]["methods"]
    for name in ("generative_beam5", "generative_beam50", "generative_beam5_float32", "faiss_flat",
                 "faiss_hnsw", "faiss_hnsw_default", "faiss_ivf_pq"):
        assert methods[name]["queries_per_cpu_s"] > 0, name
    assert report["machine"]["cpu"] and report["machine"]["logical_cores"] >= 1
    assert report["machine"]["faiss_compile_options"] and "threadpoolctl" in report["machine"]
    assert methods["faiss_hnsw_default"]["search_params"] == {"ef_search": 16}
    assert 0.0 <= methods["faiss_hnsw"]["recall@10_vs_flat"] <= 1.0
    assert methods["generative_beam5"]["label"].endswith("int8 dynamic quantisation")


def test_dense_settings_are_the_cheapest_reaching_the_target_on_tuning_queries(report):
    size = report["sizes"][-1]
    target = report["settings"]["target_recall@10_vs_flat"]
    for row, key, knob in (("faiss_hnsw", "hnsw", "ef_search"), ("faiss_ivf_pq", "ivf_pq", "nprobe")):
        tuning = size["dense_tuning"][key]
        sweep, picked = tuning["sweep"], tuning["picked"]
        assert size["methods"][row]["search_params"][knob] == picked[knob]
        if tuning["reached_target"]:
            assert picked["recall@10_vs_flat"] >= target
            assert all(p["recall@10_vs_flat"] < target for p in sweep if p[knob] < picked[knob])
        else:
            assert picked["recall@10_vs_flat"] == max(p["recall@10_vs_flat"] for p in sweep)
    if not size["dense_tuning"]["ivf_pq"]["reached_target"]:
        assert "faiss_ivf_pq_refine" in size["methods"]


def test_lossless_option_returns_the_float32_beams_and_lossy_rows_say_how_close(report):
    methods = report["sizes"][-1]["methods"]
    for beam in (5, 50):
        for lossless in ("length_buckets", "full", *ONNX):  # beams swapped only among float-rounding ties, if at all
            same = methods[f"generative_beam{beam}_{lossless}"]["same_beams_as_float32"]
            assert same["identical_or_tied_share"] == 1.0 and same["max_abs_score_difference"] < 1e-4
        share = methods[f"generative_beam{beam}"]["same_beams_as_float32"]["identical_top_beam_share"]
        assert 0.0 <= share <= 1.0
    targets = report["targets"]
    assert any(name.startswith("generative_beam5 / faiss_hnsw ") for name in targets)
    assert any(name.startswith("generative_beam5 / faiss_hnsw_default") for name in targets)
    for lossless in ONNX:  # the lossless rows are checked in the targets too
        assert targets[f"generative_beam5_{lossless} returns the float32 beams (up to rounding ties)"]["met"]


def test_small_checkpoint_rows_time_a_network_of_the_checkpoint_sizes(report):
    from grcm.data.query_tokenizer import QueryTokenizer
    from grcm.retriever.model import GenerativeRetrieverModel

    size = report["sizes"][-1]
    quantization = report["settings"]["inference_quantization"]
    for beam in (5, 50):
        row = size["methods"][f"generative_small_beam{beam}"]
        assert row["queries_per_cpu_s"] > 0
        assert "2 + 1 layers, d = 32, ffn 48" in row["label"] and row["label"].startswith(f"generative (beam {beam})")
    small = size["small_model"]
    assert {key: small[key] for key in SMALL_SHAPE} == SMALL_SHAPE and small["inference_quantization"] == quantization
    network = GenerativeRetrieverModel(vocab_size=QueryTokenizer.minilm(max_length=32).vocab_size,
                                       sid_vocab_sizes=size["sids"]["vocab_sizes"], **SMALL_SHAPE)
    assert small["parameters_bytes"] == sum(p.numel() * p.element_size() for p in network.parameters())
    assert small["parameters_bytes"] < size["model_bytes"]["generative_model_parameters"]
    assert size["profile_beam5_ms_per_query_small"]["total"] > 0


def test_small_checkpoint_without_network_sizes_is_refused_with_the_file_named(tmp_path):
    path = tmp_path / "dual_tower.ckpt"
    torch.save({"hyper_parameters": {"embed_dim": 64}, "state_dict": {}}, path)
    with pytest.raises(SystemExit, match="dual_tower.ckpt.*num_encoder_layers"):
        _benchmark().main(["--quick", "--small-checkpoint", str(path)])
