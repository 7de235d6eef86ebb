"""The query-vocabulary bridge between a retriever's batches and the dense reranker.

A generative retriever and the dense model that reranks its candidates may read different query
vocabularies (a retriever on its own WordPiece or ``minilm_compact`` vocabulary, reranked by a
MiniLM-vocabulary dual tower). :func:`dense_tokenizer_for` decides once per evaluation epoch whether
the batches' ``input_ids`` can be fed to the dense model as they are; when they cannot,
:func:`dense_query_inputs` re-tokenizes each batch's query texts with the dense model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from grcm.data.query_tokenizer import QueryTokenizer

__all__ = ["dense_query_inputs", "dense_tokenizer_for"]


def dense_tokenizer_for(
    datamodule: Any, dense_tokenizer: QueryTokenizer, dense_vocab_size: int
) -> QueryTokenizer | None:
    """None when the data module's query ids are in the dense model's vocabulary, else the dense tokenizer.

    Args:
        datamodule: the evaluation data module; its ``query_tokenizer`` (when it has one), ``vocab_size`` and
            ``max_query_length`` (default 32) are read.
        dense_tokenizer: the tokenizer the dense checkpoint was trained with
            (:func:`grcm.rerank.dense_models.dense_query_tokenizer`).
        dense_vocab_size: the dense model's query embedding rows.

    Returns:
        None, or ``dense_tokenizer`` truncating at the data module's ``max_query_length``.
    """
    mine = getattr(datamodule, "query_tokenizer", None)
    max_length = int(getattr(datamodule, "max_query_length", 32))
    dense = dense_tokenizer
    if dense.max_length != max_length:  # truncate as the data module does
        dense = QueryTokenizer.from_json(dense.to_json(), max_length)
    if mine is not None and mine.to_json() == dense.to_json():
        return None
    if mine is None and int(getattr(datamodule, "vocab_size", -1)) == int(dense_vocab_size):
        return None  # no tokenizer to compare with: the vocabulary sizes agree, trust the batch ids
    return dense


def dense_query_inputs(
    batch: Mapping[str, Tensor], tokenizer: QueryTokenizer | None, corpus: Any
) -> tuple[Tensor, Tensor]:
    """``(B, T)`` query ids and ``(B, T)`` mask of ``batch`` in the dense model's vocabulary.

    Args:
        batch: an evaluation batch (``input_ids``, ``attention_mask``, ``query_index``).
        tokenizer: :func:`dense_tokenizer_for`'s answer; None passes the batch's ids through.
        corpus: the evaluated :class:`~grcm.data.corpus.Corpus`; its ``caption_text`` (the query texts, indexed
            by ``batch["query_index"]``) is read only when re-tokenizing.
    """
    if tokenizer is None:
        return batch["input_ids"], batch["attention_mask"]
    texts = corpus.caption_text
    ids, mask = tokenizer.encode([texts[int(i)] for i in batch["query_index"]])
    device = batch["input_ids"].device
    return ids.to(device), mask.to(device)
