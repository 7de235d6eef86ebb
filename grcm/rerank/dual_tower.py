"""Dual-tower (CLIP-style) baseline: text tower -> item feature space, exact FAISS retrieval.

It is the comparison every generative method is measured against, and the
dense scorer of two-stage retrieval (:meth:`DualTower.encode_queries`,
:meth:`DualTower.encode_items`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import nn

from grcm.metrics import ItemRetrievalMetrics
from grcm.rerank.contrastive import symmetric_info_nce
from grcm.rerank.index import DenseIndex, DenseIndexConfig
from grcm.rerank.text_encoder import ItemProjection, TextEncoder

#: Checkpoint key naming the dense model class that wrote it (:class:`~grcm.rerank.hybrid_tower.HybridTower`
#: sets it; absent in dual-tower checkpoints, which :func:`grcm.rerank.dense_models.dense_model_class` reads
#: from the CLI's ``_class_path`` or defaults to :class:`DualTower`).
DENSE_MODEL_CLASS_KEY = "dense_model_class"


class DualTower(L.LightningModule):
    """Trains a text tower against item features with symmetric InfoNCE; evaluates over the whole corpus.

    Args:
        vocab_size: query vocabulary size (linked from the data).
        feature_dim: item feature dimension D (linked from the data).
        embed_dim: shared embedding dimension.
        text_backbone: ``"scratch"`` or ``"minilm"`` (see :class:`TextEncoder`).
        text_layers, text_width, text_heads, text_ffn, dropout: scratch text tower shape.
        item_projection: ``"mlp"`` (residual MLP) or ``"linear"``.
        projection_init: ``"random"``, or ``"identity"``: both projections start as the identity (the MLP
            branch at zero), so a pretrained text tower whose space the item features already share (e.g.
            MiniLM queries against mean MiniLM caption embeddings) starts as its zero-shot similarity.
            Needs text hidden size == feature_dim == embed_dim.
        pad_token_id: query padding id (linked from the data).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay.
        temperature: initial softmax temperature (learned, clamped to >= 0.01).
        index: FAISS index used for evaluation (exact ``flat`` by default).
        ks, mrr_k: metrics reported.
        eval_item_batch_size: items encoded per forward pass when building the index.
        gather_negatives: under DDP, contrast each query against the items of every rank's batch
            (all-gather with gradients), so N processes with batch B train the same loss as one
            process with batch N*B; False keeps each rank's negatives local.
        index_path: when fitting ends, rank 0 builds the configured FAISS index over the final item
            embeddings and writes it here (atomically, with its ``.json`` sidecar); None: do not write.
        item_feature_noise: while training, each item feature ``x`` fed to the item tower becomes
            ``x + item_feature_noise * |x| / sqrt(D) * e``, ``e ~ N(0, I)`` drawn afresh every step (noise of
            norm about ``item_feature_noise * |x|``); evaluation reads the features as they are. A regulariser
            against the item tower fitting each trained item's own feature vector; on the synthetic inductive
            split (docs/studies/inductive.md) 0.5 lowered R@1 on unseen items more than on seen ones. 0
            (default): no noise.
    """

    #: Arguments ``grcm <command> --ckpt_path`` may change on the command line (see :mod:`grcm.lightning_cli`).
    EVAL_OVERRIDABLE = ("index", "ks", "mrr_k", "eval_item_batch_size")

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
        item_projection: Literal["mlp", "linear"] = "mlp",
        projection_init: Literal["random", "identity"] = "random",
        pad_token_id: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        temperature: float = 0.07,
        index: DenseIndexConfig | None = None,
        ks: tuple[int, ...] = (1, 5, 10),
        mrr_k: int = 10,
        eval_item_batch_size: int = 4096,
        gather_negatives: bool = True,
        index_path: str | None = None,
        item_feature_noise: float = 0.0,
    ):
        super().__init__()
        if not (math.isfinite(item_feature_noise) and item_feature_noise >= 0.0):
            raise ValueError(f"model.item_feature_noise must be a finite number >= 0, got {item_feature_noise}")
        self.item_feature_noise = float(item_feature_noise)
        # hparams hold plain types only, so checkpoints load with weights_only=True
        self.index_config = DenseIndexConfig(**index) if isinstance(index, dict) else (index or DenseIndexConfig())
        self.save_hyperparameters(ignore=["index"])
        self.hparams["index"] = dataclasses.asdict(self.index_config)
        self.text_tower = TextEncoder(
            vocab_size,
            embed_dim,
            backbone=text_backbone,
            d_model=text_width,
            num_layers=text_layers,
            num_heads=text_heads,
            ffn_dim=text_ffn,
            dropout=dropout,
            pad_token_id=pad_token_id,
        )
        self.item_tower = ItemProjection(feature_dim, embed_dim, kind=item_projection)
        if projection_init == "identity":
            self._identity_projections()
        elif projection_init != "random":
            raise ValueError(f"projection_init must be 'random' or 'identity', got {projection_init!r}")
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.val_metrics = ItemRetrievalMetrics(ks=ks, mrr_k=mrr_k)
        self.test_metrics = ItemRetrievalMetrics(ks=ks, mrr_k=mrr_k)
        self.dense_index: DenseIndex | None = None
        self._search_seconds = 0.0
        self._searched_queries = 0

    @torch.no_grad()
    def _identity_projections(self) -> None:
        text, item = self.text_tower.projection, self.item_tower.linear
        shapes = {"text hidden -> embed_dim": tuple(text.weight.shape), "feature_dim -> embed_dim": tuple(item.weight.shape)}
        if any(rows != cols for rows, cols in shapes.values()) or text.weight.shape != item.weight.shape:
            raise ValueError(
                f"projection_init='identity' needs square projections of one size, got {shapes} (out, in); "
                "set model.embed_dim to the feature dimension and use a text tower of that width."
            )
        for linear in (text, item):
            nn.init.eye_(linear.weight)
            nn.init.zeros_(linear.bias)
        if self.item_tower.mlp is not None:
            nn.init.zeros_(self.item_tower.mlp[-1].weight)
            nn.init.zeros_(self.item_tower.mlp[-1].bias)

    # -- towers ---------------------------------------------------------------------------------
    def encode_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` -> ``(B, embed_dim)`` unit query embeddings."""
        return self.text_tower(input_ids, attention_mask)

    def encode_items(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` item features -> ``(B, embed_dim)`` unit item embeddings."""
        return self.item_tower(features)

    @torch.no_grad()
    def encode_corpus(self, features: np.ndarray) -> np.ndarray:
        """All item features ``(N, D)`` -> ``(N, embed_dim)`` float32 embeddings, in batches."""
        out = np.empty((features.shape[0], self.hparams.embed_dim), dtype=np.float32)
        step = self.hparams.eval_item_batch_size
        for start in range(0, features.shape[0], step):
            batch = torch.from_numpy(np.asarray(features[start : start + step], dtype=np.float32)).to(self.device)
            out[start : start + step] = self.encode_items(batch).float().cpu().numpy()
        return out

    def embed_corpus(self, corpus) -> np.ndarray:
        """``(N, embed_dim)`` float32 embeddings of every item of a :class:`~grcm.data.corpus.Corpus`
        (from its pooled features; the hybrid tower reads its token features)."""
        return self.encode_corpus(corpus.features)

    # -- training -------------------------------------------------------------------------------
    def noisy_item_features(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` item features -> ``(B, D)`` features with ``item_feature_noise`` (see the class docstring)
        added, each row's noise scaled to its own norm; the input itself when the noise is 0."""
        if self.item_feature_noise == 0.0:
            return features
        scale = self.item_feature_noise * features.norm(dim=-1, keepdim=True) / math.sqrt(features.shape[-1])
        return features + scale * torch.randn_like(features)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        corpus = self.trainer.datamodule.corpus
        items = batch["item_index"]
        features = torch.from_numpy(np.asarray(corpus.features[items.cpu().numpy()], dtype=np.float32))
        queries = self.encode_queries(batch["input_ids"], batch["attention_mask"])
        item_embeddings = self.encode_items(self.noisy_item_features(features.to(self.device)))
        scale = self.log_logit_scale.exp().clamp(max=100.0)
        if self.hparams.gather_negatives and self.trainer.world_size > 1:
            # (W, B, E) -> (W*B, E); the gradient flows back to every rank's own rows
            queries = self.all_gather(queries, sync_grads=True).flatten(0, 1)
            item_embeddings = self.all_gather(item_embeddings, sync_grads=True).flatten(0, 1)
            items = self.all_gather(items).flatten(0, 1)
        loss = symmetric_info_nce(queries, item_embeddings, items, scale)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(items))
        self.log("train/logit_scale", scale, batch_size=len(items))
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), "interval": "step"},
        }

    # -- evaluation -----------------------------------------------------------------------------
    def build_index(self) -> DenseIndex:
        """Encode the whole corpus and build the configured FAISS index over it."""
        self.dense_index = DenseIndex.build(self.embed_corpus(self.trainer.datamodule.corpus), self.index_config)
        return self.dense_index

    def on_validation_epoch_start(self) -> None:
        self.build_index()

    def on_fit_end(self) -> None:
        """Rank 0 writes the FAISS index of the trained item tower to ``index_path`` (atomically)."""
        if self.hparams.index_path is None or not self.trainer.is_global_zero:
            return
        was_training = self.training
        self.eval()
        self.build_index().save(self.hparams.index_path)
        self.train(was_training)

    def on_test_epoch_start(self) -> None:
        self.build_index()
        self._search_seconds, self._searched_queries = 0.0, 0

    def search(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
        """Full-corpus dense retrieval: ``(B, T)`` queries -> ``(B, k)`` ranked item indices."""
        queries = self.encode_queries(input_ids, attention_mask).float().cpu().numpy()
        _, ranked = self.dense_index.search(queries, k)
        return torch.as_tensor(ranked, dtype=torch.long, device=input_ids.device)

    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: ItemRetrievalMetrics) -> None:
        start = time.perf_counter()
        ranked = self.search(batch["input_ids"], batch["attention_mask"], max(max(self.hparams.ks), self.hparams.mrr_k))
        self._search_seconds += time.perf_counter() - start
        self._searched_queries += len(ranked)
        metrics.update(ranked, batch["gold_items"], batch["query_index"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()}, prog_bar=True, sync_dist=True)
        self.val_metrics.reset()

    def on_predict_epoch_start(self) -> None:
        self.build_index()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """``{"query_index": (B,), "items": (B, K), "scores": (B, K)}``: the top-K items of each query, K = max cut-off."""
        k = max(max(self.hparams.ks), self.hparams.mrr_k)
        queries = self.encode_queries(batch["input_ids"], batch["attention_mask"]).float().cpu().numpy()
        scores, ranked = self.dense_index.search(queries, k)
        return {
            "query_index": batch["query_index"],
            "items": torch.as_tensor(ranked, dtype=torch.long),
            "scores": torch.as_tensor(scores, dtype=torch.float32),
        }

    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test/{k}": v for k, v in self.test_metrics.compute().items()}, sync_dist=True)
        self.test_metrics.reset()
        self.log("test/queries_per_s", self._searched_queries / max(self._search_seconds, 1e-9), sync_dist=True)
        self.log("test/index_bytes_per_item", float(self.dense_index.bytes_per_item))
        if self.index_config.kind == "flat":  # exact search scores every item for every query
            self.log("test/corpus_fraction_scored", 1.0)
