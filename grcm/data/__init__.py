"""Corpus schema, the synthetic corpus, query tokenization and DataModules."""

from grcm.data.corpus import Corpus, CorpusError, load_corpus, save_corpus
from grcm.data.datamodules import CorpusDataModule, RetrievalDataModule, SyntheticDataModule
from grcm.data.query_tokenizer import QueryTokenizer
from grcm.data.synthetic import generate_synthetic_corpus, generate_synthetic_features

__all__ = [
    "Corpus",
    "CorpusDataModule",
    "CorpusError",
    "QueryTokenizer",
    "RetrievalDataModule",
    "SyntheticDataModule",
    "generate_synthetic_corpus",
    "generate_synthetic_features",
    "load_corpus",
    "save_corpus",
]
