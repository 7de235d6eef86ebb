"""The real-language benchmark's caption-token corpus (``--protocol tokens``): an item's tokens are the embeddings
of its held-out captions, never of its queries, and their normalised mean is the item feature the other rows read.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from benchmark_scripts import BENCHMARKS, load_benchmark

from grcm.data.caption_features import CaptionSplitPlan, caption_feature_corpus
from grcm.data.datasets.captions import CaptionSet

ITEMS, CAPTIONS, HELD_OUT, DIM = 6, 7, 3, 8


def _benchmark():
    return load_benchmark("real_language_tokens")


def _embed(texts):
    """(T, DIM) unit vectors, a fixed random vector per text (a MiniLM stand-in)."""
    rows = [np.random.default_rng(abs(hash(text)) % 2**32).standard_normal(DIM) for text in texts]
    vectors = np.asarray(rows, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_item_tokens_are_its_held_out_captions_and_average_to_its_feature():
    items = [i for i in range(ITEMS) for _ in range(CAPTIONS)]
    captions = CaptionSet(name="toy", modality="video", item_ids=[f"vid{i}" for i in range(ITEMS)],
                          caption_item=np.asarray(items, dtype=np.int64),
                          caption_text=[f"clip {i} caption {j}" for i in range(ITEMS) for j in range(CAPTIONS)],
                          caption_split=np.asarray(["train"] * len(items)))
    plan = CaptionSplitPlan(held_out=HELD_OUT, test=1, val=1)
    corpus = _benchmark().token_feature_corpus(captions, _embed, plan, seed=1)
    plain = caption_feature_corpus(captions, _embed, plan, seed=1)
    assert corpus.item_ids == plain.item_ids and np.array_equal(corpus.caption_text, plain.caption_text)
    assert np.allclose(corpus.features, plain.features)  # the other rows' item features are unchanged
    assert corpus.token_features.shape == (ITEMS, HELD_OUT, DIM)
    mean = corpus.token_features.mean(axis=1)
    assert np.allclose(mean / np.linalg.norm(mean, axis=1, keepdims=True), corpus.features, atol=1e-6)
    vocabulary = {text: vector for text, vector in zip(captions.caption_text, _embed(captions.caption_text))}
    for item in range(ITEMS):
        texts = [t for t, i in zip(captions.caption_text, items) if i == item]
        queries = {corpus.caption_text[r] for r in np.flatnonzero(corpus.caption_item == item)}
        held_out = [t for t in texts if t not in queries]
        assert len(held_out) == HELD_OUT
        # the tokens are exactly the embeddings of the captions that are no query of the item, in some order
        expected = np.stack([vocabulary[t] for t in held_out])
        got = corpus.token_features[item]
        assert sorted(map(tuple, np.round(got, 5))) == sorted(map(tuple, np.round(expected, 5))), item


TEXT_BLOCK = ("embed_dim", "text_backbone", "projection_init", "lr", "weight_decay", "warmup_steps", "temperature")


def _config(name: str) -> dict:
    return yaml.safe_load((BENCHMARKS.parent / "experiments" / "real_language" / name).read_text())


def test_minilm_token_rows_fine_tune_the_text_tower_as_the_minilm_dual_tower_does():
    """The MiniLM token rows are rows of --protocol tokens (and rerank ACE's pool); they share the fine-tuned MiniLM
    dual tower's text-encoder block, batch and steps; the hybrid differs from the attention-pooling row only in its
    pseudo-query flags and its token branch's rate (each picked on validation); both start at the zero-shot similarity (identity start with the mean skip)."""
    benchmark = _benchmark()
    configs = {label: config for label, (config, _) in benchmark.TOKEN_ROWS.items()}
    attention, hybrid = configs[benchmark.ATTENTION_MINILM], configs[benchmark.HYBRID_MINILM]
    assert {benchmark.ATTENTION_MINILM, benchmark.HYBRID_MINILM} <= set(benchmark.TOKEN_RERANKERS)
    reference = _config("dual_tower_minilm.yaml")
    rows = {name: _config(name) for name in (attention, hybrid)}
    for name, config in rows.items():
        args = config["model"]["init_args"]
        assert {key: args[key] for key in TEXT_BLOCK} == {key: reference["model"]["init_args"][key]
                                                         for key in TEXT_BLOCK}, name
        assert args["mean_skip"] is True and args["projection_init"] == "identity", name
        for key in ("max_steps", "max_epochs", "val_check_interval"):
            assert config["trainer"][key] == reference["trainer"][key], (name, key)
        for key in ("batch_size", "query_vocab", "max_val_queries"):
            assert config["data"]["init_args"][key] == reference["data"]["init_args"][key], (name, key)
    differing = {key for key in {**rows[attention]["model"]["init_args"], **rows[hybrid]["model"]["init_args"]}
                 if rows[attention]["model"]["init_args"].get(key) != rows[hybrid]["model"]["init_args"].get(key)}
    assert differing <= {"item_lr", "use_generator", "use_selector", "top_k", "interaction", "pseudo_tokens", "generator_layers",
                         "interaction_layers", "generation_target", "generation_weight", "generation_contrastive"}
    assert rows[hybrid]["model"]["init_args"]["use_generator"] and not rows[attention]["model"]["init_args"]["use_generator"]


class _PoolRetriever(L.LightningModule):
    """A generative-retriever stand-in: a fixed pseudo-random scored pool of 12 per query, gold in most pools."""

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.num_items = num_items

    def _step(self, batch):
        rows, scores = [], []
        for query, item in zip(batch["query_index"].tolist(), batch["gold_items"][:, 0].tolist()):
            generator = torch.Generator().manual_seed(query)
            row = torch.randint(-1, self.num_items, (12,), generator=generator)
            row[2] = row[5]  # a duplicate
            if query % 4:
                row[query % 12] = item
            rows.append(row)
            scores.append(-3 * torch.rand(12, generator=generator))
        return {"candidates": torch.stack(rows), "candidate_scores": torch.stack(scores), "beam_size": 12}

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    test_step = validation_step


def test_the_recorded_pool_reranks_as_the_two_stage_callback_does(tmp_path):
    """rerank_pool on a PoolRecorder's recorded pool gives TwoStageEvaluation's metrics, pure and fused, on val and
    test, for a dense model whose first ranks disagree with the pool's order."""
    from cpu_trainer import cpu_trainer

    from grcm.data.datamodules import SyntheticDataModule
    from grcm.rerank.dual_tower import DualTower
    from grcm.rerank.two_stage import TwoStageEvaluation

    benchmark = _benchmark()
    dm = SyntheticDataModule(num_items=60, feature_dim=DIM, batch_size=16, eval_batch_size=16)
    dm.setup()
    torch.manual_seed(0)
    dense = DualTower(vocab_size=dm.vocab_size, feature_dim=DIM, embed_dim=DIM, text_layers=1, text_width=DIM,
                      text_heads=2, text_ffn=16, warmup_steps=1, lr=3e-3)
    trainer = cpu_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(dense, datamodule=dm)
    path = str(tmp_path / "dense.ckpt")
    trainer.save_checkpoint(path)
    weights = (0.0, 0.05)
    for stage in ("val", "test"):
        recorder = benchmark.PoolRecorder()
        callbacks = [TwoStageEvaluation(path, name=f"w{i}", generative_weight=w, full_dense_reference=False)
                     for i, w in enumerate(weights)]
        run = cpu_trainer(tmp_path, callbacks=[recorder, *callbacks])
        logged = (run.validate if stage == "val" else run.test)(_PoolRetriever(60), datamodule=dm, verbose=False)[0]
        got = benchmark.rerank_pool(recorder.batches[stage], path, dm, weights)
        assert 0 < got[0.0]["recall@1"] < logged[f"{stage}/w0/candidate_recall@12"] < 1  # a non-trivial case
        assert got[0.0] != got[0.05]  # the fused score reorders the pool
        for i, weight in enumerate(weights):
            for name in benchmark.METRIC_KEYS:
                assert got[weight][name] == pytest.approx(logged[f"{stage}/w{i}/{name}"], abs=1e-6), (stage, name)


def test_spread_is_the_mean_and_sample_deviation():
    result = _benchmark().spread([0.48, 0.50, 0.46])
    assert result["mean"] == pytest.approx(0.48) and result["std"] == pytest.approx(0.02)
    assert (result["min"], result["max"], result["n"]) == (0.46, 0.50, 3)
    assert _benchmark().spread([0.4])["std"] == 0.0
