"""The real-language benchmark's caption-token corpus (``--protocol tokens``): an item's tokens are the embeddings
of its held-out captions, never of its queries, and their normalised mean is the item feature the other rows read.
"""

from __future__ import annotations

import numpy as np
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
