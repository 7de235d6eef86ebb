"""Dense models behind one loader: the dual tower and the hybrid tower share the two-stage interface.

Both expose ``encode_queries(input_ids, attention_mask) -> (B, E)``, an ``encode_corpus``
that returns ``(N, E)`` float32 item embeddings, and ``hparams.feature_dim`` /
``hparams.vocab_size``. :func:`corpus_item_embeddings` feeds each model what it reads
(pooled features, or token features too: each model's ``embed_corpus``); :func:`load_dense_model`
picks a checkpoint's class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from grcm.rerank.dual_tower import DENSE_MODEL_CLASS_KEY, DualTower
from grcm.rerank.hybrid_tower import HybridTower

__all__ = [
    "DENSE_MODEL_CLASS_KEY",
    "corpus_item_embeddings",
    "dense_model_class",
    "dense_model_classes",
    "dense_query_tokenizer",
    "load_dense_model",
]


def dense_model_classes() -> dict[str, type]:
    """The dense model classes a checkpoint may name (an allowlist: nothing else is loaded)."""
    return {"DualTower": DualTower, "HybridTower": HybridTower}


def dense_model_class(path: str | Path) -> type:
    """The class of the dense checkpoint at ``path``: its recorded class, else the CLI's ``_class_path``,
    else :class:`~grcm.rerank.dual_tower.DualTower`."""
    from grcm.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path, what="dense_checkpoint")  # one-line errors for unreadable files
    name = checkpoint.get(DENSE_MODEL_CLASS_KEY) or checkpoint.get("hyper_parameters", {}).get("_class_path", "")
    name = str(name).rpartition(".")[2] or "DualTower"
    classes = dense_model_classes()
    if name not in classes:
        raise ValueError(
            f"{path}: checkpoint of {name!r}, which is not a dense model ({', '.join(classes)}); point the "
            "two-stage dense_checkpoint at a dual- or hybrid-tower checkpoint"
        )
    return classes[name]


def load_dense_model(path: str | Path) -> Any:
    """Load a dual- or hybrid-tower checkpoint (tensors only), frozen and in eval mode, on the CPU."""
    model = dense_model_class(path).load_from_checkpoint(path, map_location="cpu", weights_only=True)
    return model.eval().requires_grad_(False)


def corpus_item_embeddings(model: Any, corpus: Any) -> np.ndarray:
    """``(N, E)`` float32 item embeddings of ``corpus`` by ``model`` (token features for the hybrid tower)."""
    return model.embed_corpus(corpus)


def dense_query_tokenizer(path: str | Path, vocab_size: int, max_length: int = 32) -> Any:
    """The query tokenizer the dense checkpoint at ``path`` was trained with.

    A data module with a vocabulary built at set-up (``minilm_compact`` or ``wordpiece``) stores it in
    the checkpoint (its ``state_dict()["query_tokenizer"]``); otherwise the checkpoint read the MiniLM vocabulary,
    which ``vocab_size`` (the dense model's embedding rows) must then match.

    Returns:
        :class:`~grcm.data.query_tokenizer.QueryTokenizer`.
    """
    from grcm.data.query_tokenizer import QueryTokenizer
    from grcm.errors import GrcmError

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for value in checkpoint.values():
        if isinstance(value, dict) and isinstance(value.get("query_tokenizer"), str):
            return QueryTokenizer.from_json(value["query_tokenizer"], max_length)
    minilm = QueryTokenizer.minilm(max_length)
    if int(vocab_size) != minilm.vocab_size:
        raise GrcmError(
            f"{path}: the dense model reads a {vocab_size}-token query vocabulary, neither MiniLM's "
            f"({minilm.vocab_size}) nor a vocabulary stored in the checkpoint; retrain it with "
            "data.query_vocab=minilm, minilm_compact or wordpiece"
        )
    return minilm
