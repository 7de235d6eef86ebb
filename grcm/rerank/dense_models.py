"""Dense models behind one loader: the dual tower and the hybrid tower share the two-stage interface.

Both expose ``encode_queries(input_ids, attention_mask) -> (B, E)``, an ``encode_corpus``
that returns ``(N, E)`` float32 item embeddings, and ``hparams.feature_dim`` /
``hparams.vocab_size``. :func:`corpus_item_embeddings` feeds each model what it reads
(pooled features, or token features too); :func:`load_dense_model` picks a checkpoint's
class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Checkpoint key naming the dense model class that wrote it (absent in older dual-tower checkpoints).
DENSE_MODEL_CLASS_KEY = "dense_model_class"


def dense_model_classes() -> dict[str, type]:
    """The dense model classes a checkpoint may name (an allowlist: nothing else is imported)."""
    from grcm.rerank.dual_tower import DualTower
    from grcm.rerank.hybrid_tower import HybridTower

    return {"DualTower": DualTower, "HybridTower": HybridTower}


def dense_model_class(path: str | Path) -> type:
    """The class of the dense checkpoint at ``path``: its recorded class, else the CLI's ``_class_path``,
    else :class:`~grcm.rerank.dual_tower.DualTower`."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
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
    from grcm.rerank.hybrid_tower import HybridTower

    if isinstance(model, HybridTower):
        return model.encode_corpus(corpus.features, corpus.token_features, corpus.token_lengths)
    return model.encode_corpus(corpus.features)


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
