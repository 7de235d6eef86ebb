"""Hybrid-Tower / PIG dense model: pseudo-query interaction on the item side, at two-tower cost.

The text tower, the temperature, the FAISS evaluation and the optimiser are the dual
tower's (:class:`~grcm.rerank.dual_tower.DualTower`, which this class extends). The item
tower reads an item's *token* features (frames, patches, audio segments) instead of one
pooled vector: :class:`~grcm.rerank.pseudo_query.HybridItemEncoder` selects the
informative tokens, generates a pseudo-query from them, and lets it attend to all
tokens; the result is the item's one stored vector. Online, retrieval is a dot product
against a FAISS index of those vectors, exactly like the dual tower, so the index costs
the same bytes per item.

Loss: symmetric InfoNCE with a learnable temperature, plus ``generation_weight`` times
the generation loss, whose target never sends a gradient into the text tower:

* ``interaction="pooling"``: the squared L2 distance between each training query's text
  embedding and its item's pseudo-query vector;
* ``interaction="pig"`` with ``generation_target="tokens"``: a Chamfer distance between the
  item's ``L`` pseudo-query tokens and the query's projected token states (the text tower's
  token-level embeddings, whose normalised mean is the query embedding), see
  :func:`~grcm.rerank.pseudo_query.token_generation_loss`; ``"sentence"``: the L2 distance
  between the normalised mean pseudo-query token and the query embedding.

``generation_contrastive`` adds that weight times an InfoNCE between the sentence
pseudo-queries and the (detached) query embeddings of the batch, at the model's
(detached) temperature: a pseudo-query should be closer to its own item's captions than
to the other items'.

With a pretrained text tower (``text_backbone="minilm"``, ``projection_init="identity"``, ``mean_skip=True``:
the text-encoder block of the fine-tuned MiniLM dual tower) the model starts as the zero-shot similarity
between a query and the mean of the item's tokens, and ``item_lr`` lets the freshly initialised item tower
learn at its own rate while the text tower is fine-tuned at ``lr``.

A checkpoint records its class (``checkpoint["dense_model_class"]``) so that
:func:`grcm.rerank.dense_models.load_dense_model` (used by two-stage retrieval) loads the
right model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch

from grcm.data.corpus import CorpusError
from grcm.data.datamodules import item_token_batch, token_batch
from grcm.rerank.contrastive import symmetric_info_nce
from grcm.rerank.dual_tower import DENSE_MODEL_CLASS_KEY, DualTower
from grcm.rerank.index import DenseIndexConfig
from grcm.rerank.pseudo_query import (
    HybridItemEncoder,
    pseudo_query_loss,
    sentence_pseudo_query,
    token_generation_loss,
)
from grcm.rerank.text_encoder import masked_mean


class HybridTower(DualTower):
    """Dual-tower text side + PIG item side (token selector, pseudo-query generator, cross-attention pooling).

    Args:
        vocab_size, feature_dim, pad_token_id: linked from the data (token features are
            ``feature_dim``-d, like the pooled ones).
        embed_dim: shared embedding size (the stored vector per item).
        text_backbone, text_layers, text_width, text_heads, text_ffn, dropout: the text tower, as in
            :class:`DualTower`.
        item_width: token width inside the item tower.
        item_heads: attention heads of the item tower.
        use_selector: informativeness top-k token selection before the generator (off = all tokens).
        top_k: tokens kept by the selector.
        use_generator: pseudo-query generation (off = pooling with one learned query, X-Pool-like).
        generation_weight: weight of the generation loss (ignored without the generator).
        interaction: ``"pooling"`` (one pseudo-query vector, one pooling layer) or ``"pig"`` (a sequence of
            pseudo-query tokens and a stack of interaction layers), see
            :class:`~grcm.rerank.pseudo_query.HybridItemEncoder`.
        pseudo_tokens, generator_layers, interaction_layers: the ``"pig"`` item tower's shape.
        generation_target: ``"tokens"`` (token-level, the caption's token embeddings) or ``"sentence"``
            (the caption embedding); ``"pig"`` only (``"pooling"`` is sentence-level).
        generation_contrastive: weight of the pseudo-query vs caption InfoNCE (0 = off).
        mean_skip: the item vector is ``normalize(W mean(tokens) + g * pooled)`` with a learned gate ``g``
            (:class:`~grcm.rerank.pseudo_query.HybridItemEncoder`).
        projection_init: ``"random"``, or ``"identity"``: the text projection starts as the identity (as in
            :class:`DualTower`) and the item tower as the normalised mean of its tokens (needs ``mean_skip``,
            text hidden size == ``feature_dim`` == ``embed_dim``), so step 0 is the zero-shot similarity of a
            pretrained text tower against the mean of its own embeddings of the item's captions.
        item_lr: learning rate of the item tower's token branch (None: ``lr``): every item-tower parameter except
            the mean skip, which plays the dual tower's item projection and trains at ``lr`` like it; the
            warm-up and cosine schedule is shared.
        lr, weight_decay, warmup_steps, temperature, index, ks, mrr_k, eval_item_batch_size,
            gather_negatives, index_path: as in :class:`DualTower`.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 256,
        text_backbone: Literal["scratch", "minilm"] = "scratch",
        text_layers: int = 2,
        text_width: int = 256,
        text_heads: int = 4,
        text_ffn: int = 512,
        dropout: float = 0.1,
        item_width: int = 256,
        item_heads: int = 4,
        use_selector: bool = True,
        top_k: int = 4,
        use_generator: bool = True,
        generation_weight: float = 1.0,
        interaction: Literal["pooling", "pig"] = "pooling",
        pseudo_tokens: int = 8,
        generator_layers: int = 1,
        interaction_layers: int = 2,
        generation_target: Literal["tokens", "sentence"] = "tokens",
        generation_contrastive: float = 0.0,
        mean_skip: bool = False,
        projection_init: Literal["random", "identity"] = "random",
        item_lr: float | None = None,
        pad_token_id: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        temperature: float = 0.07,
        index: DenseIndexConfig | None = None,
        ks: tuple[int, ...] = (1, 5, 10),
        mrr_k: int = 10,
        eval_item_batch_size: int = 1024,
        gather_negatives: bool = True,
        index_path: str | None = None,
    ):
        super().__init__(
            vocab_size,
            feature_dim,
            embed_dim=embed_dim,
            text_backbone=text_backbone,
            text_layers=text_layers,
            text_width=text_width,
            text_heads=text_heads,
            text_ffn=text_ffn,
            dropout=dropout,
            item_projection="linear",
            projection_init=projection_init,
            pad_token_id=pad_token_id,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            temperature=temperature,
            index=index,
            ks=ks,
            mrr_k=mrr_k,
            eval_item_batch_size=eval_item_batch_size,
            gather_negatives=gather_negatives,
            index_path=index_path,
        )
        if generation_weight < 0 or generation_contrastive < 0:
            raise ValueError(
                f"generation_weight and generation_contrastive must be >= 0, got {generation_weight} and "
                f"{generation_contrastive}"
            )
        if item_lr is not None and item_lr <= 0:
            raise ValueError(f"item_lr must be > 0 (or null: lr), got {item_lr}")
        if generation_target not in ("tokens", "sentence"):
            raise ValueError(f"generation_target must be 'tokens' or 'sentence', got {generation_target!r}")
        # this class's own arguments replace the parent's (plain types only: weights_only loading)
        self.save_hyperparameters(ignore=["index"])
        self.hparams["index"] = dataclasses.asdict(self.index_config)
        self.item_tower = HybridItemEncoder(
            feature_dim,
            embed_dim,
            width=item_width,
            num_heads=item_heads,
            use_selector=use_selector,
            top_k=top_k,
            use_generator=use_generator,
            interaction=interaction,
            pseudo_tokens=pseudo_tokens,
            generator_layers=generator_layers,
            interaction_layers=interaction_layers,
            mean_skip=mean_skip,
        )
        if projection_init == "identity":  # the text projection is already the identity (DualTower)
            self.item_tower.identity_init()

    # -- towers ---------------------------------------------------------------------------------
    def encode_items(self, token_features: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` item tokens and ``(B, T)`` bool mask -> ``(B, embed_dim)`` unit item embeddings."""
        return self.item_tower(token_features, token_mask)[0]

    @torch.no_grad()
    def encode_corpus(
        self, features: np.ndarray, token_features: np.ndarray | None = None, token_lengths: np.ndarray | None = None
    ) -> np.ndarray:
        """All items -> ``(N, embed_dim)`` float32 embeddings, in batches of ``eval_item_batch_size``.

        Args:
            features: ``(N, D)`` pooled features (only their count is used).
            token_features: ``(N, T, D)`` token features (required).
            token_lengths: ``(N,)`` valid tokens per item, or None when all ``T`` are valid.
        """
        if token_features is None:
            raise CorpusError(
                "HybridTower reads item token features but the corpus has none; generate the synthetic corpus "
                "with data.token_features=true or add token_features.npy to the corpus "
                "(see docs/data.md, 'Token features')."
            )
        num_items = features.shape[0]
        if token_features.shape[0] != num_items:
            raise CorpusError(f"token features hold {token_features.shape[0]} items but there are {num_items}.")
        out = np.empty((num_items, self.hparams.embed_dim), dtype=np.float32)
        step = self.hparams.eval_item_batch_size
        for start in range(0, num_items, step):
            tokens, mask = token_batch(token_features, token_lengths, np.arange(start, min(start + step, num_items)))
            out[start : start + step] = self.encode_items(tokens.to(self.device), mask.to(self.device)).float().cpu()
        return out

    def embed_corpus(self, corpus) -> np.ndarray:
        """``(N, embed_dim)`` float32 embeddings of every item of a corpus, from its token features
        (what :meth:`DualTower.build_index` and two-stage reranking index)."""
        return self.encode_corpus(corpus.features, corpus.token_features, corpus.token_lengths)

    # -- training -------------------------------------------------------------------------------
    def _queries_and_caption_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One text-tower pass -> ``(B, E)`` unit query embeddings (as :meth:`encode_queries`) and ``(B, T, E)``
        token-level embeddings (the projected token states, not normalised)."""
        tower = self.text_tower
        tokens = tower.projection(tower.token_states(input_ids, attention_mask))
        return torch.nn.functional.normalize(masked_mean(tokens, attention_mask), dim=-1), tokens

    def generation_losses(
        self, pseudo: torch.Tensor, queries: torch.Tensor, caption_tokens: torch.Tensor | None,
        attention_mask: torch.Tensor, items: torch.Tensor, scale: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The generation terms for one batch (targets detached: no gradient into the text tower).

        Args:
            pseudo: each row's pseudo-query, ``(B, E)`` (``"pooling"``) or ``(B, L, E)`` (``"pig"``).
            queries: ``(B, E)`` unit query embeddings.
            caption_tokens: ``(B, T, E)`` token-level caption embeddings (token target only, else None).
            attention_mask: ``(B, T)`` caption mask.
            items: ``(B,)`` item id of each row.
            scale: the InfoNCE inverse temperature.

        Returns:
            ``{"generation": scalar}`` plus ``{"generation_contrastive": scalar}`` when its weight is > 0.
        """
        hp = self.hparams
        if hp.interaction == "pooling":
            sentence, generation = pseudo, pseudo_query_loss(pseudo, queries.detach())
        else:
            sentence = sentence_pseudo_query(pseudo)
            if hp.generation_target == "tokens":
                generation = token_generation_loss(pseudo, caption_tokens.detach(), attention_mask)
            else:
                generation = pseudo_query_loss(sentence, queries.detach())
        losses = {"generation": generation}
        if hp.generation_contrastive > 0:
            losses["generation_contrastive"] = symmetric_info_nce(queries.detach(), sentence, items, scale.detach())
        return losses

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        corpus, hp = self.trainer.datamodule.corpus, self.hparams
        items = batch["item_index"]
        unique_items, inverse = torch.unique(items, return_inverse=True)
        tokens, mask = item_token_batch(corpus, unique_items)
        token_target = hp.interaction == "pig" and hp.generation_target == "tokens" and hp.use_generator
        if token_target:
            queries, caption_tokens = self._queries_and_caption_tokens(batch["input_ids"], batch["attention_mask"])
        else:
            queries, caption_tokens = self.encode_queries(batch["input_ids"], batch["attention_mask"]), None
        item_embeddings, pseudo_queries = self.item_tower(tokens.to(self.device), mask.to(self.device))
        scale = self.log_logit_scale.exp().clamp(max=100.0)
        nce = symmetric_info_nce(queries, item_embeddings[inverse], items, scale)
        loss = nce
        if pseudo_queries is not None:
            terms = self.generation_losses(pseudo_queries[inverse], queries, caption_tokens,
                                           batch["attention_mask"], items, scale)
            loss = nce + hp.generation_weight * terms["generation"]
            if "generation_contrastive" in terms:
                loss = loss + hp.generation_contrastive * terms["generation_contrastive"]
            for name, value in terms.items():
                self.log(f"train/{name}_loss", value, batch_size=len(items))
        self.log("train/nce_loss", nce, batch_size=len(items))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(items))
        self.log("train/logit_scale", scale, batch_size=len(items))
        return loss

    def configure_optimizers(self):
        """:class:`DualTower`'s AdamW and warm-up + cosine schedule; with ``item_lr`` the item tower's token branch
        (all but the mean skip) is its own parameter group at that rate (the schedule scales both groups alike)."""
        config = super().configure_optimizers()
        hp = self.hparams
        if hp.item_lr is None:
            return config
        schedule = config["lr_scheduler"]["scheduler"].lr_lambdas[0]  # the parent's warm-up + cosine factor
        branch = [p for name, p in self.item_tower.named_parameters() if not name.startswith("skip.")]
        ids = {id(p) for p in branch}
        groups = [{"params": [p for p in self.parameters() if id(p) not in ids]}, {"params": branch, "lr": hp.item_lr}]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        config["optimizer"] = optimizer
        config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return config

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[DENSE_MODEL_CLASS_KEY] = type(self).__name__
