"""``grcm demo`` end to end on tiny copies of its stage configs.

The demo (``make demo``) runs every stage config of experiments/synthetic through GrcmCLI and adds
evaluation-only rows; nothing else in the suite runs it, so a config or stage change could break it
unnoticed. Here each of its five configs is read from experiments/synthetic, shrunk (80 items, small
widths, the shortest schedules) and written under the same file name into a temporary experiments
folder; the demo runs on that folder exactly as ``grcm demo --experiments <folder>`` would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import yaml

from grcm import demo
from grcm.retriever.phases import build_schedule

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "experiments" / "synthetic"

#: The corpus every stage shares (the rerankers score the retrievers' candidates, so it must be one corpus).
#: 80 items are enough for the PQ rerank store (pq_bits=4: 16 centroids per sub-quantiser need >= 16 training
#: vectors; FAISS warns below 39 per centroid but trains).
DATA = {"num_items": 80, "feature_dim": 32, "eval_batch_size": 80}
#: Tiny sizes per config: ``model``/``data`` init_args and ``trainer`` settings merged into the real config.
TINY: dict[str, dict[str, dict]] = {
    "dual_tower.yaml": {
        # embed_dim stays a multiple of 128: the demo's PQ rerank store has 128 sub-quantisers
        "model": {"embed_dim": 128, "text_width": 16, "text_layers": 1, "text_ffn": 32, "warmup_steps": 2},
        "data": {"batch_size": 32, "max_val_queries": 16},
        "trainer": {"max_epochs": 1},
    },
    "ace_tokenizer.yaml": {
        "model": {"coarse_codebook_size": 4, "codebook_size": 4, "latent_dim": 8, "hidden_dims": [16],
                  "kmeans_iters": 5, "warmup_epochs": 1},
        "data": {"batch_size": 40},
        "trainer": {"max_epochs": 2},
    },
    "ace_retriever.yaml": {
        "model": {"d_model": 16, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "ffn_dim": 32,
                  "restart_period": 1},
        "data": {"batch_size": 64, "max_val_queries": 16, "wordpiece_vocab_size": 128},
        "trainer": {"max_epochs": 1, "check_val_every_n_epoch": 1},
    },
    "grdr.yaml": {
        # the shortest schedule: one `main` phase per level (it initialises that level's codebook)
        "model": {"codebook_size": 8, "d_model": 16, "tokenizer_hidden": 32, "num_heads": 2,
                  "num_encoder_layers": 1, "num_decoder_layers": 1, "ffn_dim": 32,
                  "pretrain_epochs": 0, "main_epochs": 1, "fit_epochs": 0},
        "data": {"batch_size": 64, "max_val_queries": 16},
        "trainer": {},  # max_epochs / check_val_every_n_epoch: the schedule's length, set below
    },
    "hybrid_tower.yaml": {
        "model": {"embed_dim": 128, "text_width": 16, "text_layers": 1, "text_ffn": 32, "item_width": 16,
                  "item_heads": 2, "warmup_steps": 2},
        "data": {"batch_size": 32, "max_val_queries": 16},
        "trainer": {"max_epochs": 1},
    },
}


def tiny_config(name: str) -> dict:
    """experiments/synthetic/<name> with :data:`TINY`'s sizes."""
    config = yaml.safe_load((SYNTHETIC / name).read_text())
    tiny = TINY[name]
    config["model"]["init_args"].update(tiny["model"])
    config["data"]["init_args"].update({**DATA, **tiny["data"]})
    config["trainer"].update(tiny["trainer"], enable_progress_bar=False, enable_model_summary=False,
                             log_every_n_steps=1)
    if name == "grdr.yaml":
        args = config["model"]["init_args"]
        phases = build_schedule(args["num_levels"], args["schedule"], args["pretrain_epochs"], args["main_epochs"],
                                args["fit_epochs"])
        assert [phase.name for phase in phases] == ["main"] * args["num_levels"]
        config["trainer"].update(max_epochs=phases[-1].end, check_val_every_n_epoch=phases[-1].end)
    return config


def dual_tower_metrics(config: dict, checkpoint: str) -> dict[str, float]:
    """Recall@1/5/10 and MRR@10 of the dual tower's checkpoint on the test split, from its embeddings with
    plain numpy: item level, exact inner product over the whole corpus, ties broken by the lower item index."""
    from grcm.data.datamodules import SyntheticDataModule
    from grcm.rerank.dual_tower import DualTower

    model = DualTower.load_from_checkpoint(checkpoint, weights_only=True, map_location="cpu").eval()
    datamodule = SyntheticDataModule(**config["data"]["init_args"])
    datamodule.setup("test")
    test = datamodule.query_batches("test")
    with torch.no_grad():
        queries = model.encode_queries(test.input_ids, test.attention_mask).float().numpy()
    items = model.encode_corpus(np.asarray(datamodule.corpus.features, dtype=np.float32))
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    ranked = np.argsort(-scores, axis=1, kind="stable")  # stable: equal scores keep ascending item order
    gold = test.gold_items.numpy()
    ranks = np.array([  # 1-based rank of the first gold item (every item is ranked)
        1 + min(int(np.flatnonzero(ranked[q] == item)[0]) for item in gold[q][gold[q] >= 0]) for q in range(len(ranked))
    ])
    metrics = {f"test/recall@{k}": float(np.mean(ranks <= k)) for k in (1, 5, 10)}
    metrics["test/mrr@10"] = float(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0)))
    return metrics


def test_demo_runs_every_stage_on_tiny_configs(tmp_path, capsys, monkeypatch, single_thread):
    monkeypatch.setenv("GRCM_CACHE_DIR", str(tmp_path / "cache"))
    experiments, out = tmp_path / "experiments", tmp_path / "demo"
    experiments.mkdir()
    configs = {stage.config for stage in demo.STAGES}
    assert configs == set(TINY), "a demo stage reads a config this test does not shrink"
    tiny = {name: tiny_config(name) for name in configs}
    for name, config in tiny.items():
        (experiments / name).write_text(yaml.safe_dump(config, sort_keys=False))

    demo.main(["--experiments", str(experiments), "--out", str(out)])

    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows = [stage.name for stage in demo.STAGES if stage.test]
    assert sorted(results["rows"]) == sorted(rows)  # results.json is written with sorted keys
    for name in rows:
        metrics = results["rows"][name]
        for key in ("test/recall@1", "test/recall@5", "test/recall@10"):
            assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0, (name, key, metrics.get(key))
        assert metrics["test/recall@1"] <= metrics["test/recall@5"] <= metrics["test/recall@10"], name
        assert 0.0 <= metrics["test/mrr@10"] <= 1.0, name
    two_stage = [stage.name for stage in demo.STAGES if stage.two_stage]
    assert len(two_stage) == 4
    for name in two_stage:
        assert 0.0 < results["rows"][name]["test/corpus_fraction_scored"] <= 1.0, name
    # the PQ rerank store against the float32 one of the same retriever and reranker
    pq = next(stage for stage in demo.STAGES if stage.rerank_store.get("kind") == "pq")
    flat = next(stage for stage in demo.STAGES if stage.two_stage and not stage.rerank_store
                and (stage.test_from, stage.reranker) == (pq.test_from, pq.reranker))
    bytes_per_item = {stage.name: results["rows"][stage.name]["test/index_bytes_per_item"] for stage in (pq, flat)}
    assert bytes_per_item[pq.name] < bytes_per_item[flat.name], bytes_per_item
    assert set(results["stage_seconds"]) == {stage.name for stage in demo.STAGES}
    assert all(seconds >= 0 for seconds in results["stage_seconds"].values())

    # the table: a header, a rule, then one line per row, in order
    summary = printed.rsplit("grcm demo: synthetic corpus, test split", 1)[1]
    table = summary.split("\n\n")[1].splitlines()
    assert table[0].startswith("method") and set(table[1]) <= {"-", "+"}
    assert len(table) == 2 + len(rows)
    assert [line.split(" | ")[0].strip() for line in table[2:]] == rows

    # an independent recomputation of one row: the dual tower's metrics from its best checkpoint
    checkpoint = out / "dual_tower" / "checkpoints" / "best.ckpt"
    expected = dual_tower_metrics(tiny["dual_tower.yaml"], str(checkpoint))
    assert expected["test/recall@10"] > 0  # a comparison of all-zero rows would prove nothing
    for key, value in expected.items():
        assert abs(results["rows"][demo.DENSE][key] - value) <= 1e-6, (key, results["rows"][demo.DENSE][key], value)

