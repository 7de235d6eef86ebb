"""Two-stage retrieval: generative recall, then dense rerank of the recalled pool (GRDR).

Stage 1 decodes the top-B semantic IDs of a query with constrained beam search
and expands them to items (the *candidates*); stage 2 scores only those
candidates with the dual-tower model (:class:`~grcm.rerank.dual_tower.DualTower`:
text tower against the item tower's embeddings) and re-ranks them. The dense
model never touches the rest of the corpus, so the work per query is
``B x items per SID`` dot products instead of ``N``.

The pieces, one module each:

* :mod:`grcm.rerank.candidate_rerank`: the pure, vectorised stage 2
  (:func:`rerank_candidates`, a gathered matmul ``item_embeddings[candidates] @ query``
  per query, optionally fused with the beam scores; :func:`count_candidates`;
  :func:`full_dense_ranking`, the reference).
* :mod:`grcm.rerank.rerank_store`: the same over a compact *rerank store*
  (:func:`build_rerank_store`, :func:`rerank_from_store`): the item embeddings live in a
  FAISS index (:class:`~grcm.rerank.index.DenseIndex` of kind ``flat``, ``sq8`` or ``pq``)
  and only the candidates are decoded from it (``reconstruct``) and scored. Two-stage
  storage is then the SID table + trie + the compressed store.
* :mod:`grcm.rerank.query_bridge`: feeds the dense model queries in its own vocabulary.
* this module, :class:`TwoStageEvaluation`: a Lightning callback that runs stage 2 behind
  the generative retriever's validation/test steps, on the candidates those
  steps already decoded, and logs item-level metrics (DDP-safe), the stage-1
  pool recall, the share of the corpus scored, the end-to-end latency and the
  bytes per item of the two-stage index. The functions above stay importable from here.

Why a callback rather than code inside ``GenerativeRetriever``: the dense model
is a separate, separately trained network with its own checkpoint. Keeping it
in a callback leaves the retriever's checkpoint, hyperparameters and training
loop untouched, and two-stage evaluation is switched on by one entry under
``trainer.callbacks`` in a config (the one flag), e.g.::

    trainer:
      callbacks:
        - class_path: grcm.rerank.two_stage.TwoStageEvaluation
          init_args:
            dense_checkpoint: runs/synthetic/dual_tower/checkpoints/best.ckpt
            rerank_store: {kind: pq, pq_m: 128, pq_bits: 4}   # or {kind: flat} / {kind: sq8}
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import Metric

from grcm.data.unseen_items import seen_items_of, unseen_queries
from grcm.errors import GrcmError
from grcm.metrics import (
    ItemRetrievalMetrics,
    PerQueryMeans,
    SeenUnseenMetrics,
    candidate_recall,
)
from grcm.rerank.candidate_rerank import (
    DEFAULT_MAX_GATHER_ELEMENTS,
    count_candidates,
    full_dense_ranking,
    rerank_candidates,
)
from grcm.rerank.dense_models import corpus_item_embeddings, dense_query_tokenizer, load_dense_model
from grcm.rerank.dual_tower import DualTower
from grcm.rerank.index import DenseIndex, DenseIndexConfig
from grcm.rerank.query_bridge import dense_query_inputs, dense_tokenizer_for
from grcm.rerank.rerank_store import build_rerank_store, check_rerank_store_kind, rerank_from_store
from grcm.rerank.stage1_pool import cap_pool, require_unique_last_level, stage1_pool

__all__ = [
    "PerQueryMeans",
    "TwoStageEvaluation",
    "build_rerank_store",
    "count_candidates",
    "full_dense_ranking",
    "rerank_candidates",
    "rerank_from_store",
]


class _Stopwatch:
    """Wall-clock seconds that wait for queued CUDA work, so GPU timings are real."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class TwoStageEvaluation(L.Callback):
    """Generative recall + dense rerank, evaluated behind a generative retriever's val/test steps.

    Per evaluation epoch the dual-tower checkpoint encodes every corpus item once
    and the embeddings are put in the rerank store, a FAISS index of kind
    ``rerank_store.kind`` (:func:`build_rerank_store`; each DDP rank keeps the
    whole store: candidates may be any item). Per batch the callback takes the
    stage-1 candidates, encodes the queries with the text tower, re-ranks the
    candidates with :func:`rerank_from_store` and updates DDP-safe metrics
    (de-duplicated by ``batch["query_index"]``).

    Decode once: the candidates are the ones the module's ``validation_step`` /
    ``test_step`` already decoded, returned as ``{"candidates": LongTensor (B, M),
    "candidate_scores": FloatTensor (B, M), "beam_size": int, "decode_seconds": float}``
    (every item recalled by the beams in beam order, ``-1`` padded, with the
    log-probability of the beam that recalled it;
    :class:`~grcm.retriever.module.GenerativeRetriever` does this; ``candidate_scores``
    is needed only for score fusion). ``decode_seconds`` (optional) is the stage-1 time of the batch;
    without it the time from batch start to batch end is used, an upper bound.
    When this callback's ``beam_size`` differs from the step's, evaluation stops
    with a :class:`~grcm.errors.GrcmError`: the top beams of a wider search are
    not the beams of a narrower one, so neither result can be derived from the
    other; set the retriever's ``beam_size`` (``model.init_args.beam_size``) to
    the two-stage beam, or leave this callback's ``beam_size`` unset to follow it.
    Only a module whose steps return no candidates is decoded by the callback
    (``pl_module.decode(input_ids, attention_mask, beam_size=...)`` and ``pl_module.trie``).

    Logged at epoch end, under ``{stage}/{name}/`` (``stage`` = ``val`` or ``test``, ``name``
    = ``two_stage`` unless set; several callbacks with different names and stores compare
    the stores on one decode):
    ``recall@k`` and ``mrr@{mrr_k}`` after rerank; ``beam_size``; ``candidate_recall@{beam_size}``
    (a gold item is anywhere in the pool, item-level); ``candidates_per_query``
    (distinct items scored); ``corpus_fraction_scored`` (that over N);
    ``latency_ms_per_query`` and ``queries_per_s`` (stage 1 + stage 2, this rank's
    wall clock, averaged over ranks); ``stage1_ms_per_query`` and
    ``rerank_ms_per_query``; ``stage1_recall@k`` / ``stage1_mrr@k`` (the
    generative order of the same pool); ``rerank_store_bytes_per_item`` (the serialised
    store over N: codes plus codebooks/header), ``rerank_store_code_bytes_per_item``
    (one item's code alone, what the store costs per item as N grows) and
    ``index_bytes_per_item`` (the store plus ``pl_module.index_bytes_per_item()``
    when the module has it: SID table + trie + store, the whole two-stage index);
    and, with ``full_dense_reference``, ``full_dense_recall@k`` / ``full_dense_mrr@k``
    (the same dense model with exact float32 embeddings over all N items, not timed)
    and ``recall@1_vs_full_dense`` (their ratio); ``generative_weight``; ``recall_levels`` (0: full SIDs);
    and, when some queries' gold items have no training query (:mod:`grcm.data.unseen_items`),
    ``seen/*`` and ``unseen/*``: ``recall@k``, ``mrr@k`` after rerank, ``candidate_recall`` and ``queries``.

    Prefix recall (``recall_levels`` = p): the retriever decodes only the first p SID levels and each
    decoded prefix brings every item under it into the pool (:mod:`grcm.retriever.sid_retrieval`). Like
    ``beam_size`` it is the retriever's (``model.init_args.recall_levels``); this callback's value, when
    set, must equal it. ``max_pool_items`` caps the pool reranked (distinct items, best beams first).

    Score fusion (``generative_weight`` w > 0): each candidate is ranked by
    ``<query, item> + w * log p(SID | query)`` instead of the dense score alone
    (:func:`rerank_candidates`). The reranker alone can beat full dense retrieval
    only by leaving out a wrong item it would rank first; the fused score also lets
    the generative model's confidence reorder the pool. Pick w on the validation
    split (several callbacks with different ``name`` s score one decode). The log-probability is the
    retriever's item score: with ``item_score: logsumexp`` (GRDR's views) the log-sum-exp over the beams that
    reach the item, else its best beam's. ``exclude_unique_level`` leaves ACE's unique (counter) token out of it:
    that code only numbers the items of one colliding prefix, so its probability says nothing about the query;
    the callback then decodes the batch again (the step's scores include the level) and logs
    ``exclude_unique_level`` = 1.

    Args:
        dense_checkpoint: path of a :class:`~grcm.rerank.dual_tower.DualTower` or
            :class:`~grcm.rerank.hybrid_tower.HybridTower` checkpoint trained on the same corpus and
            query vocabulary.
        beam_size: stage-1 beam width B (GRDR: 20-50 on a full corpus; ACE: 5/25/50); it must
            equal the retriever's ``beam_size``. ``None`` (default) takes the retriever's.
        rerank_store: FAISS index holding the item embeddings, a
            :class:`~grcm.rerank.index.DenseIndexConfig` (or its dict) of kind ``flat``
            (float32, exact; the default), ``sq8`` (8-bit scalar quantiser, 1/4 of flat)
            or ``pq`` (product quantiser with ``pq_m`` sub-quantisers of ``pq_bits`` bits).
        ks: ``recall@k`` cut-offs.
        mrr_k: ``mrr@k`` cut-off.
        full_dense_reference: also rank the whole corpus with the dense model (a reference, O(N) per query).
        name: the metric namespace, ``{stage}/{name}/...``.
        max_gather_elements: memory bound of the gathered matmul (see :func:`rerank_candidates`).
        generative_weight: w >= 0, the weight of the stage-1 log-probability in the fused score;
            0 (default) is the pure dense rerank.
        recall_levels: SID levels stage 1 decodes (prefix recall); None follows the retriever.
        max_pool_items: rerank at most this many distinct candidates per query; None: the whole pool.
        exclude_unique_level: fuse log p(SID prefix | query) without the unique token's level (needs
            ``generative_weight`` > 0 and a retriever whose SID bundle ends with the ``unique`` level).
    """

    def __init__(
        self,
        dense_checkpoint: str,
        beam_size: int | None = None,
        rerank_store: DenseIndexConfig | Mapping[str, Any] | None = None,
        ks: Sequence[int] = (1, 5, 10),
        mrr_k: int = 10,
        full_dense_reference: bool = True,
        max_gather_elements: int = DEFAULT_MAX_GATHER_ELEMENTS,
        name: str = "two_stage",
        generative_weight: float = 0.0,
        recall_levels: int | None = None,
        max_pool_items: int | None = None,
        exclude_unique_level: bool = False,
    ) -> None:
        super().__init__()
        for flag, value in (("recall_levels", recall_levels), ("max_pool_items", max_pool_items)):
            if value is not None and int(value) < 1:
                raise GrcmError(f"TwoStageEvaluation.{flag} must be >= 1 (or unset), got {value}")
        self.recall_levels = None if recall_levels is None else int(recall_levels)
        self.max_pool_items = None if max_pool_items is None else int(max_pool_items)
        if not name or "/" in name:
            raise GrcmError(f"TwoStageEvaluation.name must be a non-empty word without '/', got {name!r}")
        self.name = name
        if beam_size is not None and int(beam_size) < 1:
            raise GrcmError(f"TwoStageEvaluation.beam_size must be >= 1 (or unset), got {beam_size}")
        if isinstance(rerank_store, Mapping):
            rerank_store = DenseIndexConfig(**rerank_store)
        self.rerank_store_config = rerank_store or DenseIndexConfig()
        check_rerank_store_kind(self.rerank_store_config)
        self.dense_checkpoint = str(dense_checkpoint)
        generative_weight = float(generative_weight)
        if not generative_weight >= 0.0 or generative_weight == float("inf"):
            raise GrcmError(
                f"TwoStageEvaluation.generative_weight must be a finite number >= 0 (0 = pure dense rerank), "
                f"got {generative_weight}"
            )
        self.generative_weight = generative_weight
        self.exclude_unique_level = bool(exclude_unique_level)
        if self.exclude_unique_level and generative_weight == 0.0:
            raise GrcmError("TwoStageEvaluation.exclude_unique_level changes the fused score only; set "
                            "generative_weight > 0 (or exclude_unique_level: false)")
        self.beam_size = None if beam_size is None else int(beam_size)
        self.ks = tuple(int(k) for k in ks)
        self.mrr_k = int(mrr_k)
        self.full_dense_reference = bool(full_dense_reference)
        self.max_gather_elements = int(max_gather_elements)
        self.depth = max(*self.ks, self.mrr_k)
        self.dense: DualTower | None = None
        self.item_embeddings: Tensor | None = None  # float32 (N, E), kept only for the full-dense reference
        self.store: DenseIndex | None = None
        self._epoch_beam: int | None = None  # the beam of this epoch's candidates
        self._dense_tokenizer: Any = None  # set per epoch: the dense model's tokenizer when it differs
        self._dense_checkpoint_tokenizer: Any = None  # the dense checkpoint's tokenizer, set with the model
        self.final_metrics = ItemRetrievalMetrics(ks=self.ks, mrr_k=self.mrr_k)
        self.stage1_metrics = ItemRetrievalMetrics(ks=self.ks, mrr_k=self.mrr_k)
        self.full_dense_metrics = ItemRetrievalMetrics(ks=self.ks, mrr_k=self.mrr_k)
        self.pool_metrics = PerQueryMeans(["candidate_recall", "candidates_per_query", "corpus_fraction_scored"])
        self.group_metrics = SeenUnseenMetrics(ks=self.ks, mrr_k=self.mrr_k)
        self._seen_items: Tensor | None = None
        self.clock = _Stopwatch(torch.device("cpu"))
        self._reset_timers()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------ set-up
    def load_dense_model(self) -> DualTower:
        """The dense model of ``dense_checkpoint``: a dual or hybrid tower (loaded once, tensors only, frozen,
        eval mode)."""
        if self.dense is None:
            path = Path(self.dense_checkpoint)
            if not path.is_file():
                raise FileNotFoundError(
                    f"TwoStageEvaluation.dense_checkpoint: no checkpoint at {path}; train the dual tower first "
                    "(grcm fit -c experiments/<dataset>/dual_tower.yaml) and point dense_checkpoint at its "
                    "checkpoint file"
                )
            self.dense = load_dense_model(path)  # DualTower or HybridTower, as the checkpoint records
            # the vocabulary the dense model reads, found in its checkpoint once (not at every epoch)
            self._dense_checkpoint_tokenizer = dense_query_tokenizer(path, int(self.dense.hparams.vocab_size))
        return self.dense

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.load_dense_model()

    def _reset_timers(self) -> None:
        self._stage1_seconds = 0.0
        self._rerank_seconds = 0.0
        self._timed_queries = 0
        self._batch_started = 0.0

    def _corpus(self, trainer: L.Trainer) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        corpus = getattr(datamodule, "corpus", None)
        if corpus is None:
            raise RuntimeError(
                "TwoStageEvaluation reads the item features from trainer.datamodule.corpus; evaluate with a "
                "RetrievalDataModule (trainer.validate/test(model, datamodule=...)), not bare dataloaders"
            )
        return corpus

    def _check_compatible(self, trainer: L.Trainer, corpus: Any) -> None:
        hparams = self.dense.hparams
        if int(hparams.feature_dim) != int(corpus.feature_dim):
            raise ValueError(
                f"the dense checkpoint {self.dense_checkpoint} encodes {hparams.feature_dim}-d item features but "
                f"corpus {corpus.name!r} has {corpus.feature_dim}-d features; train the dual tower on this corpus"
            )
        # None when the batches' ids are in the dense model's vocabulary, else its tokenizer (re-tokenizes)
        self._dense_tokenizer = dense_tokenizer_for(
            trainer.datamodule, self._dense_checkpoint_tokenizer, int(hparams.vocab_size)
        )

    @torch.no_grad()
    def _start_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.exclude_unique_level:
            require_unique_last_level(pl_module)
        corpus = self._corpus(trainer)
        dense = self.load_dense_model().to(pl_module.device)
        self._check_compatible(trainer, corpus)
        embeddings = corpus_item_embeddings(dense, corpus)  # (N, E) float32; token features for a hybrid tower
        self.store = build_rerank_store(embeddings, self.rerank_store_config)
        self.item_embeddings = torch.from_numpy(embeddings).to(pl_module.device) if self.full_dense_reference else None
        self._epoch_beam = None
        self._seen_items = seen_items_of(trainer.datamodule)
        self.clock = _Stopwatch(pl_module.device)
        for metric in self._metrics():
            metric.to(pl_module.device)
            metric.reset()
        self._reset_timers()

    def _metrics(self) -> list[Metric]:
        return [self.final_metrics, self.stage1_metrics, self.full_dense_metrics, self.pool_metrics, self.group_metrics]

    # ------------------------------------------------------------------ per batch
    def _candidates(
        self, pl_module: L.LightningModule, outputs: Any, batch: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor | None, float, int]:
        """Stage-1 candidates (B, M), their beam scores (B, M) when known, the stage-1 seconds and the beam size
        (:func:`~grcm.rerank.stage1_pool.stage1_pool`)."""
        return stage1_pool(pl_module, outputs, batch, beam_size=self.beam_size, recall_levels=self.recall_levels,
                           generative_weight=self.generative_weight, now=self.clock.now,
                           batch_started=self._batch_started, exclude_last_level=self.exclude_unique_level)

    @torch.no_grad()
    def _evaluate_batch(self, pl_module: L.LightningModule, outputs: Any, batch: Mapping[str, Tensor]) -> None:
        candidates, candidate_scores, stage1_seconds, beam = self._candidates(pl_module, outputs, batch)
        if self._epoch_beam is not None and beam != self._epoch_beam:
            raise GrcmError(
                f"{type(pl_module).__name__} decoded batches of one epoch with beam sizes {self._epoch_beam} and "
                f"{beam}; two-stage metrics need one beam size per epoch"
            )
        self._epoch_beam = beam
        device = pl_module.device
        candidates = candidates.to(device).long()
        candidates, candidate_scores = cap_pool(candidates, candidate_scores, self.max_pool_items)
        start = self.clock.now()
        corpus = pl_module.trainer.datamodule.corpus
        queries = self.dense.encode_queries(*dense_query_inputs(batch, self._dense_tokenizer, corpus))
        ranked, _ = rerank_from_store(
            queries, candidates, self.store, self.depth, self.max_gather_elements, candidate_scores,
            self.generative_weight,
        )
        rerank_seconds = self.clock.now() - start
        self._stage1_seconds += stage1_seconds
        self._rerank_seconds += rerank_seconds
        self._timed_queries += candidates.shape[0]

        gold, query_ids = batch["gold_items"].to(device), batch["query_index"]
        self.final_metrics.update(ranked, gold, query_ids)
        self.stage1_metrics.update(candidates, gold, query_ids)
        if self.full_dense_reference:
            full = full_dense_ranking(queries, self.item_embeddings, self.depth)
            self.full_dense_metrics.update(full, gold, query_ids)
        scored = count_candidates(candidates)
        if self._seen_items is not None:
            self.group_metrics.update(ranked, candidate_recall(candidates, gold), gold, query_ids,
                                      unseen_queries(gold, self._seen_items))
        self.pool_metrics.update(
            {
                "candidate_recall": candidate_recall(candidates, gold),
                "candidates_per_query": scored,
                "corpus_fraction_scored": scored.float() / self.store.num_items,
            },
            query_ids,
        )

    # ------------------------------------------------------------------ epoch end
    def _log_epoch(self, pl_module: L.LightningModule, stage: str) -> None:
        prefix = f"{stage}/{self.name}/"
        final = self.final_metrics.compute()
        values: dict[str, Tensor | float] = dict(final)
        pool = self.pool_metrics.compute()
        beam = self._epoch_beam if self._epoch_beam is not None else (self.beam_size or 0)
        values[f"candidate_recall@{beam}"] = pool.pop("candidate_recall")
        values.update(pool)
        values["beam_size"] = float(beam)
        values["generative_weight"] = self.generative_weight
        if self.exclude_unique_level:
            values["exclude_unique_level"] = 1.0
        values["recall_levels"] = float(self.recall_levels or getattr(pl_module, "recall_levels", None) or 0)
        grouped = self.group_metrics.compute()
        if float(grouped["unseen/queries"]) > 0:
            values.update(grouped)
        values.update({f"stage1_{name}": value for name, value in self.stage1_metrics.compute().items()})
        if self.full_dense_reference:
            dense = self.full_dense_metrics.compute()
            values.update({f"full_dense_{name}": value for name, value in dense.items()})
            first = f"recall@{self.ks[0]}"
            values[f"{first}_vs_full_dense"] = final[first] / dense[first].clamp(min=1e-12)
        queries = max(self._timed_queries, 1)
        total = self._stage1_seconds + self._rerank_seconds
        values["latency_ms_per_query"] = 1e3 * total / queries
        values["queries_per_s"] = self._timed_queries / max(total, 1e-9)
        values["stage1_ms_per_query"] = 1e3 * self._stage1_seconds / queries
        values["rerank_ms_per_query"] = 1e3 * self._rerank_seconds / queries
        values["rerank_store_bytes_per_item"] = float(self.store.bytes_per_item)
        values["rerank_store_code_bytes_per_item"] = float(self.store.code_bytes_per_item)
        generative_bytes = getattr(pl_module, "index_bytes_per_item", None)
        values["index_bytes_per_item"] = values["rerank_store_bytes_per_item"] + (
            float(generative_bytes()) if callable(generative_bytes) else 0.0
        )
        for name, value in values.items():
            value = value if isinstance(value, Tensor) else torch.tensor(value, device=pl_module.device)
            pl_module.log(prefix + name, value.float(), sync_dist=True, prog_bar=name == f"recall@{self.ks[0]}")
        for metric in self._metrics():
            metric.reset()
        self.item_embeddings = None
        self.store = None

    # ------------------------------------------------------------------ Lightning hooks
    # validation and test run the same two-stage evaluation; only the logged prefix differs
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_epoch(trainer, pl_module)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_started = self.clock.now()

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluate_batch(pl_module, outputs, batch)

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_start = on_validation_batch_start
    on_test_batch_end = on_validation_batch_end

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch(pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch(pl_module, "test")
