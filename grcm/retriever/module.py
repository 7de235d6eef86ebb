"""LightningModule of the generative retriever: query text -> SID -> ranked items.

Training: the target of a query is the SID of its item, ``codes[item_index]``
from the SID bundle, learned with cross-entropy plus the R-Drop consistency
term (:mod:`grcm.retriever.rdrop`). Evaluation: beam search over SID levels,
constrained to the trie of valid SIDs (:mod:`grcm.decoding`), beams expanded
to items, item-level Recall@K and MRR@K (:mod:`grcm.metrics`): the SID-retrieval
path shared with GRDR (:class:`~grcm.retriever.sid_retrieval.SIDRetrievalModule`).
This module adds ACE's own ``valid_sid@r`` and ``ce`` evaluation logs.

The SID bundle travels with every checkpoint: the code table is a buffer of
the state dict and the rest of the bundle (item ids, vocabulary sizes,
codebooks, config, health) is stored under ``checkpoint["sid_bundle"]``, so
``GenerativeRetriever.load_from_checkpoint(path)`` decodes without the bundle
directory (:attr:`GenerativeRetriever.sid_bundle` rebuilds it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from grcm.decoding import BeamSearchOutput, RankedItems, SIDTrie
from grcm.retriever.model import GenerativeRetrieverModel
from grcm.retriever.rdrop import sid_loss
from grcm.retriever.schedule import warmup_cosine_restarts
from grcm.retriever.sid_retrieval import RetrieverConfigError, SIDRetrievalModule, check_decoding_args
from grcm.tokenizers.bundle import BundleError, SIDBundle

__all__ = ["CHECKPOINT_KEY", "GenerativeRetriever", "RetrieverConfigError"]

CHECKPOINT_KEY = "sid_bundle"


def _plain(value: Any) -> Any:
    """JSON round trip, so bundle config/health hold only types a ``weights_only`` load accepts."""
    return json.loads(json.dumps(value, default=lambda obj: obj.tolist() if hasattr(obj, "tolist") else str(obj)))


class GenerativeRetriever(SIDRetrievalModule):
    """ACE-style generative retriever over a SID bundle.

    Args:
        bundle_dir: directory of the SID bundle written by a tokenizer run. May be missing
            when the module is restored from a checkpoint (which carries the bundle).
        vocab_size: query vocabulary size (linked from the data module).
        pad_token_id: query padding id (linked from the data module).
        sid_vocab_sizes: codes per SID level; taken from the bundle (leave unset). It is
            recorded in the hyperparameters so that a checkpoint rebuilds the model alone.
        d_model, num_heads, num_encoder_layers, num_decoder_layers, ffn_dim, dropout,
            max_query_len: network shape, see :class:`GenerativeRetrieverModel`.
        fusion: "ace" (coarse-to-fine fusion) or "none" (ablation "w/o fusion").
        coarse_gate: ACE coarse-fusion gate, "sigmoid" (``sigmoid(A)/S`` as printed) or "silu"
            (self-gating ``A*sigmoid(A)/S`` of the reference implementation).
        query_encoder: "scratch" or "minilm" (pretrained MiniLM layers under the decoder; needs
            ``data.query_vocab=minilm``).
        pretrained_layers: for "minilm", how many of its 6 layers to run (fewer is faster).
        freeze_query_encoder: for "minilm", keep its pretrained weights fixed.
        rdrop_omega: weight of the R-Drop consistency loss (ACE 0.15); 0 trains with one
            pass and plain cross-entropy (ablation "w/o consistency loss").
        beam_size: beams per query at evaluation (ACE: 5, 25, 50).
        constrained: keep beams inside the SID trie (False: ablation "w/o constrained
            beam search"; invalid SIDs then recall no item).
        lr: peak Adam learning rate (ACE 1e-4).
        warmup_start_lr: learning rate at the first step (ACE 1e-6).
        warmup_epochs: linear warm-up length in epochs (ACE 5; fractional values allowed).
        restart_period: first cosine-annealing period in epochs (``T_0``), then warm restart.
        restart_mult: period growth after each restart (``T_mult``).
        min_lr: lowest learning rate of each cosine period.
        weight_decay: Adam weight decay.
        eval_max_items: ranked items kept per query (default: the largest metric cut-off; fewer
            than that cut-off is an error, since ``recall@k`` would silently count only the first items).
        ks, mrr_k: reported cut-offs (``recall@k`` and ``mrr@mrr_k``).
        incremental_decoding: decode with the KV cache (:mod:`grcm.retriever.incremental`);
            False recomputes the decoder over the whole prefix every level (same beams, slower).
        compile_decoder: ``torch.compile`` the incremental decode step (speed only).
        decode_precision: "32", or on CUDA "16" / "bf16" autocast while decoding (speed only).
        cuda_graphs: replay the incremental decode step as CUDA graphs (CUDA only; speed only).
        inference_quantization: "none" (float32), or on CPU "int8" (dynamic quantisation of every linear layer)
            or "bf16" (bfloat16 weights) while decoding; see :mod:`grcm.retriever.cpu_inference`.
        recall_levels: prefix recall: decode only the first p SID levels (e.g. ACE's semantic levels without
            the unique token) and expand each decoded prefix to every item under it, items without training
            queries included (see :mod:`grcm.retriever.sid_retrieval`); None (default) decodes full SIDs.
        max_pool_items: cap on the recalled pool per query (best beams first); None: no cap.
        item_score: ``max`` (an item ranks by its best beam) or ``logsumexp`` over the beams reaching it.
        prefix_scorer: with ``recall_levels``, a file of :mod:`grcm.retriever.prefix_scorer` that orders the items
            under the decoded prefixes by their features (so items without training queries too); None (default):
            items under a prefix in index order.
        prefix_scorer_weight: weight of its item score against the prefix's beam log-probability.
        prefix_scorer_untrained_bonus: added to the score of the items the scorer was fitted without (items
            without training queries): a prior for new items; 0 (default): none.

    :meth:`decode` and :meth:`retrieve` (:class:`~grcm.retriever.sid_retrieval.SIDRetrievalModule`)
    always run in evaluation mode under ``torch.inference_mode`` (the training flags are restored
    afterwards), also when called outside a Lightning loop.
    """

    #: Arguments ``grcm <command> --ckpt_path`` may change on the command line (``bundle_dir`` only to a
    #: bundle holding the checkpoint's own SIDs); see :mod:`grcm.lightning_cli`.
    EVAL_OVERRIDABLE = ("beam_size", "constrained", "eval_max_items", "ks", "mrr_k", "bundle_dir", "recall_levels",
                        "max_pool_items", "item_score", "inference_quantization", "prefix_scorer",
                        "prefix_scorer_weight", "prefix_scorer_untrained_bonus")

    def __init__(
        self,
        bundle_dir: str | None,
        vocab_size: int,
        pad_token_id: int = 0,
        sid_vocab_sizes: list[int] | None = None,
        d_model: int = 256,
        num_heads: int = 4,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 3,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        fusion: str = "ace",
        coarse_gate: str = "sigmoid",
        query_encoder: str = "scratch",
        pretrained_layers: int | None = None,
        freeze_query_encoder: bool = False,
        max_query_len: int = 64,
        rdrop_omega: float = 0.15,
        beam_size: int = 25,
        constrained: bool = True,
        lr: float = 1e-4,
        warmup_start_lr: float = 1e-6,
        warmup_epochs: float = 5.0,
        restart_period: float = 10.0,
        restart_mult: int = 1,
        min_lr: float = 0.0,
        weight_decay: float = 0.0,
        eval_max_items: int | None = None,
        ks: Sequence[int] = (1, 5, 10),
        mrr_k: int = 10,
        incremental_decoding: bool = True,
        compile_decoder: bool = False,
        decode_precision: str = "32",
        cuda_graphs: bool = False,
        recall_levels: int | None = None,
        max_pool_items: int | None = None,
        item_score: str = "max",
        inference_quantization: str = "none",
        prefix_scorer: str | None = None,
        prefix_scorer_weight: float = 0.5,
        prefix_scorer_untrained_bonus: float = 0.0,
    ) -> None:
        super().__init__()
        if rdrop_omega < 0:
            raise RetrieverConfigError(f"model.rdrop_omega must be >= 0, got {rdrop_omega}.")
        check_decoding_args(beam_size, eval_max_items, ks, mrr_k, incremental_decoding, compile_decoder,
                            decode_precision, cuda_graphs)
        self.save_hyperparameters()
        bundle = self._read_bundle(bundle_dir, sid_vocab_sizes)
        if bundle is not None:
            sid_vocab_sizes = bundle.vocab_sizes
            self.hparams["sid_vocab_sizes"] = list(sid_vocab_sizes)
        self.model = GenerativeRetrieverModel(
            vocab_size=vocab_size,
            sid_vocab_sizes=sid_vocab_sizes,
            d_model=d_model,
            num_heads=num_heads,
            num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers,
            ffn_dim=ffn_dim,
            dropout=dropout,
            fusion=fusion,
            max_query_len=max_query_len,
            pad_token_id=pad_token_id,
            coarse_gate=coarse_gate,
            query_encoder=query_encoder,
            pretrained_layers=pretrained_layers,
            freeze_query_encoder=freeze_query_encoder,
        )
        # The last level's code embedding is never a decoder input (teacher forcing feeds levels 0..L-2);
        # frozen, so DDP does not wait for a gradient it never gets.
        self.model.code_embeddings[-1].requires_grad_(False)
        codes = bundle.codes if bundle is not None else torch.zeros(0, len(sid_vocab_sizes), dtype=torch.long)
        self.register_buffer("sid_codes", codes.clone())
        self._bundle_extras: dict[str, Any] = self._extras_of(bundle) if bundle is not None else {}
        self.init_retrieval(ks, mrr_k)

    # ----------------------------------------------------------------- bundle
    @staticmethod
    def _read_bundle(bundle_dir: str | None, sid_vocab_sizes: list[int] | None) -> SIDBundle | None:
        if bundle_dir is not None and Path(bundle_dir).is_dir():
            bundle = SIDBundle.load(bundle_dir)
            if sid_vocab_sizes is not None and list(sid_vocab_sizes) != bundle.vocab_sizes:
                raise BundleError(
                    f"model.sid_vocab_sizes={list(sid_vocab_sizes)} disagrees with the SID bundle at {bundle_dir} "
                    f"(vocab_sizes={bundle.vocab_sizes}); leave sid_vocab_sizes unset, it is read from the bundle. "
                    "(A checkpoint records the sizes of the bundle it was trained on: if that bundle has been "
                    "rebuilt since, restore the checkpoint with bundle_dir pointing elsewhere; it carries its own.)"
                )
            return bundle
        if sid_vocab_sizes is None:
            raise BundleError(
                f"no SID bundle at bundle_dir={bundle_dir!r}; train the tokenizer first "
                "(grcm fit -c experiments/<dataset>/ace_tokenizer.yaml) or point model.bundle_dir at its bundle."
            )
        return None  # restored from a checkpoint: codes and extras arrive in on_load_checkpoint

    @staticmethod
    def _extras_of(bundle: SIDBundle) -> dict[str, Any]:
        return {
            "item_ids": list(bundle.item_ids),
            "vocab_sizes": list(bundle.vocab_sizes),
            "codebooks": {name: t.detach().cpu().clone() for name, t in bundle.codebooks.items()},
            "config": _plain(bundle.config),
            "feature_checksum": bundle.feature_checksum,
            "health": _plain(bundle.health),
        }

    @property
    def item_ids(self) -> list[str]:
        """The N item ids, row order of :attr:`sid_codes` (empty before a checkpoint is loaded)."""
        return self._bundle_extras.get("item_ids", [])

    @property
    def sid_bundle(self) -> SIDBundle:
        """The SID bundle this retriever decodes into (e.g. ``model.sid_bundle.save(dir)``)."""
        self._require_codes()
        extras = self._bundle_extras
        return SIDBundle(
            item_ids=extras["item_ids"],
            codes=self.sid_codes.cpu(),
            vocab_sizes=extras["vocab_sizes"],
            codebooks=extras["codebooks"],
            config=extras["config"],
            feature_checksum=extras["feature_checksum"],
            health=extras["health"],
        )

    def _require_codes(self) -> None:
        if self.sid_codes.shape[0] == 0 or not self._bundle_extras:
            raise BundleError(
                f"GenerativeRetriever has no SID codes: bundle_dir={self.hparams.bundle_dir!r} was not found "
                "and no checkpoint was loaded; point model.bundle_dir at the tokenizer's bundle."
            )

    # ------------------------------------------------------------ SID table (see SIDRetrievalModule)
    def trie_sources(self) -> tuple[Tensor, ...]:
        return (self.sid_codes,)

    def build_trie(self) -> SIDTrie:
        """Trie over :attr:`sid_codes` (rebuilt whenever the codes change, e.g. by ``load_state_dict``)."""
        self._require_codes()
        return SIDTrie.from_codes(self.sid_codes.cpu(), self.model.sid_vocab_sizes)

    def sid_table(self) -> tuple[Tensor, Tensor]:
        """The SID table (N, L) and the item of each row, ``arange(N)`` (one SID per item)."""
        return self.sid_codes, torch.arange(self.sid_codes.shape[0], device=self.sid_codes.device)

    def index_table(self) -> tuple[Tensor, list[int], int]:
        return self.sid_codes, list(self.model.sid_vocab_sizes), int(self.sid_codes.shape[0])

    def setup(self, stage: str) -> None:
        """Check that the bundle's items are the data module's corpus items, in order.

        Skipped while the codes are still to come from a checkpoint (``fit(ckpt_path=...)``).
        """
        if not self._bundle_extras:
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        corpus = getattr(datamodule, "corpus", None)
        if corpus is None:
            return
        if list(corpus.item_ids) != self.item_ids:
            where = self.hparams.bundle_dir
            raise BundleError(
                f"the SID bundle ({where}) lists {len(self.item_ids)} items that differ from the "
                f"{len(corpus.item_ids)} items of corpus {corpus.name!r} (ids or order); rebuild the bundle "
                "with the tokenizer on this corpus, or point model.bundle_dir at the matching bundle."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = dict(self._bundle_extras)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extras = checkpoint.get(CHECKPOINT_KEY)
        codes = checkpoint.get("state_dict", {}).get("sid_codes")
        if extras is None or codes is None:
            raise BundleError(
                f"the checkpoint has no SID bundle (key {CHECKPOINT_KEY!r} / buffer 'sid_codes'); "
                "it was not written by GenerativeRetriever."
            )
        self._bundle_extras = dict(extras)
        self.sid_codes = torch.empty_like(codes, device=self.sid_codes.device)  # resized; filled by load_state_dict

    # --------------------------------------------------------------- training
    def forward(self, input_ids: Tensor, attention_mask: Tensor, sids: Tensor) -> list[Tensor]:
        """Teacher-forced logits, L tensors (B, V_l); see :meth:`GenerativeRetrieverModel.forward`."""
        return self.model(input_ids, attention_mask, sids)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        targets = self.sid_codes[batch["item_index"]]
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        batch_size = targets.shape[0]
        if self.hparams.rdrop_omega > 0:
            # both R-Drop passes in one doubled batch: dropout masks differ per row
            logits = self.model(
                torch.cat([input_ids, input_ids]), torch.cat([attention_mask, attention_mask]),
                torch.cat([targets, targets]),
            )
            logits_a = [level[:batch_size] for level in logits]
            logits_b = [level[batch_size:] for level in logits]
        else:
            logits_a, logits_b = self.model(input_ids, attention_mask, targets), None
        loss, parts = sid_loss(logits_a, logits_b, targets, self.hparams.rdrop_omega)
        exact = torch.stack([level.argmax(-1) == targets[:, i] for i, level in enumerate(logits_a)], 1).all(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/ce", parts["ce"], batch_size=batch_size)
        self.log("train/kl", parts["kl"], batch_size=batch_size)
        self.log("train/sid_accuracy", exact.float().mean(), on_epoch=True, batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        steps_per_epoch = self._steps_per_epoch()
        scheduler = warmup_cosine_restarts(
            optimizer,
            warmup_steps=round(self.hparams.warmup_epochs * steps_per_epoch),
            restart_period=max(1, round(self.hparams.restart_period * steps_per_epoch)),
            restart_mult=self.hparams.restart_mult,
            warmup_start_lr=self.hparams.warmup_start_lr,
            min_lr=self.hparams.min_lr,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_per_epoch(self) -> int:
        trainer = self.trainer
        trainer.estimated_stepping_batches  # noqa: B018 -- sets up the train loader, filling num_training_batches
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return 1
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    # ------------------------------------------------------------- evaluation
    # decode, retrieve, metrics, logging, index size and predict_step: SIDRetrievalModule
    def evaluate_extra(self, batch: dict[str, Tensor], output: BeamSearchOutput, recalled: RankedItems,
                       stage: str) -> None:
        """``{stage}/valid_sid@r`` per beam rank and ``{stage}/ce``, the teacher-forced loss of the gold SIDs."""
        batch_size = output.sequences.shape[0]
        for rank, share in enumerate(self.valid_sid_share(output).tolist(), start=1):
            self.log(f"{stage}/valid_sid@{rank}", share, batch_size=batch_size, sync_dist=True)
        gold = batch["gold_items"][:, 0]
        if bool((gold >= 0).all()):
            targets = self.sid_codes[gold]
            logits = self.model(batch["input_ids"], batch["attention_mask"], targets)
            loss, _ = sid_loss(logits, None, targets, 0.0)
            self.log(f"{stage}/ce", loss, batch_size=batch_size, sync_dist=True)

    def valid_sid_share(self, output: BeamSearchOutput) -> Tensor:
        """(K,) share of queries whose rank-r beam (r = 1..K) is a SID of the corpus (an item's full SID, or with
        ``recall_levels`` a prefix of one).

        Always 1 under constrained decoding; without the trie it shows where invalid SIDs enter the list.
        """
        sequences, scores = output.sequences, output.scores  # (B, K, L), (B, K)
        rows, beams, levels = sequences.shape
        valid = self.recall_trie.contains(sequences.reshape(rows * beams, levels).clamp(min=0)).reshape(rows, beams)
        return (valid & (scores > float("-inf"))).float().mean(0)
