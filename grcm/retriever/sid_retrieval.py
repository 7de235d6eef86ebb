"""The SID-retrieval path shared by ACE's :class:`~grcm.retriever.module.GenerativeRetriever` and GRDR.

Query text -> constrained beam search over SIDs -> ranked items -> metrics, in one place:

* **inference mode**: :meth:`SIDRetrievalModule.decode` and :meth:`~SIDRetrievalModule.retrieve` always
  run with every submodule in evaluation mode (no dropout) under ``torch.inference_mode``, also when
  called outside a Lightning loop or right after ``load_from_checkpoint``; each submodule's training
  flag is restored afterwards;
* **decoding**: KV-cached incremental decoding by default (:mod:`grcm.retriever.incremental`, with its
  ``compile_decoder`` / ``cuda_graphs`` / ``decode_precision`` speed options), the full-recompute
  reference with ``incremental_decoding=False``; the trie is cached against the SID table's version
  (:class:`~grcm.retriever.trie_cache.VersionedTrie`);
* **beams -> items**: every item the beams recall, in beam order, with the beam's log-probability
  (:func:`~grcm.decoding.beams_to_scored_items`), cut to ``eval_max_items`` for the metrics;
* **prefix recall** (``recall_levels`` = p, default None = full SIDs): decode only the first p levels
  and expand each decoded prefix to *every* item under it (items without training queries too), best
  beam first, items ascending within a prefix, the pool capped at ``max_pool_items``
  (:meth:`~SIDRetrievalModule.recall_trie`); ``{stage}/pool_items`` and ``{stage}/pool_share`` (of the
  corpus) are logged, and ``{stage}/prefix_items`` / ``{stage}/prefix_share``: the items under the decoded
  prefixes before the cap (what a ``prefix_scorer`` reads);
* **items ordered by their features under a prefix** (``prefix_scorer`` = a file of
  :mod:`grcm.retriever.prefix_scorer`, with ``recall_levels``): each recalled item scores its prefix's beam
  log-probability plus ``prefix_scorer_weight`` times ``(W h + b) . v_item`` (h: the decoder state after
  the prefix, v: the item's feature residual), and the pool is the best ``max_pool_items`` items by that
  score, from any prefix; an item without training queries is ordered by its features like a trained one;
* **seen vs unseen items**: when some evaluation queries' gold items have no training query (held-out or
  newly indexed items, :mod:`grcm.data.unseen_items`), ``{stage}/seen/*`` and ``{stage}/unseen/*`` give
  ``recall@k``, ``mrr@k``, ``candidate_recall`` (gold anywhere in the pool) and ``queries`` per group;
* **metrics and logging**: item-level ``recall@k`` / ``mrr@k`` (:class:`~grcm.metrics.ItemRetrievalMetrics`,
  each query id counted once under DDP), ``queries_per_s``, and at test time
  ``index_bytes_per_item`` (the trie plus the SID table in narrow dtypes);
* **predict output**: ``{"query_index", "items", "scores"}``.

A subclass provides ``self.model`` (a :class:`~grcm.retriever.model.GenerativeRetrieverModel`), its
SID table (:meth:`~SIDRetrievalModule.index_table`, :meth:`~SIDRetrievalModule.sid_table`,
:meth:`~SIDRetrievalModule.build_trie`, :meth:`~SIDRetrievalModule.trie_sources`) and may add per-batch and per-epoch metrics
(:meth:`~SIDRetrievalModule.evaluate_extra`, :meth:`~SIDRetrievalModule.log_extra`).
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from grcm.data.unseen_items import seen_items_of, unseen_queries
from grcm.decoding import (
    BeamSearchOutput,
    RankedItems,
    SIDTrie,
    beams_to_items,
    beams_to_scored_items,
    constrained_beam_search,
    sid_table_nbytes,
)
from grcm.decoding.beam import ITEM_SCORES
from grcm.errors import GrcmError
from grcm.metrics import ItemRetrievalMetrics, PerQueryMeans, SeenUnseenMetrics, candidate_recall, fixed_width
from grcm.retriever.cpu_inference import PreparedNetwork, check_inference_quantization
from grcm.retriever.incremental import PRECISIONS, decode_precision, make_step_fn
from grcm.retriever.prefix_scorer import (
    PrefixItemScorer,
    prefix_item_counts,
    prefix_states,
    scored_prefix_pool,
)
from grcm.retriever.trie_cache import VersionedTrie


class RetrieverConfigError(GrcmError, ValueError):
    """A retriever argument that cannot work (names the argument and the fix)."""


def check_decoding_args(
    beam_size: int,
    eval_max_items: int | None,
    ks: Sequence[int],
    mrr_k: int,
    incremental_decoding: bool = True,
    compile_decoder: bool = False,
    decode_precision: str = "32",
    cuda_graphs: bool = False,
) -> None:
    """Raise :class:`RetrieverConfigError` for decoding and reporting arguments that cannot work."""
    if beam_size < 1:
        raise RetrieverConfigError(f"model.beam_size must be >= 1, got {beam_size}.")
    largest_cutoff = max(*ks, mrr_k)
    if eval_max_items is not None and eval_max_items < largest_cutoff:
        raise RetrieverConfigError(
            f"model.eval_max_items={eval_max_items} is below the largest reported cut-off {largest_cutoff} "
            f"(ks={list(ks)}, mrr_k={mrr_k}): recall@{largest_cutoff} would count only {eval_max_items} items. "
            f"Set eval_max_items >= {largest_cutoff} or leave it unset."
        )
    if decode_precision not in PRECISIONS:
        raise RetrieverConfigError(
            f"model.decode_precision must be one of {list(PRECISIONS)}, got {decode_precision!r}."
        )
    if (compile_decoder or cuda_graphs) and not incremental_decoding:
        raise RetrieverConfigError(
            "model.compile_decoder and model.cuda_graphs speed up incremental decoding; "
            "set model.incremental_decoding=true or unset them."
        )


def check_recall_args(recall_levels: int | None, max_pool_items: int | None, ks: Sequence[int], mrr_k: int) -> None:
    """Raise :class:`RetrieverConfigError` for prefix-recall arguments that cannot work."""
    if recall_levels is not None and int(recall_levels) < 1:
        raise RetrieverConfigError(
            f"model.recall_levels must be >= 1 (decode that many SID levels) or null (full SIDs), got {recall_levels}."
        )
    largest_cutoff = max(*ks, mrr_k)
    if max_pool_items is not None and int(max_pool_items) < largest_cutoff:
        raise RetrieverConfigError(
            f"model.max_pool_items={max_pool_items} is below the largest reported cut-off {largest_cutoff}; "
            f"set it >= {largest_cutoff} or leave it unset (no cap)."
        )


class SIDRetrievalModule(L.LightningModule, ABC):
    """Decoding, beams -> items, metrics, logging, index size and prediction of a SID retriever.

    Reads these hyperparameters: ``beam_size``, ``eval_max_items``, ``ks``, ``mrr_k`` and, when present,
    ``constrained`` (default True), ``incremental_decoding`` (True), ``compile_decoder`` (False),
    ``decode_precision`` ("32"), ``cuda_graphs`` (False), ``inference_quantization`` ("none"; CPU int8 / bf16,
    :mod:`grcm.retriever.cpu_inference`), ``recall_levels`` (None: full SIDs),
    ``max_pool_items`` (None: no cap on the recalled pool), ``prefix_scorer`` (None: items under a prefix in
    index order), ``prefix_scorer_weight`` (0.5) and ``prefix_scorer_untrained_bonus`` (0). A subclass calls
    :meth:`init_retrieval` in its ``__init__`` after ``save_hyperparameters`` and implements the SID
    table's three abstract methods; the class itself is no model (``grcm fit`` cannot instantiate it).
    """

    def init_retrieval(self, ks: Sequence[int], mrr_k: int) -> None:
        """Create the metric states, the decode timers and the trie caches; check the prefix-recall arguments."""
        check_recall_args(self.hparams.get("recall_levels"), self.hparams.get("max_pool_items"), ks, mrr_k)
        if self.hparams.get("item_score", "max") not in ITEM_SCORES:
            raise RetrieverConfigError(f"model.item_score must be one of {ITEM_SCORES}, got {self.hparams.item_score!r}.")
        self.val_metrics = ItemRetrievalMetrics(ks=ks, mrr_k=mrr_k)
        self.test_metrics = ItemRetrievalMetrics(ks=ks, mrr_k=mrr_k)
        self.val_groups, self.test_groups = SeenUnseenMetrics(ks, mrr_k), SeenUnseenMetrics(ks, mrr_k)
        self.val_pool, self.test_pool = (PerQueryMeans(["pool_items", "prefix_items"]),
                                        PerQueryMeans(["pool_items", "prefix_items"]))
        quantization = check_inference_quantization(self.hparams.get("inference_quantization", "none"))
        if quantization != "none" and (self.hparams.get("compile_decoder") or self.hparams.get("cuda_graphs")):
            raise RetrieverConfigError(
                f"model.inference_quantization={quantization!r} runs on CPU without torch.compile; unset "
                "model.compile_decoder and model.cuda_graphs, or set inference_quantization to 'none'."
            )
        self._cpu_network = PreparedNetwork()  # the int8 / bf16 network, prepared once per set of weights
        self._decode_seconds, self._decoded_queries = 0.0, 0
        self._trie_cache = VersionedTrie()
        self._prefix_tries: dict[int, VersionedTrie] = {}
        self._seen_items: Tensor | None = None
        self._prefix_scorer: tuple[str, PrefixItemScorer] | None = None

    # ------------------------------------------------------- the subclass's SID table
    @abstractmethod
    def trie_sources(self) -> tuple[Tensor, ...]:
        """The tensors the trie is a function of (a change to any of them rebuilds it)."""
        raise NotImplementedError

    @abstractmethod
    def build_trie(self) -> SIDTrie:
        """A new trie over the current SID table (called only when :meth:`trie_sources` changed)."""
        raise NotImplementedError

    @abstractmethod
    def sid_table(self) -> tuple[Tensor, Tensor]:
        """Every SID row: codes (R, l) over the levels decoded, and the item index of each row (R,)."""
        raise NotImplementedError

    @abstractmethod
    def index_table(self) -> tuple[Tensor, list[int], int]:
        """The generative index's SID table: codes (R, l), their code ranges (l,), and the item count N."""
        raise NotImplementedError

    @property
    def can_decode(self) -> bool:
        """False while there is no SID to decode (GRDR before its first level): evaluation is skipped."""
        return True

    def evaluate_extra(self, batch: dict[str, Tensor], output: BeamSearchOutput, recalled: RankedItems,
                       stage: str) -> None:
        """Per-batch metrics of the subclass, after the shared ones (``stage`` is "val" or "test")."""

    def log_extra(self, stage: str) -> None:
        """Per-epoch metrics of the subclass (computed and reset), logged with the shared ones."""

    @property
    def trie(self) -> SIDTrie:
        """Trie over the SID table, rebuilt only when the table changes, kept on the module's device."""
        return self._trie_cache.get(self.trie_sources(), self.build_trie, self.device)

    @property
    def recall_levels(self) -> int | None:
        """Levels decoded (``hparams.recall_levels``); None or a value >= the SID length: full SIDs."""
        levels = self.hparams.get("recall_levels")
        return None if levels is None else int(levels)

    @property
    def recall_trie(self) -> SIDTrie:
        """The trie decoding runs in: :attr:`trie`, or with ``recall_levels`` = p < L the trie of the first p
        levels, whose leaf (a decoded prefix) holds every item under it. Cached like :attr:`trie`."""
        full = self.trie
        levels = self.recall_levels
        if levels is None or levels >= full.num_levels:
            return full
        cache = self._prefix_tries.setdefault(levels, VersionedTrie())
        return cache.get(self.trie_sources(), lambda: self.build_prefix_trie(levels), self.device)

    def build_prefix_trie(self, levels: int) -> SIDTrie:
        """Trie over the first ``levels`` codes of every row of :meth:`sid_table`, leaves -> all their items."""
        codes, row_items = self.sid_table()
        _, vocab_sizes, _ = self.index_table()
        return SIDTrie.from_codes(codes[:, :levels].cpu(), list(vocab_sizes)[:levels], row_items=row_items.cpu())

    @property
    def prefix_scorer(self) -> PrefixItemScorer | None:
        """The item scorer of ``hparams.prefix_scorer`` (read once per path, checked against the SID table), or None."""
        path = self.hparams.get("prefix_scorer")
        if path is None:
            return None
        if self._prefix_scorer is None or self._prefix_scorer[0] != str(path):
            scorer = PrefixItemScorer.load(path)
            scorer.check_against(str(path), self.index_table()[2], int(self.model.d_model), self.recall_levels)
            self._prefix_scorer = (str(path), scorer)
        return self._prefix_scorer[1].to(self.device)

    def recall_pool(self, batch: dict[str, Tensor], output: BeamSearchOutput, max_items: int | None) -> RankedItems:
        """Recalled items (B, M) and scores of decoded beams: by beam (``beams_to_scored_items``), or with a
        :attr:`prefix_scorer` by beam score + weight * item score
        (:func:`~grcm.retriever.prefix_scorer.scored_prefix_pool`)."""
        scorer = self.prefix_scorer
        if scorer is None:
            return beams_to_scored_items(output, self.recall_trie, max_items, self.hparams.get("item_score", "max"))
        with self._inference():
            enc = self.model.encode(batch["input_ids"], batch["attention_mask"])
            states = prefix_states(self.model, enc, output.sequences)
            return scored_prefix_pool(output, self.recall_trie, states, scorer,
                                      float(self.hparams.get("prefix_scorer_weight", 0.5)), max_items,
                                      float(self.hparams.get("prefix_scorer_untrained_bonus", 0.0)))

    # --------------------------------------------------------------- inference
    @property
    def eval_max_items(self) -> int:
        """Ranked items kept per query: ``hparams.eval_max_items``, or the largest reported cut-off."""
        if self.hparams.eval_max_items is not None:
            return int(self.hparams.eval_max_items)
        return max(*self.hparams.ks, self.hparams.mrr_k)

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Every submodule in evaluation mode (no dropout) under ``torch.inference_mode``; restores the flags."""
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            for module, training in modes:
                module.training = training

    def decode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        beam_size: int | None = None,
        incremental: bool | None = None,
    ) -> BeamSearchOutput:
        """Beam search over SIDs: queries (B, T) -> beams (B, K, L) and scores (B, K).

        With ``recall_levels`` = p the beams are SID prefixes (B, K, p) in :attr:`recall_trie`.

        Args:
            input_ids, attention_mask: (B, T) query tokens and mask (True = real token).
            beam_size: K; None uses ``hparams.beam_size``.
            incremental: KV-cached decoding; None uses ``hparams.incremental_decoding``. False
                recomputes the full prefix each level (the reference: same beams and scores).
        """
        if beam_size is None:
            beam_size = self.hparams.beam_size
        elif int(beam_size) < 1:
            raise RetrieverConfigError(f"decode: beam_size must be >= 1 (or None for the default), got {beam_size}.")
        hparams = self.hparams
        incremental = hparams.get("incremental_decoding", True) if incremental is None else incremental
        trie = self.recall_trie  # built outside inference mode: it outlives this call
        quantization = hparams.get("inference_quantization", "none")
        with self._inference(), decode_precision(hparams.get("decode_precision", "32"), input_ids.device), \
                self._cpu_network.use(self.model, quantization, input_ids.device) as network:
            enc = network.encode(input_ids, attention_mask)
            step_fn = make_step_fn(
                network,
                enc,
                int(beam_size),
                incremental=incremental,
                compile=bool(incremental and hparams.get("compile_decoder", False)),
                cuda_graphs=bool(incremental and hparams.get("cuda_graphs", False)),
            )
            return constrained_beam_search(
                step_fn,
                batch_size=input_ids.shape[0],
                beam_size=int(beam_size),
                trie=trie,
                vocab_sizes=trie.vocab_sizes,
                constrained=hparams.get("constrained", True),
            )

    def retrieve(self, input_ids: Tensor, attention_mask: Tensor, max_items: int | None = None) -> Tensor:
        """Ranked items (B, M) padded with -1 for queries (B, T); M = ``max_items`` or :attr:`eval_max_items`."""
        output = self.decode(input_ids, attention_mask)
        if self.hparams.get("prefix_scorer") is not None:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
            return self.recall_pool(batch, output, max_items or self.eval_max_items).items
        with torch.inference_mode():
            return beams_to_items(output, self.recall_trie, max_items or self.eval_max_items)

    # -------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> dict[str, Any] | None:
        """Decode the batch once, update the metrics and return what was decoded (None: nothing to decode).

        Returns:
            ``{"candidates": (B, M) every item the beams recall, in beam order, -1 padded;
            "candidate_scores": (B, M) the log-probability of the beam that recalled each (with a
            ``prefix_scorer``: plus its weighted item score), -inf on padding;
            "beam_size": int; "recall_levels": int | None; "decode_seconds": float}``, the stage-1 pool that
            :class:`~grcm.rerank.two_stage.TwoStageEvaluation` reranks without decoding again.
        """
        if not self.can_decode:
            return None
        start = time.perf_counter()
        output = self.decode(batch["input_ids"], batch["attention_mask"])
        recalled = self.recall_pool(batch, output, self.hparams.get("max_pool_items"))
        ranked = fixed_width(recalled.items, self.eval_max_items)  # = beams_to_items(output, trie, eval_max_items)
        decode_seconds = time.perf_counter() - start
        self._decode_seconds += decode_seconds
        self._decoded_queries += ranked.shape[0]
        gold, query_ids = batch["gold_items"], batch["query_index"]
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(ranked, gold, query_ids)
        if self.recall_levels is not None:
            pool = self.val_pool if stage == "val" else self.test_pool
            pool.update({"pool_items": (recalled.items >= 0).sum(1),
                         "prefix_items": prefix_item_counts(output, self.recall_trie).to(recalled.items.device)},
                        query_ids)
        if self._seen_items is not None:
            groups = self.val_groups if stage == "val" else self.test_groups
            groups.update(ranked, candidate_recall(recalled.items, gold), gold, query_ids,
                          unseen_queries(gold, self._seen_items))
        self.evaluate_extra(batch, output, recalled, stage)
        return {
            "candidates": recalled.items,
            "candidate_scores": recalled.scores,
            "beam_size": int(self.hparams.beam_size),
            "recall_levels": self.recall_levels,
            "decode_seconds": decode_seconds,
        }

    def _start_epoch(self) -> None:
        self._decode_seconds, self._decoded_queries = 0.0, 0
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self._seen_items = seen_items_of(datamodule) if datamodule is not None else None

    def on_validation_epoch_start(self) -> None:
        self._start_epoch()

    def on_test_epoch_start(self) -> None:
        self._start_epoch()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any] | None:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any] | None:
        return self._evaluate(batch, "test")

    def _log_metrics(self, stage: str) -> None:
        if self._decoded_queries == 0:  # nothing was decoded (no SIDs yet): no metric to report
            return
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        # compute() gathers every rank's queries (de-duplicated by id): equal on all ranks, sync_dist keeps DDP quiet
        values = metrics.compute()
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, prog_bar=True, sync_dist=True)
        metrics.reset()
        if self.recall_levels is not None:
            pool = self.val_pool if stage == "val" else self.test_pool
            means, num_items = pool.compute(), self.index_table()[2]
            self.log_dict({f"{stage}/pool_items": means["pool_items"], f"{stage}/pool_share": means["pool_items"] / num_items,
                           f"{stage}/prefix_items": means["prefix_items"],
                           f"{stage}/prefix_share": means["prefix_items"] / num_items}, sync_dist=True)
            pool.reset()
        groups = self.val_groups if stage == "val" else self.test_groups
        grouped = groups.compute()  # every rank's queries: all ranks agree on whether there are unseen ones
        if float(grouped["unseen/queries"]) > 0:
            self.log_dict({f"{stage}/{name}": value for name, value in grouped.items()}, sync_dist=True)
        groups.reset()
        self.log_extra(stage)
        self.log(f"{stage}/queries_per_s", self._decoded_queries / max(self._decode_seconds, 1e-9), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        if self._decoded_queries:
            self.log("test/index_bytes_per_item", self.index_bytes_per_item(), sync_dist=True)

    def index_bytes_per_item(self) -> float:
        """Bytes per item of the generative index: the trie plus the SID table in narrow dtypes."""
        codes, vocab_sizes, num_items = self.index_table()
        return (self.trie.nbytes() + sid_table_nbytes(codes, vocab_sizes)) / max(num_items, 1)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """``{"query_index": (B,), "items": (B, M), "scores": (B, M)}`` ranked items with beam scores."""
        output = self.decode(batch["input_ids"], batch["attention_mask"])
        ranked = self.recall_pool(batch, output, self.eval_max_items)
        return {"query_index": batch["query_index"], "items": ranked.items, "scores": ranked.scores}
