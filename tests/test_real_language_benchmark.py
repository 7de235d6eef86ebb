"""The real-language benchmark's smoke run: every row, and the fused rerank's weight picked on validation."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _benchmark():
    spec = importlib.util.spec_from_file_location("real_language", ROOT / "benchmarks" / "real_language.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_row_and_picks_the_fusion_weight_on_validation(tmp_path):
    if not (SHARED_DATA / "msvd").is_dir():
        pytest.skip(f"real annotation files not available at {SHARED_DATA / 'msvd'}")
    benchmark = _benchmark()
    out = tmp_path / "real.json"
    benchmark.main([
        "--annotation-dir", str(SHARED_DATA), "--datasets", "msvd", "--max-items", "24", "--held-out", "5",
        "--quick", "--work", str(tmp_path / "work"), "--out", str(out),
    ])
    result = json.loads(out.read_text())["datasets"]["msvd"]
    rows = result["rows"]
    # one fused row per reranking dense model: zero-shot MiniLM, and the fine-tuned tower if it beats it
    fused = [name for name in rows if name.startswith("ACE recall + fused rerank by")]
    assert fused and fused[0].startswith("ACE recall + fused rerank by zero-shot MiniLM similarity"), list(rows)
    assert {"zero-shot MiniLM similarity", "dual tower, scratch text tower",
            "ACE recall + rerank by zero-shot MiniLM similarity"} <= set(rows)
    for name in rows:
        assert 0.0 <= rows[name]["metrics"]["test/recall@1"] <= 1.0
        assert result["ratios_vs_best_dense_r1"][name] >= 0.0
    table = out.with_suffix(".md").read_text()
    plain = rows["ACE recall + rerank by zero-shot MiniLM similarity"]["metrics"]
    for name in fused:
        metrics = rows[name]["metrics"]
        by_weight = metrics["val_recall@1_by_weight"]
        assert sorted(map(float, by_weight)) == sorted(benchmark.FUSION_WEIGHTS)
        # the picked weight has the best validation R@1 (ties go to MRR@10, then the smaller weight)
        assert by_weight[str(metrics["fusion_weight"])] == max(by_weight.values())
        assert f"w = {metrics['fusion_weight']}" in name and name in table
        # both two-stage rows rerank the same recalled pool
        assert metrics["test/corpus_fraction_scored"] == plain["test/corpus_fraction_scored"] <= 1.0
