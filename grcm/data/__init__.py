"""Corpus schema, the synthetic corpus, query tokenization and DataModules.

The names below are imported on first use, so ``grcm.data.datasets`` (``grcm prepare``) and
``grcm.data.corpus`` load without torch or Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Corpus": "grcm.data.corpus",
    "CorpusError": "grcm.data.corpus",
    "load_corpus": "grcm.data.corpus",
    "save_corpus": "grcm.data.corpus",
    "CorpusDataModule": "grcm.data.datamodules",
    "RetrievalDataModule": "grcm.data.datamodules",
    "SyntheticDataModule": "grcm.data.datamodules",
    "QueryTokenizer": "grcm.data.query_tokenizer",
    "generate_synthetic_corpus": "grcm.data.synthetic",
    "generate_synthetic_features": "grcm.data.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
