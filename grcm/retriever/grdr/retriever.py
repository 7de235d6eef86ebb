"""The GRDR LightningModule: tokenizer + retriever with a shared codebook, phases, losses, GRDR's metrics.

Decoding, beams -> items, recall/MRR, logging, index size and prediction are the shared SID-retrieval
path (:class:`~grcm.retriever.sid_retrieval.SIDRetrievalModule`); the SID table, routes and anchors are
:class:`~grcm.retriever.grdr.state.GRDRState`; the losses are :mod:`grcm.retriever.grdr.losses` (the SID
loss under ``view_target``: :mod:`grcm.retriever.grdr.sid_loss`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from grcm.decoding import BeamSearchOutput, RankedItems, SIDTrie
from grcm.errors import GrcmError
from grcm.rerank.text_encoder import masked_mean
from grcm.retriever.grdr.expanded_recall import ExpandedPoolMetrics
from grcm.retriever.grdr.heads import CosineCodeHead
from grcm.retriever.grdr.losses import VIEW_TARGETS, anchor_code_loss, query_item_infonce
from grcm.retriever.grdr.routing import reroute, route_training_queries
from grcm.retriever.grdr.sid_loss import batch_sid_loss
from grcm.retriever.grdr.state import CHECKPOINT_KEY, GRDRState, rename_unprefixed_buffers
from grcm.retriever.grdr.training import (
    KMEANS_INITS,
    adam_warmup_cosine,
    epoch_end_health,
    freeze_earlier_codebooks,
    initialise_level,
    newest_codebook,
    parameter_groups,
    scale_update,
    view_separation_terms,
)
from grcm.retriever.model import GenerativeRetrieverModel
from grcm.retriever.phases import TRAINABLE, Phase, build_schedule, phase_at, resolve_weights
from grcm.retriever.sid_retrieval import SIDRetrievalModule, check_decoding_args
from grcm.tokenizers.multiview import MultiViewTokenizer
from grcm.tokenizers.query_routing import QUERY_ENCODERS, ROUTINGS

SEPARATIONS = ("infonce", "balance", "both", "none")
SIDS = "sids."  # state-dict prefix of the GRDRState buffers


class GRDRRetriever(SIDRetrievalModule):
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
        routing: ``matched`` (each item's query groups matched one-to-one to views: to corpus-wide facet
            prototypes at first, to the item's current view latents every epoch after),
            ``first_query`` (alias ``cluster``: group g -> view g, groups numbered by their first
            query), ``nearest`` (closest view, re-routed every epoch, clustered at first) or ``random``.
        view_target: which of an item's V SIDs a training query's SID loss trains: ``routed`` (its
            routed view), ``marginal`` (``-log sum_v p(SID_v | query)``: any view the query fits) or ``best``
            (hard EM: the view the decoder finds most likely now, picked without gradient). The InfoNCE and
            view-separation losses keep the routes either way.
        query_encoder: ``minilm`` or ``minilm_static`` (see :func:`embed_queries`).
        view_separation: ``infonce`` (guided view separation: multi-positive query -> view InfoNCE on
            the guidance embeddings), ``balance`` (per-view level-0 code-usage balancing), ``both``
            (their sum) or ``none``.
        separation_weight: its weight, in every phase where the tokenizer trains.
        view_margin, view_margin_weight: the view margin term (inside ``separation_weight``):
            ``view_margin_weight * mean max(0, cos(z_iv, z_iv') - view_margin)`` over one item's views.
        kmeans_init: ``pooled`` (one K-Means of all views' residuals), ``per_view`` (view v's
            residuals fill about K / V codes of each new level) or ``per_view_first`` (per view at level 0).
        freeze_earlier_levels: freeze the codebooks below the level a phase builds (GRDR: True).
        detach_residual: detach the residual between levels (GRDR: True).
        new_codebook_lr_multiplier: the newest codebook's update is scaled by this (GRDR: 10).
        schedule, pretrain_epochs, main_epochs, fit_epochs: see :mod:`grcm.retriever.phases`.
        phase_weights: per-phase loss-weight overrides, e.g. ``{"main": {"sid": 1.0}}``.
        label_smoothing: SID cross-entropy label smoothing.
        temperature: InfoNCE temperature.
        num_heads, num_encoder_layers, num_decoder_layers, ffn_dim, dropout, fusion, max_query_len:
            the retriever's shape (:class:`GenerativeRetrieverModel`).
        beam_size: beams; eval_max_items: ranked items kept per query (default: the largest cut-off);
            recall_levels, max_pool_items: prefix recall, as for the ACE retriever (default: full SIDs, no cap).
            item_score: ``max`` (an item ranks by its best view's beam) or ``logsumexp`` over its views' beams.
        lr, warmup_epochs, min_lr, weight_decay: Adam and its warm-up + cosine schedule.
        seed: K-Means and routing seed.
        ks, mrr_k: reported cut-offs.
        incremental_decoding, compile_decoder, decode_precision, cuda_graphs: decoding speed options,
            as for :class:`~grcm.retriever.module.GenerativeRetriever` (same beams).
        inference_quantization: "none", or on CPU "int8" / "bf16" while decoding, as for the ACE retriever.
    """

    #: arguments that ``grcm test/validate/predict --ckpt_path=...`` may change (decoding and reporting only)
    EVAL_OVERRIDABLE = ("beam_size", "eval_max_items", "ks", "mrr_k", "recall_levels", "max_pool_items", "item_score",
                       "inference_quantization")

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
        routing: str = "matched",
        view_target: str = "routed",
        query_encoder: str = "minilm",
        view_separation: str = "infonce",
        separation_weight: float = 0.5,
        view_margin: float = 0.0,
        view_margin_weight: float = 0.0,
        kmeans_init: str = "pooled",
        freeze_earlier_levels: bool = True,
        detach_residual: bool = True,
        new_codebook_lr_multiplier: float = 10.0,
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
        incremental_decoding: bool = True,
        compile_decoder: bool = False,
        decode_precision: str = "32",
        cuda_graphs: bool = False, recall_levels: int | None = None, max_pool_items: int | None = None,
        item_score: str = "max",
        inference_quantization: str = "none",
    ) -> None:
        super().__init__()
        for name, value, choices in (("routing", routing, ROUTINGS), ("query_encoder", query_encoder, QUERY_ENCODERS),
                                     ("view_separation", view_separation, SEPARATIONS),
                                     ("kmeans_init", kmeans_init, KMEANS_INITS),
                                     ("view_target", view_target, VIEW_TARGETS)):
            if value not in choices:
                raise GrcmError(f"model.{name}={value!r} is not one of {list(choices)}.")
        check_decoding_args(beam_size, eval_max_items, ks, mrr_k, incremental_decoding, compile_decoder,
                            decode_precision, cuda_graphs)
        self.save_hyperparameters()
        self.phases = build_schedule(num_levels, schedule, pretrain_epochs, main_epochs, fit_epochs)
        self.weights = resolve_weights(phase_weights)
        self.tokenizer = MultiViewTokenizer(
            feature_dim, num_views, num_levels, codebook_size, d_model, tokenizer_hidden, beta,
            detach_residual=detach_residual,
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
        self.sids = GRDRState(num_views, num_levels, self.tokenizer.vocab_sizes)  # sized in setup or by a checkpoint
        self._register_load_state_dict_pre_hook(self._rename_unprefixed_buffers)
        self._previous_codes: Tensor | None = None  # what the next train/code_drift compares with
        self._current_phase: int | None = None
        self.init_retrieval(ks, mrr_k)
        self.pool_metrics = ExpandedPoolMetrics()

    @staticmethod
    def _rename_unprefixed_buffers(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """``load_state_dict`` pre-hook: a state dict from before :class:`GRDRState` loads too."""
        rename_unprefixed_buffers(state_dict, prefix, SIDS)

    # ------------------------------------------------------------ the SID table
    @property
    def sid_codes(self) -> Tensor:
        """(N, V, L) long: every view's SID of every item (:class:`GRDRState`)."""
        return self.sids.sid_codes

    @property
    def initialised_levels(self) -> Tensor:
        """() long: SID levels built so far, K-Means-initialised; the levels decoded (all L after training)."""
        return self.sids.initialised_levels

    @property
    def anchored_phase(self) -> Tensor:
        """() long: the phase whose start the anchor codes were snapshotted at (-1: none yet)."""
        return self.sids.anchored_phase

    @property
    def item_ids(self) -> list[str]:
        return list(self.sids.item_ids or [])

    def sid_table(self) -> tuple[Tensor, Tensor]:
        """All SIDs: codes (N * V, l) over the levels built so far, and the item of each row (N * V,)."""
        return self.sids.sid_table()

    @property
    def sid_health(self) -> dict[str, float]:
        """Multi-view SID health of the current table (see :func:`multiview_health`)."""
        return self.sids.table_health()

    def trie_sources(self) -> tuple[Tensor, ...]:
        return (self.sids.sid_codes, self.sids.initialised_levels)

    def build_trie(self) -> SIDTrie:
        return self.sids.build_trie()

    def index_table(self) -> tuple[Tensor, list[int], int]:
        codes, _ = self.sids.sid_table()
        return codes, self.tokenizer.vocab_sizes[: codes.shape[1]], int(self.sids.sid_codes.shape[0])

    @property
    def can_decode(self) -> bool:
        return int(self.sids.initialised_levels) > 0

    # ------------------------------------------------------------ parameter groups
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The four groups of :data:`grcm.retriever.phases.GROUPS`, every parameter in exactly one."""
        return parameter_groups(self.tokenizer, self.model, self.query_head)

    def apply_phase(self, phase: Phase) -> None:
        """Set ``requires_grad`` of every parameter group as :data:`TRAINABLE` says for ``phase``."""
        trainable = TRAINABLE[phase.name]
        for name, params in self.parameter_groups().items():
            for param in params:
                param.requires_grad_(trainable[name])
        if self.hparams.freeze_earlier_levels:
            freeze_earlier_codebooks(self.tokenizer.codebooks, phase)

    def phase_of_epoch(self, epoch: int) -> Phase:
        return phase_at(self.phases, epoch)

    # ------------------------------------------------------------------- data
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
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        corpus = getattr(datamodule, "corpus", None)
        if corpus is None:
            return
        self.sids.attach_corpus(corpus.item_ids, corpus.features, corpus.name)
        if stage == "fit":
            self._prepare_queries(datamodule, corpus)

    def _prepare_queries(self, datamodule: Any, corpus: Any) -> None:
        """Embed and route every training query (on rank 0, broadcast: :mod:`grcm.retriever.grdr.routing`)."""
        train = datamodule.query_batches("train")
        query_index, item = train.query_index.numpy(), train.item_index.numpy()
        hparams = self.hparams
        need_embeddings = hparams.routing != "random" or hparams.view_separation in ("infonce", "both")
        embeddings, routes, groups = route_training_queries(self, query_index, item, corpus, hparams.routing,
                                                            hparams.query_encoder, hparams.num_views,
                                                            hparams.seed, need_embeddings)
        self.sids.set_training_queries(query_index, item, routes, embeddings, groups)

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
        sids = self.sids
        hparams = self.hparams
        if phase.initialises_level and int(sids.initialised_levels) <= phase.level:
            initialise_level(self, self.tokenizer, sids, phase.level, hparams.seed + phase.level,
                             per_view=hparams.kmeans_init == "per_view" or (
                                 hparams.kmeans_init == "per_view_first" and phase.level == 0))
            rank_zero_info(f"GRDR: level-{phase.level} codebook K-Means-initialised ({hparams.kmeans_init})")
        if int(sids.anchored_phase) < phase.index:  # snapshot once per phase (kept across resumes)
            sids.snapshot_anchors(self.tokenizer, phase.index)
        if sids.query_embeddings is None:
            return
        if hparams.routing == "nearest" and int(sids.initialised_levels) > 0:
            self.log("train/route_changed", reroute(self, self.tokenizer, sids, nearest=True), sync_dist=True)
        elif (hparams.routing == "matched" and self.current_epoch > 0 and sids.query_groups is not None
              and TRAINABLE[phase.name]["tokenizer"] and hparams.num_views > 1):
            self.log("train/route_changed", reroute(self, self.tokenizer, sids, nearest=False), sync_dist=True)

    def on_train_epoch_end(self) -> None:
        codes, drift, health = epoch_end_health(self.tokenizer, self.sids, self._previous_codes)
        self._previous_codes = codes
        # the values below are equal on every rank; sync_dist keeps DDP quiet
        if drift is not None:
            self.log("train/code_drift", drift, sync_dist=True)
        if health:
            self.sids.health = health
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
        weights, hparams, sids = self.weights[phase.name], self.hparams, self.sids
        items, query_index = batch["item_index"], batch["query_index"]
        routes = sids.query_routes[query_index]
        features = sids.features_on_device()[items]
        levels = phase.active_levels
        out = self.tokenizer.quantize(self.tokenizer.view_latents(features), levels)
        batch_size = items.shape[0]
        parts: dict[str, Tensor] = {}
        if weights["recon"]:
            parts["recon"] = self.tokenizer.reconstruction_loss(features, out.quantized)
        if weights["vq"] and levels:
            parts["vq"] = out.vq_loss
        anchored = min(levels, int(sids.initialised_levels))
        if weights["code"] and anchored:
            logits = [self.tokenizer.code_logits(out.residuals[level], level) for level in range(anchored)]
            parts["code"] = anchor_code_loss(logits, sids.anchor_codes[items])
        if weights["infonce"]:
            query = self._pooled_query(batch["input_ids"], batch["attention_mask"])
            parts["infonce"] = query_item_infonce(query, out.latents, items, routes, hparams.temperature)
        if weights["sid"] and levels:
            parts["sid"], exact = batch_sid_loss(self.model, batch["input_ids"], batch["attention_mask"], out.codes,
                                                 routes, hparams.view_target, hparams.num_levels,
                                                 hparams.label_smoothing)
            self.log("train/sid_accuracy", exact.float().mean(), batch_size=batch_size)
        loss = sum(weights[name] * value for name, value in parts.items())
        separation = hparams.view_separation
        if TRAINABLE[phase.name]["tokenizer"] and hparams.separation_weight and (
                separation != "none" or hparams.view_margin_weight):
            guidance = None
            if separation in ("infonce", "both"):
                guidance = self.tokenizer.query_projection(sids.query_embeddings.to(self.device)[query_index])
            terms, parts["separation"] = view_separation_terms(
                self.tokenizer, out.latents, guidance, items, routes, separation, hparams.temperature,
                hparams.view_margin, hparams.view_margin_weight)
            parts.update(terms)
            loss = loss + hparams.separation_weight * parts["separation"]
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimiser step, with the newest codebook's update scaled by ``new_codebook_lr_multiplier``."""
        multiplier = float(self.hparams.new_codebook_lr_multiplier)
        codebook = newest_codebook(self.tokenizer.codebooks, self.phase_of_epoch(self.current_epoch))
        before = codebook.detach().clone() if codebook is not None and multiplier != 1.0 else None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if before is not None:
            scale_update(codebook, before, multiplier)

    def configure_optimizers(self) -> dict[str, Any]:
        hparams = self.hparams
        return adam_warmup_cosine(self, self.phases[-1].end, hparams.lr, hparams.weight_decay,
                                  hparams.warmup_epochs, hparams.min_lr)

    # ------------------------------------------------------------- evaluation
    # decode, retrieve, recall/MRR, logging, index size and predict_step: SIDRetrievalModule
    def on_validation_epoch_start(self) -> None:
        if self.sids.features is not None and self.trainer.state.fn == "fit":
            self.sids.refresh(self.tokenizer)  # the SIDs the tokenizer gives now (the trie follows)
        super().on_validation_epoch_start()

    def evaluate_extra(self, batch: dict[str, Tensor], output: BeamSearchOutput, recalled: RankedItems,
                       stage: str) -> None:
        """``expanded_recall@{10,50,100}`` over the whole expanded pool and ``pool_size`` (distinct items)."""
        self.pool_metrics.update(stage, recalled.items, batch["gold_items"], batch["query_index"])

    def log_extra(self, stage: str) -> None:
        self.log_dict(self.pool_metrics.compute_and_reset(stage), sync_dist=True)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.sids.checkpoint_extras()
        if self._previous_codes is not None:  # what the next train/code_drift compares with (exact resume)
            checkpoint[CHECKPOINT_KEY]["previous_codes"] = self._previous_codes.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        rename_unprefixed_buffers(state, "", SIDS)
        if CHECKPOINT_KEY not in checkpoint or SIDS + "sid_codes" not in state:
            raise GrcmError(f"the checkpoint has no GRDR SID table (key {CHECKPOINT_KEY!r}); "
                            "it was not written by GRDRRetriever.")
        extras = dict(checkpoint[CHECKPOINT_KEY])
        previous = extras.pop("previous_codes", None)
        self._previous_codes = previous.to(self.device) if previous is not None else None
        self.sids.load_checkpoint_extras(extras, state, SIDS)
