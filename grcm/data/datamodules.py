"""LightningDataModules that serve a :class:`~grcm.data.corpus.Corpus`.

Two kinds of batches, chosen by ``serve``:

- ``"queries"`` (retrievers, dual towers): train batches are
  ``{"input_ids": (B, T), "attention_mask": (B, T) bool, "item_index": (B,), "query_index": (B,)}``;
  val/test/predict batches are
  ``{"input_ids", "attention_mask", "query_index": (B,), "gold_items": (B, G) padded with -1}``.
- ``"items"`` (SID tokenizers): ``{"item_index": (B,), "features": (B, D) float32}``, plus
  ``"token_features": (B, T', D)`` float32 and ``"token_mask": (B, T')`` bool (True = a real
  token, False = padding) when the corpus has token features; ``T'`` is the longest item of
  the batch. :func:`~grcm.data.batches.item_token_batch` builds the same pair for any item indices (the hybrid
  tower gathers its training items' tokens with it).

Sizes a model needs (``feature_dim``, ``vocab_size``, ``pad_token_id``) are known
after ``__init__`` so that the CLI can link them into the model's arguments.

Query vocabularies (``query_vocab``: ``"minilm"``, ``"minilm_compact"``, ``"wordpiece"``) are described in
:mod:`grcm.data.query_vocab`; the built ones travel with checkpoints
(:meth:`RetrievalDataModule.state_dict`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from grcm.data.batches import (  # noqa: F401 (token_batch, item_token_batch re-exported from here)
    IndexDataset,
    ItemBatches,
    QueryBatches,
    item_token_batch,
    token_batch,
)
from grcm.data.corpus import Corpus, CorpusError, load_corpus, load_features, read_corpus_header
from grcm.data.protocol import (  # noqa: F401 (transductive_split re-exported from here)
    DEFAULT_VAL_FROM_TRAIN,
    QueryCoverage,
    constant_val_error,
    held_out_notice,
    hold_out_validation,
    needs_training_queries,
    transductive_split,
    uncovered_fix,
)
from grcm.data.query_tokenizer import QueryTokenizer
from grcm.data.query_vocab import BUILT_VOCABS, QueryVocab, same_on_every_rank
from grcm.data.synthetic import generate_synthetic_corpus
from grcm.resume import ResumableDataLoader, ResumableSampler, gather_rng_states, set_rng_state

Serve = Literal["queries", "items"]
log = logging.getLogger(__name__)
_same_on_every_rank = same_on_every_rank  # the former private name (tests/test_ddp.py)


class RetrievalDataModule(L.LightningDataModule, ABC):
    """Base DataModule: (query text -> item) pairs for training, (query, gold items) for evaluation.

    Subclasses implement :meth:`load_corpus` and set ``feature_dim`` before calling ``__init__``.

    Args:
        feature_dim: item feature dimension D (subclasses derive it).
        serve: ``"queries"`` or ``"items"`` (see the module docstring).
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader workers.
        pin_memory: pin host memory (useful with CUDA).
        query_vocab: ``"minilm"`` (shipped vocabulary), ``"minilm_compact"`` (MiniLM's tokens that the
            training queries use, new ids) or ``"wordpiece"`` (trained on the training queries); see the
            module docstring.
        wordpiece_vocab_size: size of the trained WordPiece vocabulary.
        compact_vocab_size: capacity of the ``minilm_compact`` vocabulary, special tokens included (the
            model's embedding rows); the most frequent training tokens are kept when more occur.
        max_query_length: queries are truncated to this many tokens.
        max_val_queries: validate on a fixed random subset of this many val queries (None = all).
        max_test_queries: test on a fixed random subset of this many test queries (None = all; same seed).
        use_extra_queries: train on the corpus's extra (generated) queries too.
        split_seed: seed of the val subset.
        uncovered_items: what set-up does when val/test queries point at items without training queries
            (which a generative retriever cannot return; see :mod:`grcm.data.protocol`): ``"warn"``,
            ``"error"`` (a :class:`CorpusError` with the fix) or ``"ignore"``. The coverage is kept in
            :attr:`coverage` and always logged.
        transductive_holdout: when set to k, each val and test item keeps k of its captions of that split as
            queries and its other captions of that split become training queries (the transductive setting; the
            val and test sets shrink). See :func:`~grcm.data.protocol.transductive_split`.
        val_from_train: validate on captions held out of the training split instead of the corpus's val split:
            a share ``0 < x < 1`` of the training items (or a count ``x >= 1``) gives one caption each (items
            with two or more training captions first, so they keep training queries); see
            :func:`~grcm.data.protocol.hold_out_validation`. A corpus with no val captions uses
            ``DEFAULT_VAL_FROM_TRAIN`` (0.05) automatically, with a printed notice.
    """

    def __init__(
        self,
        feature_dim: int,
        serve: Serve = "queries",
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        pin_memory: bool = False,
        query_vocab: QueryVocab = "minilm",
        wordpiece_vocab_size: int = 4096,
        compact_vocab_size: int = 4096,
        max_query_length: int = 32,
        max_val_queries: int | None = None,
        max_test_queries: int | None = None,
        use_extra_queries: bool = True,
        split_seed: int = 0,
        uncovered_items: Literal["warn", "error", "ignore"] = "warn",
        transductive_holdout: int | None = None,
        val_from_train: float | None = None,
    ):
        super().__init__()
        if serve not in ("queries", "items"):
            raise ValueError(f"data.serve must be 'queries' or 'items', got {serve!r}")
        self.feature_dim = int(feature_dim)
        self.serve = serve
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.query_vocab, self.max_query_length = query_vocab, max_query_length
        self.max_val_queries, self.use_extra_queries, self.split_seed = max_val_queries, use_extra_queries, split_seed
        self.max_test_queries = max_test_queries
        if uncovered_items not in ("warn", "error", "ignore"):
            raise ValueError(f"data.uncovered_items must be 'warn', 'error' or 'ignore', got {uncovered_items!r}")
        if transductive_holdout is not None and transductive_holdout < 1:
            raise ValueError(f"data.transductive_holdout must be >= 1 or null, got {transductive_holdout}")
        if val_from_train is not None and not val_from_train > 0:
            raise ValueError(f"data.val_from_train must be a share in (0, 1), a count >= 1 or null, got {val_from_train}")
        self.uncovered_items, self.transductive_holdout = uncovered_items, transductive_holdout
        self.val_from_train = val_from_train
        self.coverage: QueryCoverage | None = None
        if query_vocab == "minilm":
            self.query_tokenizer: QueryTokenizer | None = QueryTokenizer.minilm(max_query_length)
            self.vocab_size = self.query_tokenizer.vocab_size
            self.pad_token_id = self.query_tokenizer.pad_token_id
        elif query_vocab in BUILT_VOCABS:
            self.query_tokenizer = None  # built in setup() or restored from a checkpoint
            self.vocab_size = int(wordpiece_vocab_size if query_vocab == "wordpiece" else compact_vocab_size)
            self.pad_token_id = 0
        else:
            raise ValueError(
                f"data.query_vocab must be 'minilm', 'minilm_compact' or 'wordpiece', got {query_vocab!r}"
            )
        self.wordpiece_vocab_size, self.compact_vocab_size = wordpiece_vocab_size, compact_vocab_size
        self.corpus: Corpus | None = None
        self._splits: dict[str, QueryBatches] = {}
        self._rng_to_restore: dict[str, Any] | None = None

    @abstractmethod
    def load_corpus(self) -> Corpus:
        """Return the validated corpus this DataModule serves."""

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            corpus = self.load_corpus()
            if corpus.feature_dim != self.feature_dim:
                raise CorpusError(
                    f"corpus {corpus.name!r} has {corpus.feature_dim}-d features but data.feature_dim is "
                    f"{self.feature_dim}; set data.feature_dim={corpus.feature_dim}."
                )
            self.corpus = self._resplit(corpus)
        if self.serve == "queries" and not self._splits:
            self._build_query_splits()
            self._check_coverage()
        if self.serve == "queries" and stage == "fit":
            self._check_monitored_split()

    def _resplit(self, corpus: Corpus) -> Corpus:
        """Apply ``transductive_holdout`` and ``val_from_train`` (or its fallback when there is no val split)."""
        if self.transductive_holdout is not None:
            corpus = transductive_split(corpus, self.transductive_holdout)
        if self.serve != "queries":
            return corpus
        amount = self.val_from_train
        skipped = self.trainer is not None and self.trainer.limit_val_batches == 0
        if amount is None and not skipped and not (corpus.caption_split == "val").any():
            amount = DEFAULT_VAL_FROM_TRAIN
        if amount is None:
            return corpus
        corpus, held = hold_out_validation(corpus, amount, self.split_seed)
        _notice(held_out_notice(corpus.name, held, explicit=self.val_from_train is not None))
        return corpus

    def _check_coverage(self) -> None:
        """Measure which val/test items have training queries; warn or fail per ``uncovered_items``."""
        train_items = self._splits["train"].item_index.numpy()
        self.coverage = coverage = QueryCoverage.of(self.corpus, train_items)
        log.info("corpus %r: %s", self.corpus.name, coverage.describe("test"))
        if self.uncovered_items == "ignore":
            return
        for split in ("test", "val"):
            missing = coverage.uncovered(split)
            if not missing.size:
                continue
            ids = [self.corpus.item_ids[i] for i in missing[:3].tolist()]
            fix = uncovered_fix(split, self.transductive_holdout)
            message = (
                f"corpus {self.corpus.name!r}: {missing.size} of {coverage.eval_items[split].size} {split} items "
                f"(e.g. {ids}) have no training queries; {coverage.describe(split)} {fix}"
            )
            if self.uncovered_items == "error":
                raise CorpusError(message)
            warnings.warn(message, stacklevel=2)
            return

    def _check_monitored_split(self) -> None:
        """Refuse to fit a generative retriever whose val items all lack training queries (see
        :func:`~grcm.data.protocol.constant_val_error`)."""
        trainer = self.trainer
        if trainer is None or self.coverage is None or not needs_training_queries(trainer.lightning_module):
            return
        if trainer.limit_val_batches != 0:
            message = constant_val_error(self.corpus.name, self.coverage, self.transductive_holdout)
            if message:
                raise CorpusError(message)

    def _build_query_splits(self) -> None:
        corpus = self.corpus
        train = corpus.captions_of_split("train")
        train_text = [corpus.caption_text[i] for i in train]
        train_item = corpus.caption_item[train]
        train_query = train
        if self.use_extra_queries and len(corpus.extra_text):
            train_text += corpus.extra_text
            train_item = np.concatenate([train_item, corpus.extra_item])
            offset = len(corpus.caption_text)
            train_query = np.concatenate([train, offset + np.arange(len(corpus.extra_text))])
        if self.query_tokenizer is None:
            if self.query_vocab == "minilm_compact":
                self.query_tokenizer = QueryTokenizer.minilm_compact(
                    train_text, self.compact_vocab_size, self.max_query_length
                )
                log.info("minilm_compact query vocabulary: %d tokens (capacity %d)",
                         self.query_tokenizer.vocab_size, self.compact_vocab_size)
            else:
                self.query_tokenizer = same_on_every_rank(QueryTokenizer.train_wordpiece(
                    train_text, self.wordpiece_vocab_size, self.max_query_length
                ))
            self.pad_token_id = self.query_tokenizer.pad_token_id
        if self.query_tokenizer.vocab_size > self.vocab_size:
            raise ValueError(
                f"the query tokenizer has {self.query_tokenizer.vocab_size} tokens but vocab_size is {self.vocab_size}"
            )
        ids, mask = self.query_tokenizer.encode(train_text)
        self._splits["train"] = QueryBatches(ids, mask, torch.from_numpy(train_query), torch.from_numpy(train_item))
        for split in ("val", "test"):
            rows = corpus.captions_of_split(split)
            limit = self.max_val_queries if split == "val" else self.max_test_queries
            if limit is not None and len(rows) > limit:
                rng = np.random.default_rng(self.split_seed)
                rows = np.sort(rng.choice(rows, size=limit, replace=False))
            ids, mask = self.query_tokenizer.encode([corpus.caption_text[i] for i in rows])
            gold = torch.from_numpy(corpus.caption_item[rows]).unsqueeze(1)
            self._splits[split] = QueryBatches(ids, mask, torch.from_numpy(rows), gold_items=gold)

    # -- loaders --------------------------------------------------------------------------------
    def _loader(self, collate, n: int, batch_size: int, shuffle: bool) -> DataLoader:
        """Training loaders shuffle with a :class:`ResumableSampler`; no loader draws from the global RNG."""
        dataset = IndexDataset(n)
        sampler = self._train_sampler(dataset, batch_size) if shuffle else None
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.split_seed),
        )

    def _train_sampler(self, dataset: Dataset, batch_size: int) -> ResumableSampler:
        """Epoch-seeded, rank-sharded shuffling that resumes mid-epoch where the fit loop stands."""
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return ResumableSampler(
            dataset, num_replicas=world_size, rank=rank, seed=seed, batch_size=batch_size,
            batches_done=self._batches_done,
        )

    def _batches_done(self) -> int:
        """Training batches of the current epoch already run (non-zero only right after a mid-epoch resume)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def _split_loader(self, split: str, shuffle: bool) -> DataLoader:
        if self.corpus is None or (self.serve == "queries" and not self._splits):
            self.setup()
        if self.serve == "items":
            batch = self.batch_size if shuffle else self.eval_batch_size
            items = ItemBatches(self.corpus.features, self.corpus)
            return self._loader(items, self.corpus.num_items, batch, shuffle)
        queries = self._splits[split]
        if len(queries) == 0:
            fix = {
                "train": "prepare the corpus with its training annotations, or set data.init_args.transductive_holdout"
                         "=<k> to train on all but k captions of each val/test item",
                "val": "set data.init_args.val_from_train=<share or count> to validate on held-out training captions, "
                       "or skip validation with --trainer.limit_val_batches=0",
                "test": "prepare the corpus with its test annotations (grcm prepare <dataset> --splits ... test)",
            }[split]
            raise CorpusError(f"corpus {self.corpus.name!r} has no {split} captions to serve; {fix}.")
        return self._loader(queries, len(queries), self.batch_size if shuffle else self.eval_batch_size, shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._split_loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._split_loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._split_loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._split_loader("test", shuffle=False)

    def query_batches(self, split: str) -> QueryBatches:
        """All queries of ``split`` (``"train"``, ``"val"``, ``"test"``), tokenized."""
        self.setup()
        return self._splits[split]

    # -- the trained vocabulary and every rank's random state travel with checkpoints -------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.query_vocab in BUILT_VOCABS and self.query_tokenizer is not None:
            state["query_tokenizer"] = self.query_tokenizer.to_json()
        if self.trainer is not None and self.trainer.state.fn == "fit":
            state["rng_states"] = gather_rng_states()  # called on every rank while a checkpoint is written
        return state

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Right before the first training step after a resume, put back the random state of the checkpoint."""
        if self._rng_to_restore is not None and self.trainer is not None and self.trainer.training:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        return batch

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the built query vocabulary; splits already built (Lightning restores after ``setup()``)
        are re-encoded with it, so every split stays served."""
        states = state_dict.get("rng_states")
        if states:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self._rng_to_restore = states[rank] if rank < len(states) else states[0]
        if "query_tokenizer" in state_dict:
            self.query_tokenizer = QueryTokenizer.from_json(state_dict["query_tokenizer"], self.max_query_length)
            self.pad_token_id = self.query_tokenizer.pad_token_id
            self._splits = {}
            if self.corpus is not None and self.serve == "queries":
                self._build_query_splits()


@rank_zero_only
def _notice(message: str) -> None:
    """A one-line notice on standard error (rank zero only)."""
    print(f"grcm: notice: {message}", file=sys.stderr)


class SyntheticDataModule(RetrievalDataModule):
    """The embedded synthetic corpus (see :mod:`grcm.data.synthetic`); nothing to download.

    Args:
        num_items: corpus size (1k to 1M).
        feature_dim: feature dimension.
        seed: corpus seed.
        captions_per_item: train captions per item (plus one val and one test caption).
        near_duplicate_fraction: share of items that copy another item's attributes.
        generated_queries_per_item: deterministic generated queries per item
            (:mod:`grcm.data.synthetic_queries`, ACE §3.3's generated queries), added to the corpus's
            extra queries (source "synthetic") and trained on when ``use_extra_queries`` is true.
        token_features: also generate ``(N, T, D)`` token features (one per aspect plus background
            tokens); the pooled features are then the mean of each item's tokens.
        noise_tokens: most background tokens per item when ``token_features`` is on.
        unseen_items: share of items held out of training (their train captions and generated queries
            removed; still in the corpus, the SID table and val/test): the inductive setting, see
            :mod:`grcm.data.unseen_items`. 0 (default) trains on every item.
        **kwargs: see :class:`RetrievalDataModule`.
    """

    def __init__(
        self,
        num_items: int = 2000,
        feature_dim: int = 256,
        seed: int = 0,
        captions_per_item: int = 5,
        near_duplicate_fraction: float = 0.05,
        generated_queries_per_item: int = 0,
        token_features: bool = False,
        noise_tokens: int = 4,
        unseen_items: float = 0.0,
        **kwargs,
    ):
        if generated_queries_per_item < 0:
            raise ValueError(f"data.generated_queries_per_item must be >= 0, got {generated_queries_per_item}.")
        self.generated_queries_per_item = generated_queries_per_item
        self.num_items, self.seed = num_items, seed
        self.captions_per_item, self.near_duplicate_fraction = captions_per_item, near_duplicate_fraction
        self.token_features, self.noise_tokens = token_features, noise_tokens
        self.unseen_items = float(unseen_items)
        super().__init__(feature_dim=feature_dim, **kwargs)

    def load_corpus(self) -> Corpus:
        options = {"captions_per_item": self.captions_per_item, "near_duplicate_fraction": self.near_duplicate_fraction}
        tokens = {"token_features": True, "noise_tokens": self.noise_tokens} if self.token_features else {}
        corpus = generate_synthetic_corpus(self.num_items, self.feature_dim, self.seed, **options, **tokens)
        if self.generated_queries_per_item:
            from grcm.data.synthetic_queries import SOURCE, generate_synthetic_queries

            items, texts = generate_synthetic_queries(corpus, self.generated_queries_per_item, self.seed, **options)
            corpus.extra_item, corpus.extra_text, corpus.extra_source = items, texts, [SOURCE] * len(texts)
        if self.unseen_items:
            from grcm.data.unseen_items import hold_out_items

            corpus, _ = hold_out_items(corpus, self.unseen_items, self.seed)
        return corpus


class CorpusDataModule(RetrievalDataModule):
    """A corpus directory on disk (layout in :mod:`grcm.data.corpus`), e.g. one written by a dataset reader.

    Args:
        corpus_dir: the directory holding ``corpus.json``.
        **kwargs: see :class:`RetrievalDataModule`; ``feature_dim`` is read from the feature file.
    """

    def __init__(self, corpus_dir: str, **kwargs):
        self.corpus_dir = Path(corpus_dir)
        header = read_corpus_header(self.corpus_dir)
        features = load_features(self.corpus_dir / header.get("features", "features.npy"))
        if features.ndim != 2:
            raise CorpusError(f"{self.corpus_dir}: features must be 2-d (num_items, feature_dim).")
        super().__init__(feature_dim=int(features.shape[1]), **kwargs)

    def load_corpus(self) -> Corpus:
        return load_corpus(self.corpus_dir)
