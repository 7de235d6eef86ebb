"""Dual-tower baselines: InfoNCE maths, exact search, a short real training run, and the attention-pooling
comparison row of the hybrid tower."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from grcm.cli import main
from grcm.data import SyntheticDataModule
from grcm.metrics import item_level_hits, ranks_from_scores
from grcm.rerank.contrastive import symmetric_info_nce
from grcm.rerank.dual_tower import DualTower


def _reference_info_nce(queries, items, item_index, scale):
    """Loop implementation: distinct items as classes; an item's positives are all its queries."""
    distinct = sorted(set(item_index.tolist()))
    first = {item: item_index.tolist().index(item) for item in distinct}
    item_matrix = torch.stack([items[first[item]] for item in distinct])
    logits = scale * queries @ item_matrix.T
    q2i = sum(
        -F.log_softmax(logits[row], 0)[distinct.index(item)] for row, item in enumerate(item_index.tolist())
    ) / len(queries)
    i2q = 0.0
    for column, item in enumerate(distinct):
        positives = [row for row, it in enumerate(item_index.tolist()) if it == item]
        i2q += torch.logsumexp(logits[:, column], 0) - torch.logsumexp(logits[positives, column], 0)
    return 0.5 * (q2i + i2q / len(distinct))


def test_info_nce_matches_reference_with_repeated_items():
    torch.manual_seed(0)
    queries = F.normalize(torch.randn(9, 6), dim=-1)
    items = F.normalize(torch.randn(9, 6), dim=-1)
    item_index = torch.tensor([4, 2, 4, 7, 2, 4, 1, 9, 3])
    items[2] = items[0]
    items[5] = items[0]
    items[4] = items[1]
    scale = torch.tensor(12.0)
    torch.testing.assert_close(symmetric_info_nce(queries, items, item_index, scale),
                               _reference_info_nce(queries, items, item_index, scale))


def test_training_improves_recall_and_search_is_exact(tmp_path):
    dm = SyntheticDataModule(num_items=150, feature_dim=32, batch_size=64, eval_batch_size=64)
    model = DualTower(vocab_size=dm.vocab_size, feature_dim=dm.feature_dim, embed_dim=32, text_layers=1,
                      text_width=32, text_heads=2, text_ffn=64, warmup_steps=5, lr=3e-3)
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert result["test/recall@10"] > 10 / 150 * 2  # far above chance after training
    assert 0 <= result["test/recall@1"] <= result["test/recall@5"] <= result["test/recall@10"] <= 1
    # exact Flat index: one float32 vector per item plus a small serialisation header
    assert 32 * 4 <= result["test/index_bytes_per_item"] < 32 * 4 + 1
    # independent computation: full score matrix in numpy, reference tie-break, reference metrics
    model.eval()
    queries = dm.query_batches("test")
    with torch.no_grad():
        q = model.encode_queries(queries.input_ids, queries.attention_mask).numpy()
    items = model.encode_corpus(dm.corpus.features)
    ranked = ranks_from_scores(torch.from_numpy(q @ items.T), 10)
    expected = {k: v.mean().item() for k, v in item_level_hits(ranked, queries.gold_items).items()}
    for key, value in expected.items():
        assert abs(result[f"test/{key}"] - value) < 1e-6, key
    # a checkpoint reloads with weights_only=True
    path = tmp_path / "dual.ckpt"
    trainer.save_checkpoint(path)
    reloaded = DualTower.load_from_checkpoint(path, weights_only=True)
    assert np.allclose(reloaded.encode_corpus(dm.corpus.features[:5]), items[:5], atol=1e-6)


def test_attention_pooling_dual_tower_is_the_hybrid_tower_without_its_pseudo_query(capsys):
    """``dual_tower_attention.yaml`` (the comparison row of the hybrid tower) is ``hybrid_tower.yaml`` with the
    generator off, and shares the mean-pooled ``dual_tower.yaml``'s text tower, embedding size, optimiser,
    batch, epochs and exact index (so the same 1,024 bytes per item): only the item side differs."""
    experiments = Path(__file__).resolve().parents[1] / "experiments" / "synthetic"
    printed = {}
    for name in ("dual_tower", "dual_tower_attention", "hybrid_tower"):
        with pytest.raises(SystemExit):
            main(["fit", "-c", str(experiments / f"{name}.yaml"), "--print_config"])
        printed[name] = yaml.safe_load(capsys.readouterr().out)
    attention, hybrid, mean = (printed[n]["model"] for n in ("dual_tower_attention", "hybrid_tower", "dual_tower"))
    assert attention["class_path"] == hybrid["class_path"] == "grcm.rerank.hybrid_tower.HybridTower"
    assert attention["init_args"]["use_generator"] is False and hybrid["init_args"]["use_generator"] is True
    assert {k: v for k, v in attention["init_args"].items() if k != "use_generator"} == {
        k: v for k, v in hybrid["init_args"].items() if k != "use_generator"}
    shared = ("embed_dim", "text_backbone", "text_layers", "text_width", "text_heads", "text_ffn", "dropout", "lr",
              "weight_decay", "warmup_steps", "temperature", "index")
    assert {k: attention["init_args"][k] for k in shared} == {k: mean["init_args"][k] for k in shared}
    assert attention["init_args"]["index"]["kind"] == "flat"
    data = {n: printed[n]["data"]["init_args"] for n in printed}
    assert data["dual_tower_attention"] == data["hybrid_tower"] and data["dual_tower_attention"]["token_features"]
    for key in ("num_items", "feature_dim", "query_vocab", "batch_size", "seed"):
        assert data["dual_tower_attention"][key] == data["dual_tower"][key], key
    assert printed["dual_tower_attention"]["trainer"]["max_epochs"] == printed["dual_tower"]["trainer"]["max_epochs"]
    assert printed["dual_tower_attention"]["trainer"]["default_root_dir"] == "runs/synthetic/dual_tower_attention"
