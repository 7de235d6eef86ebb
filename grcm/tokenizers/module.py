"""ACE/CART coarse-fine SID tokenizer as a LightningModule.

SID = (k, v_1, ..., v_M, u):

- k: coarse token, K-Means over all item embeddings (``coarse_token``).
- v_1..v_M: fine tokens, an RQ-VAE over the residual x - c_k (``fine_tokens="rqvae"``),
  or hierarchical K-Means below each coarse cluster (``fine_tokens="hierarchical_kmeans"``,
  DSI/NCI style; nothing is trained).
- u: unique token, counts earlier items holding the same prefix (``unique_token``).

Capacity cap (``sid_capacity`` = c, RQ-VAE fine tokens only; FORGE-style, instead of or besides u): at most
c items per prefix, the overflow moved to the nearest free codes, k never (:mod:`grcm.tokenizers.capacity_cap`).
Health is that of the capped codes, with FORGE's SID quality (:mod:`grcm.tokenizers.sid_quality`).

Ablations of the ACE paper are flags: ``coarse_token=False`` (RQ-VAE on the raw
embedding, Table 2 "w/o K-Means token"), ``fine_tokens="hierarchical_kmeans"``
("w/o RQ-VAE tokens"), ``codebook_size`` (identifier size, Table 4) and
``num_fine_levels`` (identifier length, Table 5).

Training: K-Means (coarse centroids and codebook initialisation) runs once
when fitting starts, over ``trainer.datamodule.corpus.features``; RQ-VAE steps
run on item batches ``{"item_index": (B,), "features": (B, D)}``; after every
training epoch the SID health over all items is logged under ``sid/`` and dead
codes are restarted; when fitting ends, rank 0 writes the SID bundle to
``bundle_dir``. All fitted state is in the state_dict, so a checkpoint alone
reproduces the SIDs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from grcm.ddp import broadcast_from_rank_zero, is_rank_zero
from grcm.tokenizers.bundle import SIDBundle, feature_checksum
from grcm.tokenizers.capacity_cap import capacity_capped_codes
from grcm.tokenizers.health import sid_health
from grcm.tokenizers.kmeans import CoarseKMeans, HierarchicalKMeans
from grcm.tokenizers.rqvae import RQVAE
from grcm.tokenizers.schedule import warmup_inverse_sqrt
from grcm.tokenizers.sid_quality import sid_quality
from grcm.tokenizers.unique_token import append_unique_token

log = logging.getLogger(__name__)

FineTokens = Literal["rqvae", "hierarchical_kmeans"]


class ACETokenizer(L.LightningModule):
    """Coarse (K-Means) + fine (RQ-VAE or hierarchical K-Means) + unique-token SID tokenizer.

    Args:
        feature_dim: item embedding dimension D (linked from the data module).
        coarse_token: prepend the K-Means coarse token k.
        coarse_codebook_size: K coarse clusters (paper: 128).
        fine_tokens: "rqvae" (paper) or "hierarchical_kmeans" (ablation).
        num_fine_levels: M fine tokens (paper: 2).
        codebook_size: codes per fine level (paper: 128).
        unique_token: append the counter u so every item has its own SID.
        sid_capacity: at most this many items per prefix (k, v_1..v_M), the overflow moved to the nearest
            last-level code with room (RQ-VAE fine tokens only); None (default): no cap. 1 without
            ``unique_token`` gives every item its own SID without a counter token.
        latent_dim: RQ-VAE latent / code dimension (paper: 64).
        hidden_dims: RQ-VAE encoder widths (paper: 512, 256, 128); the decoder mirrors them.
        dropout: dropout between RQ-VAE hidden layers.
        alpha: weight of the quantisation loss against reconstruction.
        beta: weight of the commitment term inside the quantisation loss.
        lr: peak Adam learning rate (paper: 1e-4).
        warmup_start_lr: learning rate at epoch 0 (paper: 1e-6).
        warmup_epochs: linear warm-up epochs, then inverse-sqrt decay (paper: 300 of 500).
        weight_decay: Adam weight decay.
        rotation_trick: rotation-trick gradients through the quantiser instead of straight-through.
        kmeans_init: initialise each RQ codebook by K-Means over the residuals of all items.
        kmeans_iters: K-Means iterations (coarse, codebook init, hierarchical).
        dead_code_restart: after each epoch, move codes used by fewer than
            ``dead_code_min_usage`` items onto poorly quantised item residuals (Adam state reset).
        dead_code_min_usage: usage threshold of the restart.
        normalize_features: L2-normalise item embeddings before tokenizing.
        health_pairs: item pairs sampled for the prefix-similarity health metric.
        encode_batch_size: items per chunk when encoding the whole corpus.
        seed: seed of every K-Means and restart draw (identical on all DDP ranks).
        bundle_dir: where rank 0 writes the SID bundle when fitting ends (None: do not write).
    """

    #: Arguments ``grcm <command> --ckpt_path`` may change on the command line (see :mod:`grcm.lightning_cli`).
    EVAL_OVERRIDABLE = ("encode_batch_size", "health_pairs", "bundle_dir")
    #: Folders a fit writes (``grcm fit`` refuses one that already holds another run's bundle).
    OUTPUT_DIRS = ("bundle_dir",)

    def __init__(
        self,
        feature_dim: int,
        coarse_token: bool = True,
        coarse_codebook_size: int = 128,
        fine_tokens: FineTokens = "rqvae",
        num_fine_levels: int = 2,
        codebook_size: int = 128,
        unique_token: bool = True,
        sid_capacity: int | None = None,
        latent_dim: int = 64,
        hidden_dims: Sequence[int] = (512, 256, 128),
        dropout: float = 0.0,
        alpha: float = 1.0,
        beta: float = 0.25,
        lr: float = 1e-4,
        warmup_start_lr: float = 1e-6,
        warmup_epochs: int = 300,
        weight_decay: float = 0.0,
        rotation_trick: bool = False,
        kmeans_init: bool = True,
        kmeans_iters: int = 25,
        dead_code_restart: bool = True,
        dead_code_min_usage: int = 1,
        normalize_features: bool = False,
        health_pairs: int = 10000,
        encode_batch_size: int = 8192,
        seed: int = 0,
        bundle_dir: str | None = None,
    ) -> None:
        super().__init__()
        if fine_tokens not in ("rqvae", "hierarchical_kmeans"):
            raise ValueError(f"fine_tokens must be 'rqvae' or 'hierarchical_kmeans'; got {fine_tokens!r}")
        if num_fine_levels < 1:
            raise ValueError(f"num_fine_levels must be >= 1; got {num_fine_levels}")
        if sid_capacity is not None and (fine_tokens != "rqvae" or sid_capacity < 1):
            raise ValueError(
                f"model.init_args.sid_capacity={sid_capacity}: the capacity cap needs fine_tokens: rqvae (it moves "
                "items by RQ-VAE codebook distance) and a value >= 1; unset it for no cap"
            )
        self.save_hyperparameters()
        self.coarse = CoarseKMeans(feature_dim, coarse_codebook_size) if coarse_token else None
        self.rqvae: RQVAE | None = None
        self.hierarchical: HierarchicalKMeans | None = None
        if fine_tokens == "rqvae":
            self.rqvae = RQVAE(
                feature_dim, latent_dim, hidden_dims, num_fine_levels, codebook_size, rotation_trick, dropout
            )
        else:
            self.hierarchical = HierarchicalKMeans(feature_dim, num_fine_levels, codebook_size)
        self.register_buffer("fitted", torch.tensor(False))

    # ----------------------------------------------------------------- levels

    @property
    def level_names(self) -> list[str]:
        """Names of the SID levels, coarse first, unique token last."""
        names = ["coarse"] if self.coarse is not None else []
        names += [f"fine_{m + 1}" for m in range(self.hparams.num_fine_levels)]
        return names + (["unique"] if self.hparams.unique_token else [])

    @property
    def prefix_vocab_sizes(self) -> list[int]:
        """Vocabulary size of every level before the unique token."""
        sizes = [self.hparams.coarse_codebook_size] if self.coarse is not None else []
        return sizes + [self.hparams.codebook_size] * self.hparams.num_fine_levels

    # --------------------------------------------------------------- encoding

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        x = features.to(self.device, torch.float32)
        return F.normalize(x, dim=-1) if self.hparams.normalize_features else x

    def _split_coarse(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(coarse tokens (B,) or None, RQ-VAE input (B, D)) for prepared features x (B, D)."""
        if self.coarse is None:
            return None, x
        coarse = self.coarse(x)
        return coarse, self.coarse.residual(x, coarse)

    @torch.no_grad()
    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """SID prefix codes (before the unique token): features (B, D) -> (B, L') long."""
        if not bool(self.fitted):
            raise RuntimeError(
                "ACETokenizer is not fitted: train it with `grcm fit -c experiments/<dataset>/ace_tokenizer.yaml` "
                "or load a trained checkpoint"
            )
        was_training = self.training
        self.eval()
        coarse, residual = self._split_coarse(self._prepare(features))
        if self.rqvae is not None:
            fine = self.rqvae.encode_codes(residual)
        else:
            fine = self.hierarchical(self._prepare(features), coarse)
        self.train(was_training)
        codes = [coarse.unsqueeze(1)] if coarse is not None else []
        return torch.cat([*codes, fine], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Alias of ``encode``: features (B, D) -> prefix codes (B, L')."""
        return self.encode(features)

    def _chunks(self, features: np.ndarray | torch.Tensor):  # type: ignore[no-untyped-def]
        size = self.hparams.encode_batch_size
        for start in range(0, features.shape[0], size):
            yield torch.as_tensor(np.asarray(features[start : start + size]))

    @torch.no_grad()
    def encode_corpus(self, features: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """Prefix codes of all items and the RQ-VAE reconstruction MSE.

        features (N, D), numpy (possibly a memmap) or torch -> (codes (N, L') long on CPU, mse or None).
        """
        was_training = self.training
        self.eval()
        codes = torch.cat([self.encode(chunk).cpu() for chunk in self._chunks(features)])
        self.train(was_training)
        return codes, self._reconstruction_mse(features, codes)

    @torch.no_grad()
    def _reconstruction_mse(self, features: np.ndarray | torch.Tensor, codes: torch.Tensor) -> float | None:
        """MSE of the residuals (N, D) rebuilt from the fine levels of ``codes`` (N, L'); None without an RQ-VAE."""
        if self.rqvae is None:
            return None
        levels = self.hparams.num_fine_levels
        squared_error, count, start = 0.0, 0, 0
        was_training = self.training
        self.eval()
        for chunk in self._chunks(features):
            _, residual = self._split_coarse(self._prepare(chunk))
            fine = codes[start : start + len(residual), -levels:].to(self.device)
            squared_error += float((self.rqvae.reconstruct_from_codes(fine) - residual).pow(2).sum())
            count += residual.numel()
            start += len(residual)
        self.train(was_training)
        return squared_error / count if count else None

    @torch.no_grad()
    def corpus_prefix_codes(
        self, features: np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, float | None, float | None]:
        """Prefix codes of all items after the capacity cap (``sid_capacity``; none: the nearest codes).

        features (N, D) -> (codes (N, L') long on CPU, reconstruction MSE of those codes or None, fraction of
        items the cap moved or None without a cap).
        """
        codes, recon_mse = self.encode_corpus(features)
        capacity = self.hparams.get("sid_capacity")
        if capacity is None:
            return codes, recon_mse, None
        capped = capacity_capped_codes(codes, self._latents(features), self.rqvae.quantizer.codebooks, int(capacity))
        moved = float((capped != codes).any(dim=1).float().mean())
        return capped, self._reconstruction_mse(features, capped), moved

    def final_codes(self, prefix: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Full SIDs (N, L) and their vocab sizes from prefix codes (N, L'): the unique token appended if on."""
        if self.hparams.unique_token:
            codes, unique_vocab = append_unique_token(prefix)
            return codes, [*self.prefix_vocab_sizes, unique_vocab]
        return prefix.cpu(), list(self.prefix_vocab_sizes)

    def _health(self, features: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Prefix codes (N, L') after the cap and their health: sid_health, FORGE's quality of the final SIDs,
        ``capacity_moved_fraction`` with a cap."""
        prefix, recon_mse, moved = self.corpus_prefix_codes(features)
        health = sid_health(
            prefix,
            self.prefix_vocab_sizes,
            features,
            recon_mse=recon_mse,
            num_pairs=self.hparams.health_pairs,
            seed=self.hparams.seed,
        )
        health.update(sid_quality(*self.final_codes(prefix)))
        if moved is not None:
            health["capacity_moved_fraction"] = moved
        return prefix, health

    @torch.no_grad()
    def _latents(self, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        """RQ-VAE encoder outputs of all items (N, latent_dim), computed in eval mode."""
        assert self.rqvae is not None
        was_training = self.training
        self.eval()
        latents = [
            self.rqvae.encoder(self._split_coarse(self._prepare(chunk))[1])
            for chunk in self._chunks(features)
        ]
        self.train(was_training)
        return torch.cat(latents)

    # ------------------------------------------------------------ fitting K-Means

    def _corpus(self):  # type: ignore[no-untyped-def]
        datamodule = getattr(self.trainer, "datamodule", None)
        corpus = getattr(datamodule, "corpus", None)
        if corpus is None:
            raise RuntimeError(
                "ACETokenizer needs the item corpus: fit it with a RetrievalDataModule (serve: items) "
                "whose setup() provides `.corpus`"
            )
        if corpus.features.shape[1] != self.hparams.feature_dim:
            raise ValueError(
                f"corpus features have dimension {corpus.features.shape[1]} but the tokenizer was built with "
                f"feature_dim={self.hparams.feature_dim}; set model.init_args.feature_dim to match the data"
            )
        return corpus

    @torch.no_grad()
    def fit_kmeans(self, features: np.ndarray | torch.Tensor) -> None:
        """Fit the coarse centroids and initialise the fine tokens on all item features (N, D)."""
        seed, iters = self.hparams.seed, self.hparams.kmeans_iters
        x = torch.cat([self._prepare(chunk).cpu() for chunk in self._chunks(features)])
        coarse = None
        if self.coarse is not None:
            self.coarse.fit(x, seed=seed, num_iters=iters)
            coarse = self.coarse(x.to(self.device)).cpu()
        if self.hierarchical is not None:
            self.hierarchical.fit(
                x,
                coarse,
                num_roots=self.hparams.coarse_codebook_size if coarse is not None else None,
                seed=seed + 1,
                num_iters=iters,
            )
        self.fitted.fill_(True)
        if self.rqvae is not None and self.hparams.kmeans_init:
            self.rqvae.quantizer.init_from_data(self._latents(features), seed=seed + 2, num_iters=iters)

    def _broadcast_fitted_state(self) -> None:
        """Give every DDP rank rank 0's centroids, codebooks and tree."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return
        fitted_prefixes = ("coarse.", "hierarchical.", "rqvae.quantizer.", "fitted")
        state = {k: v.cpu() for k, v in self.state_dict().items() if k.startswith(fitted_prefixes)}
        state = broadcast_from_rank_zero(self, state)
        self.load_state_dict(state, strict=False)

    def on_fit_start(self) -> None:
        """K-Means initialisation, computed once on rank 0 and broadcast (skipped when resuming a fitted state)."""
        if not bool(self.fitted):
            features = self._corpus().features
            if is_rank_zero(self):
                self.fit_kmeans(features)
            self._broadcast_fitted_state()

    # ---------------------------------------------------------------- training

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if self.rqvae is None:
            return None
        _, residual = self._split_coarse(self._prepare(batch["features"]))
        output = self.rqvae(residual)
        loss = output.total_loss(self.hparams.alpha, self.hparams.beta)
        batch_size = residual.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/recon", output.reconstruction_loss, batch_size=batch_size)
        self.log("train/codebook", output.codebook_loss, batch_size=batch_size)
        self.log("train/commitment", output.commitment_loss, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.rqvae is None:
            return
        _, residual = self._split_coarse(self._prepare(batch["features"]))
        output = self.rqvae(residual)
        loss = output.total_loss(self.hparams.alpha, self.hparams.beta)
        self.log("val/loss", loss, batch_size=residual.shape[0], sync_dist=True)
        self.log("val/recon", output.reconstruction_loss, batch_size=residual.shape[0], sync_dist=True)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Prefix codes of an item batch: {"item_index": (B,), "codes": (B, L')}."""
        return {"item_index": batch["item_index"], "codes": self.encode(batch["features"])}

    def on_train_epoch_end(self) -> None:
        """SID health over all items, then dead-code restarts; both computed on rank 0 and broadcast."""
        features = self._corpus().features
        health = None
        if is_rank_zero(self):
            _, health = self._health(features)
        health = broadcast_from_rank_zero(self, health)
        for key, value in health.items():
            if np.isfinite(value):
                # identical on every rank (broadcast from rank 0); sync_dist keeps DDP quiet
                self.log(f"sid/{key}", value, prog_bar=key == "collision_rate", sync_dist=True)
        if self.rqvae is not None and self.hparams.dead_code_restart:
            self._restart_dead_codes(features)

    @torch.no_grad()
    def _restart_dead_codes(self, features: np.ndarray | torch.Tensor) -> None:
        """Restart dead codes on rank 0 (seeded by epoch, so a resumed fit repeats it), broadcast the result."""
        quantizer = self.rqvae.quantizer
        restarted = None
        if is_rank_zero(self):
            generator = torch.Generator().manual_seed(self.hparams.seed + 1000 * (self.current_epoch + 1))
            restarted = quantizer.restart_dead_codes(
                self._latents(features), min_usage=self.hparams.dead_code_min_usage, generator=generator
            )
        restarted = broadcast_from_rank_zero(self, restarted)
        # a restarted code starts afresh: clear its Adam moments (on every rank, from rank 0's list)
        state = self.optimizers(use_pl_optimizer=False).state.get(quantizer.codebooks, {})
        first_fine_level = 1 if self.coarse is not None else 0
        for level, codes in restarted.items():
            self.log(f"sid/level{first_fine_level + level}_restarted", float(len(codes)), sync_dist=True)
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state and len(codes):
                    state[key][level, codes.to(state[key].device)] = 0
        self._broadcast_fitted_state()

    def configure_optimizers(self) -> dict[str, Any] | None:
        parameters = [p for p in self.parameters() if p.requires_grad]
        if not parameters:
            return None
        optimizer = torch.optim.Adam(parameters, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        start = min(self.hparams.warmup_start_lr / self.hparams.lr, 1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: warmup_inverse_sqrt(epoch, self.hparams.warmup_epochs, start)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    # ----------------------------------------------------------------- bundle

    def build_bundle(self, item_ids: Sequence[str], features: np.ndarray | torch.Tensor) -> SIDBundle:
        """SIDs of all items (N) from their features (N, D), with codebooks, config and health."""
        prefix, health = self._health(features)
        codes, vocab_sizes = self.final_codes(prefix)
        codebooks: dict[str, torch.Tensor] = {}
        if self.coarse is not None:
            codebooks["coarse"] = self.coarse.centroids.detach().cpu()
        if self.rqvae is not None:
            for level, codebook in enumerate(self.rqvae.quantizer.codebooks.detach().cpu()):
                codebooks[f"fine_{level + 1}"] = codebook
        if self.hierarchical is not None:
            codebooks["hierarchical_centroids"] = self.hierarchical.centroids.detach().cpu()
            codebooks["hierarchical_child_offsets"] = self.hierarchical.child_offsets.detach().cpu()
        config = {"tokenizer": type(self).__name__, "level_names": self.level_names, **dict(self.hparams)}
        return SIDBundle(
            item_ids=list(item_ids),
            codes=codes,
            vocab_sizes=vocab_sizes,
            codebooks=codebooks,
            config=config,
            feature_checksum=feature_checksum(item_ids, features),
            health=health,
        )

    def on_fit_end(self) -> None:
        bundle_dir = self.hparams.bundle_dir
        if bundle_dir is None or not self.trainer.is_global_zero:
            return
        corpus = self._corpus()
        bundle = self.build_bundle(corpus.item_ids, corpus.features)
        bundle.save(bundle_dir)
        log.info("SID bundle with %d items written to %s", bundle.num_items, bundle_dir)
