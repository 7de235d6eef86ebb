"""GRDR: multi-view query-guided SIDs whose codebooks are the generative retriever's vocabulary, trained jointly.

One LightningModule holds a :class:`~grcm.tokenizers.multiview.MultiViewTokenizer`
and a :class:`~grcm.retriever.model.GenerativeRetrieverModel`. With
``shared_codebook`` the tokenizer's level-l codebook ``E_l`` (K, d) *is* the
decoder's level-l input embedding table and its output head computes
``s * cos(h, E_l)`` with a learned ``s`` clamped to [20, 100]
(:class:`CosineCodeHead`); one Parameter, trained by both the tokenizer losses
and the retrieval loss.

Training follows :mod:`grcm.retriever.phases` (level by level: pre-train,
K-Means init of the new codebook, main, fit with the tokenizer frozen). A train
query of item i routed to view v (:mod:`grcm.tokenizers.query_routing`) is
trained to decode the current SID of (i, v); targets are recomputed from the
tokenizer on every step, so they follow the codebooks while those train.
``train/code_drift`` is the share of items whose earlier-level codes changed
since the previous epoch.

Decoding: the trie holds all V SIDs of every item (``N * V`` rows); a decoded SID
expands to all its items. Ranking tie-break: items are ordered by the score of
the best beam that reaches them; the items of one SID share its score and are
listed in ascending item index (the trie's leaf order); an item recalled through
several views keeps its best position. With the two-stage callback the dense
score resolves these ties. Metrics are item-level only: ``recall@k``/``mrr@k``
over the ranked items, ``candidate_recall@{10,50,100}`` (the gold item is within
the first k items of the expanded pool) and ``pool_size`` (distinct items the
beams expand to).

The SID table, routes, item ids and health travel inside every checkpoint: a
checkpoint alone decodes (``GRDRRetriever.load_from_checkpoint(path).retrieve(...)``).
The phase follows from the epoch; the built levels, anchor codes, routes and the
codes ``train/code_drift`` compares with are checkpointed, so a fit resumed with
``--ckpt_path`` continues in the same phase with the same frozen parameters.

DDP: the query embeddings and routes (in ``setup``), each level's K-Means
initialisation and the ``nearest`` re-routing are computed on rank 0 and broadcast,
so every replica holds the same state (:class:`grcm.ddp.ReplicaConsistencyCheck`).
Phases freeze parameter groups and some phases leave parameters out of the loss, so
under a DDP strategy the module turns on DDP's ``find_unused_parameters`` unless the
strategy sets it. Evaluation is sharded by query; every metric, ``pool_size``
included, counts each query id once (DDP pads the last shard with repeats).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from grcm.ddp import broadcast_from_rank_zero, is_rank_zero
from grcm.decoding import (
    SIDTrie,
    beams_to_items,
    beams_to_scored_items,
    constrained_beam_search,
    sid_table_nbytes,
)
from grcm.decoding.beam import BeamSearchOutput
from grcm.errors import GrcmError
from grcm.metrics import ItemRetrievalMetrics, PerQueryMeans, fixed_width
from grcm.rerank.text_encoder import masked_mean
from grcm.retriever.model import GenerativeRetrieverModel
from grcm.retriever.phases import GROUPS, TRAINABLE, Phase, build_schedule, phase_at, resolve_weights
from grcm.retriever.schedule import warmup_cosine_restarts
from grcm.tokenizers.multiview import MultiViewTokenizer, code_usage_balance, multiview_health, view_infonce
from grcm.tokenizers.query_routing import (
    QUERY_ENCODERS,
    ROUTINGS,
    cluster_routes,
    embed_queries,
    nearest_view_routes,
    random_routes,
)

CHECKPOINT_KEY = "grdr_sid_table"
SEPARATIONS = ("infonce", "balance", "both", "none")
CANDIDATE_KS = (10, 50, 100)


class CosineCodeHead(nn.Module):
    """Logits ``s * cos(h, E)`` over a (K, d) codebook ``E`` shared with the tokenizer; s learned, clamped.

    Args:
        codebook: the shared (K, d) Parameter.
        init_scale, min_scale, max_scale: s at start and its clamp range (GRDR: [20, 100]).
    """

    def __init__(self, codebook: nn.Parameter, init_scale: float = 30.0, min_scale: float = 20.0,
                 max_scale: float = 100.0) -> None:
        super().__init__()
        self.codebook = codebook
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.min_scale, self.max_scale = min_scale, max_scale

    @property
    def scale(self) -> Tensor:
        return self.log_scale.exp().clamp(self.min_scale, self.max_scale)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B', d) -> (B', K)."""
        return self.scale * F.normalize(hidden, dim=-1) @ F.normalize(self.codebook, dim=-1).T


class GRDRRetriever(L.LightningModule):
    """Multi-view tokenizer + generative retriever with a shared codebook, trained in phases.

    Args:
        vocab_size, pad_token_id, feature_dim: linked from the data module.
        num_views: V SIDs per item (1: the single-view ablation).
        num_levels, codebook_size: L levels of K codes.
        d_model: retriever width, also the tokenizer latent / codebook width.
        tokenizer_hidden: hidden width of the view MLPs.
        beta: VQ commitment weight (GRDR 0.65).
        shared_codebook: tie codebooks to the decoder's embeddings and heads (False: the
            "unshared" ablation, the decoder keeps its own tables and linear heads).
        routing: ``cluster`` (K-Means of the item's queries), ``nearest`` (closest view,
            re-routed every epoch, clustered at first) or ``random`` (no query guidance).
        query_encoder: ``minilm`` or ``minilm_static`` (see :func:`embed_queries`).
        view_separation: ``infonce`` (multi-positive query -> view InfoNCE on the guidance
            embeddings), ``balance`` (per-view level-0 code-usage balancing), ``both`` (their sum)
            or ``none``.
        separation_weight: its weight, in every phase where the tokenizer trains.
        schedule, pretrain_epochs, main_epochs, fit_epochs: see :mod:`grcm.retriever.phases`.
        phase_weights: per-phase loss-weight overrides, e.g. ``{"main": {"sid": 1.0}}``.
        label_smoothing: SID cross-entropy label smoothing.
        temperature: InfoNCE temperature.
        num_heads, num_encoder_layers, num_decoder_layers, ffn_dim, dropout, fusion, max_query_len:
            the retriever's shape (:class:`GenerativeRetrieverModel`).
        beam_size: beams; eval_max_items: ranked items kept per query.
        lr, warmup_epochs, min_lr, weight_decay: Adam and its warm-up + cosine schedule.
        seed: K-Means and routing seed.
        ks, mrr_k: reported cut-offs.
    """

    #: arguments that ``grcm test/validate/predict --ckpt_path=...`` may change (decoding and reporting only)
    EVAL_OVERRIDABLE = ("beam_size", "eval_max_items", "ks", "mrr_k")

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        pad_token_id: int = 0,
        num_views: int = 4,
        num_levels: int = 3,
        codebook_size: int = 128,
        d_model: int = 64,
        tokenizer_hidden: int = 256,
        beta: float = 0.65,
        shared_codebook: bool = True,
        routing: str = "cluster",
        query_encoder: str = "minilm",
        view_separation: str = "infonce",
        separation_weight: float = 0.5,
        schedule: str = "joint",
        pretrain_epochs: int | list[int] = 1,
        main_epochs: int | list[int] = 1,
        fit_epochs: int | list[int] = 1,
        phase_weights: Mapping[str, Mapping[str, float]] | None = None,
        label_smoothing: float = 0.1,
        temperature: float = 0.1,
        num_heads: int = 4,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 2,
        ffn_dim: int = 256,
        dropout: float = 0.1,
        fusion: str = "ace",
        max_query_len: int = 64,
        beam_size: int = 25,
        eval_max_items: int | None = None,
        lr: float = 3e-3,
        warmup_epochs: float = 0.3,
        min_lr: float = 1e-5,
        weight_decay: float = 0.0,
        seed: int = 0,
        ks: Sequence[int] = (1, 5, 10),
        mrr_k: int = 10,
    ) -> None:
        super().__init__()
        for name, value, choices in (("routing", routing, ROUTINGS), ("query_encoder", query_encoder, QUERY_ENCODERS),
                                     ("view_separation", view_separation, SEPARATIONS)):
            if value not in choices:
                raise GrcmError(f"model.{name}={value!r} is not one of {list(choices)}.")
        self.save_hyperparameters()
        self.phases = build_schedule(num_levels, schedule, pretrain_epochs, main_epochs, fit_epochs)
        self.weights = resolve_weights(phase_weights)
        self.tokenizer = MultiViewTokenizer(
            feature_dim, num_views, num_levels, codebook_size, d_model, tokenizer_hidden, beta
        )
        self.model = GenerativeRetrieverModel(
            vocab_size=vocab_size, sid_vocab_sizes=self.tokenizer.vocab_sizes, d_model=d_model,
            num_heads=num_heads, num_encoder_layers=num_encoder_layers, num_decoder_layers=num_decoder_layers,
            ffn_dim=ffn_dim, dropout=dropout, fusion=fusion, max_query_len=max_query_len,
            pad_token_id=pad_token_id,
        )
        if shared_codebook:
            codebooks = list(self.tokenizer.codebooks)
            self.model.share_codebooks(codebooks, [CosineCodeHead(codebook) for codebook in codebooks])
        self.query_head = nn.Linear(d_model, d_model)
        # SID table and training state (resized from the data in setup, or from a checkpoint)
        self.register_buffer("sid_codes", torch.zeros(0, num_views, num_levels, dtype=torch.long))
        self.register_buffer("anchor_codes", torch.zeros(0, num_views, num_levels, dtype=torch.long))
        self.register_buffer("query_routes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("initialised_levels", torch.zeros((), dtype=torch.long))
        self.register_buffer("anchored_phase", torch.full((), -1, dtype=torch.long))
        self._extras: dict[str, Any] = {}
        self.features: Tensor | None = None
        self.query_embeddings: Tensor | None = None
        self.query_item: Tensor | None = None
        self._previous_codes: Tensor | None = None
        self._current_phase: int | None = None
        self._trie: SIDTrie | None = None
        self._trie_key: tuple | None = None
        self.val_metrics = ItemRetrievalMetrics(ks=ks, mrr_k=mrr_k)
        self.test_metrics = ItemRetrievalMetrics(ks=ks, mrr_k=mrr_k)
        self.val_pool = ItemRetrievalMetrics(ks=CANDIDATE_KS, mrr_k=10)
        self.test_pool = ItemRetrievalMetrics(ks=CANDIDATE_KS, mrr_k=10)
        self.val_pool_size, self.test_pool_size = PerQueryMeans(["pool_size"]), PerQueryMeans(["pool_size"])
        self._decode_seconds, self._decoded_queries = 0.0, 0

    # ------------------------------------------------------------ parameter groups
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The four groups of :data:`grcm.retriever.phases.GROUPS`, every parameter in exactly one."""
        codebooks = list(self.tokenizer.codebooks)
        shared = {id(p) for p in codebooks}
        model = self.model
        encoder_modules = [model.token_embedding, model.position_embedding, model.encoder_layers,
                           model.encoder_norms, self.query_head]
        encoder = {id(p): p for module in encoder_modules for p in module.parameters()}
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUPS}
        groups["codebooks"] = codebooks
        groups["tokenizer"] = [p for p in self.tokenizer.parameters() if id(p) not in shared]
        groups["encoder"] = list(encoder.values())
        groups["decoder"] = [p for p in model.parameters() if id(p) not in shared and id(p) not in encoder]
        return groups

    def apply_phase(self, phase: Phase) -> None:
        """Set ``requires_grad`` of every parameter group as :data:`TRAINABLE` says for ``phase``."""
        trainable = TRAINABLE[phase.name]
        for name, params in self.parameter_groups().items():
            for param in params:
                param.requires_grad_(trainable[name])

    def phase_of_epoch(self, epoch: int) -> Phase:
        return phase_at(self.phases, epoch)

    @property
    def decode_levels(self) -> int:
        """SID levels built so far (all L after training)."""
        return int(self.initialised_levels)

    # ------------------------------------------------------------------- data
    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def _prepare_ddp(self) -> None:
        """Before DDP wraps the module: every parameter trainable, unused-parameter detection on.

        DDP registers the parameters that require grad when it wraps the module; phases then
        freeze groups (and ``pretrain`` leaves the decoder out of the loss), so DDP must look for
        unused parameters. An explicit ``find_unused_parameters`` in the strategy is kept.
        """
        for param in self.parameters():
            param.requires_grad_(True)
        strategy = self.trainer.strategy
        options = getattr(strategy, "_ddp_kwargs", None)
        if isinstance(strategy, DDPStrategy) and isinstance(options, dict):
            options.setdefault("find_unused_parameters", True)

    def setup(self, stage: str) -> None:
        """Read item features and (for fit) embed and route the training queries."""
        if stage == "fit" and self._trainer is not None:
            self._prepare_ddp()
        datamodule = self._datamodule()
        corpus = getattr(datamodule, "corpus", None)
        if corpus is None:
            return
        item_ids = self._extras.get("item_ids")
        if item_ids is not None and list(corpus.item_ids) != list(item_ids):
            raise GrcmError(
                f"this GRDR checkpoint was trained on {len(item_ids)} items that differ from the "
                f"{len(corpus.item_ids)} items of corpus {corpus.name!r}; evaluate it on its own corpus."
            )
        self._extras["item_ids"] = list(corpus.item_ids)
        self.features = torch.as_tensor(np.asarray(corpus.features, dtype=np.float32))
        n, views, levels = corpus.num_items, self.hparams.num_views, self.hparams.num_levels
        if self.sid_codes.shape[0] != n:
            self.sid_codes = torch.zeros(n, views, levels, dtype=torch.long, device=self.device)
            self.anchor_codes = torch.zeros(n, views, levels, dtype=torch.long, device=self.device)
        if stage == "fit":
            self._prepare_queries(datamodule, corpus)

    def _prepare_queries(self, datamodule: Any, corpus: Any) -> None:
        """Embed and route every training query: computed on rank 0, broadcast to the other ranks."""
        train = datamodule.query_batches("train")
        query_index = train.query_index.numpy()
        item = train.item_index.numpy()
        size = int(query_index.max()) + 1
        need_embeddings = self.hparams.routing != "random" or self.hparams.view_separation in ("infonce", "both")
        embeddings = routes = None
        if is_rank_zero(self):
            if need_embeddings:
                offset = len(corpus.caption_text)
                texts = [corpus.caption_text[q] if q < offset else corpus.extra_text[q - offset] for q in query_index]
                embeddings = embed_queries(texts, self.hparams.query_encoder)
            if self.hparams.routing == "random":
                routes = random_routes(item, self.hparams.num_views, self.hparams.seed)
            else:
                routes = cluster_routes(embeddings, item, self.hparams.num_views, self.hparams.seed)
        embeddings, routes = broadcast_from_rank_zero(self, (embeddings, routes))
        table = torch.full((size,), -1, dtype=torch.long)
        table[torch.from_numpy(query_index)] = torch.from_numpy(routes)
        self.query_routes = table.to(self.device)
        self.query_item = torch.full((size,), -1, dtype=torch.long)
        self.query_item[torch.from_numpy(query_index)] = torch.from_numpy(item)
        if embeddings is not None:
            full = torch.zeros(size, embeddings.shape[1])
            full[torch.from_numpy(query_index)] = torch.from_numpy(embeddings)
            self.query_embeddings = full

    def _features_on_device(self) -> Tensor:
        if self.features is None:
            raise GrcmError("GRDRRetriever needs the corpus features: train it with a RetrievalDataModule.")
        if self.features.device != self.device:
            self.features = self.features.to(self.device)
        return self.features

    # --------------------------------------------------------------- phases
    def _enter_phase(self) -> Phase:
        """Freeze and unfreeze the parameter groups for the current epoch's phase."""
        phase = self.phase_of_epoch(self.current_epoch)
        self.apply_phase(phase)
        if phase.index != self._current_phase:
            rank_zero_info(f"GRDR {phase}: losses {self.weights[phase.name]}, trainable {TRAINABLE[phase.name]}")
            self._current_phase = phase.index
        return phase

    def on_train_start(self) -> None:
        """A fit resumed mid-epoch skips ``on_train_epoch_start``: enter the phase of the epoch it resumes in.

        The rest of the epoch-start work (K-Means of a new level, anchor snapshot, re-routing) was
        done before the checkpoint was written and travels in it (``initialised_levels``,
        ``anchored_phase``, ``anchor_codes``, ``query_routes``).
        """
        self._enter_phase()

    def on_train_epoch_start(self) -> None:
        phase = self._enter_phase()
        features = self._features_on_device()
        if phase.initialises_level and self.decode_levels <= phase.level:
            codebook = self.tokenizer.codebooks[phase.level]
            centroids = None
            if is_rank_zero(self):
                self.tokenizer.init_level(features, phase.level, seed=self.hparams.seed + phase.level)
                centroids = codebook.detach().cpu()
            centroids = broadcast_from_rank_zero(self, centroids)
            codebook.data.copy_(centroids.to(codebook))
            self.initialised_levels.fill_(phase.level + 1)
            rank_zero_info(f"GRDR: level-{phase.level} codebook K-Means-initialised from its residuals")
        if int(self.anchored_phase) < phase.index:  # snapshot once per phase (kept across resumes)
            self._refresh_codes()
            self.anchor_codes.copy_(self.sid_codes)
            self.anchored_phase.fill_(phase.index)
        if self.hparams.routing == "nearest" and self.decode_levels > 0 and self.query_embeddings is not None:
            self._reroute_nearest()

    @torch.no_grad()
    def _reroute_nearest(self) -> None:
        """Route each query to its item's closest view: computed on rank 0, broadcast."""
        known = (self.query_item >= 0).nonzero().flatten()
        routes = None
        if is_rank_zero(self):
            queries = self.tokenizer.query_projection(self.query_embeddings[known].to(self.device))
            views = self.tokenizer.view_latents(self._features_on_device()[self.query_item[known].to(self.device)])
            routes = nearest_view_routes(queries, views).cpu()
        routes = broadcast_from_rank_zero(self, routes)
        self.query_routes[known.to(self.device)] = routes.to(self.device)

    @torch.no_grad()
    def _refresh_codes(self) -> Tensor:
        """Recompute the SID table (N, V, L) from the tokenizer for the levels built so far."""
        levels = self.decode_levels
        if levels:
            self.sid_codes[:, :, :levels] = self.tokenizer.encode(self._features_on_device(), levels)
        return self.sid_codes

    def on_train_epoch_end(self) -> None:
        levels = self.decode_levels
        codes = self._refresh_codes()[:, :, :levels].clone()
        previous = self._previous_codes
        if previous is not None and 0 < previous.shape[-1] <= levels:
            earlier = previous.shape[-1]
            changed = (codes[:, :, :earlier] != previous.to(codes.device)).any(-1).any(-1)
            self.log("train/code_drift", changed.float().mean(), sync_dist=True)
        self._previous_codes = codes
        # the values below are equal on every rank; sync_dist keeps DDP quiet
        if levels:
            health = multiview_health(codes, self.tokenizer.vocab_sizes[:levels])
            self._extras["health"] = health
            keep = [k for k in health if "level0_utilisation" in k or "_level" not in k]
            self.log_dict({f"sid/{k}": float(health[k]) for k in keep}, sync_dist=True)
        phase = self.phase_of_epoch(self.current_epoch)
        self.log("phase/index", float(phase.index), prog_bar=True, sync_dist=True)
        self.log("phase/level", float(phase.level), sync_dist=True)

    # --------------------------------------------------------------- training
    def _pooled_query(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        enc = self.model.encode(input_ids, attention_mask)
        return self.query_head(masked_mean(enc.layer_outputs[-1], enc.attention_mask))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        phase = self.phase_of_epoch(self.current_epoch)
        weights = self.weights[phase.name]
        trainable = TRAINABLE[phase.name]
        items, query_index = batch["item_index"], batch["query_index"]
        routes = self.query_routes[query_index]
        features = self._features_on_device()[items]
        levels = phase.active_levels
        out = self.tokenizer.quantize(self.tokenizer.view_latents(features), levels)
        batch_size = items.shape[0]
        parts: dict[str, Tensor] = {}
        if weights["recon"]:
            parts["recon"] = self.tokenizer.reconstruction_loss(features, out.quantized)
        if weights["vq"] and levels:
            parts["vq"] = out.vq_loss
        anchored = min(levels, self.decode_levels)
        if weights["code"] and anchored:
            anchors = self.anchor_codes[items]
            parts["code"] = torch.stack([
                F.cross_entropy(self.tokenizer.code_logits(out.residuals[level], level).flatten(0, 1),
                                anchors[:, :, level].flatten())
                for level in range(anchored)
            ]).mean()
        if weights["infonce"]:
            query = self._pooled_query(batch["input_ids"], batch["attention_mask"])
            parts["infonce"] = view_infonce(query, out.latents, items, routes, self.hparams.temperature)
        if weights["sid"] and levels:
            rows = torch.arange(batch_size, device=items.device)
            targets = out.codes[rows, routes]  # (B, levels): each query's routed view
            full = F.pad(targets, (0, self.hparams.num_levels - levels))
            logits = self.model(batch["input_ids"], batch["attention_mask"], full)
            parts["sid"] = torch.stack([
                F.cross_entropy(logits[level], targets[:, level], label_smoothing=self.hparams.label_smoothing)
                for level in range(levels)
            ]).mean()
            accuracy = torch.stack([logits[lv].argmax(-1) == targets[:, lv] for lv in range(levels)], 1).all(1)
            self.log("train/sid_accuracy", accuracy.float().mean(), batch_size=batch_size)
        loss = sum(weights[name] * value for name, value in parts.items())
        separation = self.hparams.view_separation
        if trainable["tokenizer"] and separation != "none" and self.hparams.separation_weight:
            separation_loss = out.latents.new_zeros(())
            if separation in ("infonce", "both"):
                guidance = self.tokenizer.query_projection(self.query_embeddings.to(self.device)[query_index])
                parts["view_infonce"] = view_infonce(guidance, out.latents, items, routes, self.hparams.temperature)
                separation_loss = separation_loss + parts["view_infonce"]
            if separation in ("balance", "both"):
                parts["usage_balance"] = code_usage_balance(self.tokenizer, out.latents)
                separation_loss = separation_loss + parts["usage_balance"]
            parts["separation"] = separation_loss
            loss = loss + self.hparams.separation_weight * parts["separation"]
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        trainer = self.trainer
        trainer.estimated_stepping_batches  # noqa: B018 -- fills num_training_batches
        batches = trainer.num_training_batches
        steps = max(1, math.ceil(batches / trainer.accumulate_grad_batches)) if math.isfinite(batches) else 1
        total = max(1, self.phases[-1].end * steps)
        scheduler = warmup_cosine_restarts(
            optimizer, warmup_steps=round(self.hparams.warmup_epochs * steps), restart_period=total,
            warmup_start_lr=self.hparams.lr * 1e-3, min_lr=self.hparams.min_lr,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------- decoding
    def sid_table(self) -> tuple[Tensor, Tensor]:
        """All SIDs: codes (N * V, l) over the levels built so far, and the item of each row (N * V,)."""
        n, views, _ = self.sid_codes.shape
        if n == 0 or self.decode_levels == 0:
            raise GrcmError("GRDRRetriever has no SIDs yet: train it (grcm fit) or load a trained checkpoint.")
        codes = self.sid_codes[:, :, : self.decode_levels].reshape(n * views, -1)
        return codes, torch.arange(n, device=codes.device).repeat_interleave(views)

    @property
    def trie(self) -> SIDTrie:
        """Trie over every view's SID of every item; a leaf holds all items that own the SID."""
        key = (self.decode_levels, int(self.sid_codes.sum()), tuple(self.sid_codes.shape))
        if self._trie is None or self._trie_key != key:
            codes, rows = self.sid_table()
            self._trie = SIDTrie.from_codes(codes.cpu(), self.tokenizer.vocab_sizes[: codes.shape[1]],
                                            row_items=rows.cpu())
            self._trie_key = key
        if self._trie.device != self.device:
            self._trie = self._trie.to(self.device)
        return self._trie

    @torch.no_grad()
    def decode(self, input_ids: Tensor, attention_mask: Tensor, beam_size: int | None = None) -> BeamSearchOutput:
        """Constrained beam search: queries (B, T) -> beams (B, K, l) and scores (B, K)."""
        trie = self.trie
        enc = self.model.encode(input_ids, attention_mask)
        return constrained_beam_search(
            lambda prefix: self.model.decode_logits(enc, prefix),
            batch_size=input_ids.shape[0], beam_size=beam_size or self.hparams.beam_size,
            trie=trie, vocab_sizes=trie.vocab_sizes,
        )

    @torch.no_grad()
    def retrieve(self, input_ids: Tensor, attention_mask: Tensor, max_items: int | None = None) -> Tensor:
        """Ranked items (B, M) padded with -1; ``max_items=None`` keeps the whole expanded pool."""
        return beams_to_items(self.decode(input_ids, attention_mask), self.trie, max_items)

    @property
    def eval_max_items(self) -> int:
        if self.hparams.eval_max_items is not None:
            return int(self.hparams.eval_max_items)
        return max(*self.hparams.ks, self.hparams.mrr_k)

    def on_validation_epoch_start(self) -> None:
        if self.features is not None and self.trainer.state.fn == "fit":
            self._refresh_codes()
        self._decode_seconds, self._decoded_queries = 0.0, 0

    def on_test_epoch_start(self) -> None:
        self._decode_seconds, self._decoded_queries = 0.0, 0

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> dict[str, Any] | None:
        if self.decode_levels == 0:
            return None
        start = time.perf_counter()
        # (B, M) the whole expanded pool, with the log-probability of the beam that recalled each item
        recalled = beams_to_scored_items(self.decode(batch["input_ids"], batch["attention_mask"]), self.trie)
        pool = recalled.items
        seconds = time.perf_counter() - start
        self._decode_seconds += seconds
        self._decoded_queries += pool.shape[0]
        ranked = fixed_width(pool, self.eval_max_items)
        metrics, pool_metrics, pool_size = (
            (self.val_metrics, self.val_pool, self.val_pool_size) if stage == "val"
            else (self.test_metrics, self.test_pool, self.test_pool_size)
        )
        metrics.update(ranked, batch["gold_items"], batch["query_index"])
        depth = max(CANDIDATE_KS)
        pool_metrics.update(fixed_width(pool, depth), batch["gold_items"], batch["query_index"])
        pool_size.update({"pool_size": (pool >= 0).sum(1).float()}, batch["query_index"])
        return {"candidates": pool, "candidate_scores": recalled.scores, "beam_size": int(self.hparams.beam_size),
                "decode_seconds": seconds}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any] | None:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any] | None:
        return self._evaluate(batch, "test")

    def _log_metrics(self, stage: str) -> None:
        metrics, pool_metrics, pool_size = (
            (self.val_metrics, self.val_pool, self.val_pool_size) if stage == "val"
            else (self.test_metrics, self.test_pool, self.test_pool_size)
        )
        if self._decoded_queries == 0:
            return
        # computed over all ranks (each query id once): equal on every rank, sync_dist keeps DDP quiet
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.compute().items()}, prog_bar=True, sync_dist=True)
        candidates = pool_metrics.compute()
        self.log_dict({f"{stage}/candidate_recall@{k}": candidates[f"recall@{k}"] for k in CANDIDATE_KS},
                      sync_dist=True)
        self.log(f"{stage}/pool_size", pool_size.compute()["pool_size"], sync_dist=True)
        self.log(f"{stage}/queries_per_s", self._decoded_queries / max(self._decode_seconds, 1e-9), sync_dist=True)
        for metric in (metrics, pool_metrics, pool_size):
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        if self._decoded_queries:
            self.log("test/index_bytes_per_item", self.index_bytes_per_item(), sync_dist=True)

    def index_bytes_per_item(self) -> float:
        """Trie plus the (N * V, L) SID table in narrow dtypes, per item."""
        codes, _ = self.sid_table()
        table = sid_table_nbytes(codes, self.tokenizer.vocab_sizes[: codes.shape[1]])
        return (self.trie.nbytes() + table) / max(self.sid_codes.shape[0], 1)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "item_ids": list(self._extras.get("item_ids", [])),
            "health": {k: float(v) for k, v in self._extras.get("health", {}).items()},
        }
        if self._previous_codes is not None:  # what the next train/code_drift compares with (exact resume)
            checkpoint[CHECKPOINT_KEY]["previous_codes"] = self._previous_codes.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        if CHECKPOINT_KEY not in checkpoint or "sid_codes" not in state:
            raise GrcmError(f"the checkpoint has no GRDR SID table (key {CHECKPOINT_KEY!r}); "
                            "it was not written by GRDRRetriever.")
        self._extras = dict(checkpoint[CHECKPOINT_KEY])
        previous = self._extras.pop("previous_codes", None)
        self._previous_codes = previous.to(self.device) if previous is not None else None
        for name in ("sid_codes", "anchor_codes", "query_routes"):  # resized; filled by load_state_dict
            setattr(self, name, torch.empty_like(state[name], device=self.device))
        self._trie = None

    @property
    def item_ids(self) -> list[str]:
        return list(self._extras.get("item_ids", []))

    @property
    def sid_health(self) -> dict[str, float]:
        """Multi-view SID health of the current table (see :func:`multiview_health`)."""
        codes, _ = self.sid_table()
        return multiview_health(codes.reshape(self.sid_codes.shape[0], self.hparams.num_views, -1),
                                self.tokenizer.vocab_sizes[: codes.shape[1]])
