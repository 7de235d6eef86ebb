"""GRDR's training recipe beside the losses: view separation terms, stable levels, per-epoch view health.

Shapes: B queries in the batch, V views, d latent width, N items.

* :func:`view_separation_terms`: the separation losses named by ``view_separation`` (guided InfoNCE,
  code-usage balance) plus the view margin (:func:`~grcm.tokenizers.multiview.view_margin_loss`), which
  acts on one item's views directly.
* Stable levels (GRDR): :func:`freeze_earlier_codebooks` stops the codebooks of levels below the
  level a phase builds; :func:`newest_codebook` names the codebook whose optimiser update is scaled
  by ``new_codebook_lr_multiplier`` (:func:`scale_update`); the residual between levels is detached in
  the tokenizer (``MultiViewTokenizer.detach_residual``).
* :func:`view_health` / :func:`epoch_end_health`: the multi-view SID health plus the mean cosine of
  one item's views before quantisation, and the code drift, for every epoch's log.
* :func:`initialise_level` (K-Means of a new level on rank 0, broadcast) and :func:`adam_warmup_cosine`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from grcm.ddp import broadcast_from_rank_zero, is_rank_zero
from grcm.retriever.grdr.losses import guided_view_separation
from grcm.retriever.phases import GROUPS, TRAINABLE, Phase
from grcm.retriever.schedule import warmup_cosine_restarts
from grcm.tokenizers.multiview import (
    MultiViewTokenizer,
    code_usage_balance,
    multiview_health,
    view_latent_cosine,
    view_margin_loss,
)

#: ``pooled``: one K-Means of all views' residuals per level; ``per_view``: view v's residuals fill about K / V
#: codes of every level; ``per_view_first``: per view at level 0 (an item's views start on distinct first
#: codes), pooled at the later levels (every view refines with all K codes)
KMEANS_INITS = ("pooled", "per_view", "per_view_first")


def view_separation_terms(
    tokenizer: MultiViewTokenizer,
    latents: Tensor,
    guidance: Tensor | None,
    items: Tensor,
    routes: Tensor,
    separation: str,
    temperature: float,
    margin: float,
    margin_weight: float,
) -> tuple[dict[str, Tensor], Tensor]:
    """The view-separation losses of one batch and their sum (without ``separation_weight``).

    Args:
        tokenizer: the multi-view tokenizer (for the code-usage balance).
        latents: (B, V, d) view latents of each query's item.
        guidance: (B, d) projected guidance embeddings (needed for ``infonce``/``both``).
        items, routes: (B,) item and routed view of each query.
        separation: ``infonce`` | ``balance`` | ``both`` | ``none``.
        temperature: InfoNCE temperature.
        margin, margin_weight: the view margin term ``margin_weight * view_margin_loss(latents, margin)``.

    Returns:
        The named terms (``view_separation_infonce``, ``usage_balance``, ``view_margin``) and the
        weighted sum ``infonce + balance + margin_weight * margin`` (a 0-dim tensor).
    """
    parts: dict[str, Tensor] = {}
    total = latents.new_zeros(())
    if separation in ("infonce", "both"):
        if guidance is None:
            raise ValueError("view_separation 'infonce' needs the guidance query embeddings")
        parts["view_separation_infonce"] = guided_view_separation(guidance, latents, items, routes, temperature)
        total = total + parts["view_separation_infonce"]
    if separation in ("balance", "both"):
        parts["usage_balance"] = code_usage_balance(tokenizer, latents)
        total = total + parts["usage_balance"]
    if margin_weight:
        parts["view_margin"] = view_margin_loss(latents, margin)
        total = total + margin_weight * parts["view_margin"]
    return parts, total


def freeze_earlier_codebooks(codebooks: Sequence[nn.Parameter], phase: Phase) -> None:
    """Stop ``requires_grad`` of the codebooks of levels below ``phase.level`` (GRDR's stable levels)."""
    for level, codebook in enumerate(codebooks):
        if level < phase.level:
            codebook.requires_grad_(False)


def newest_codebook(codebooks: Sequence[nn.Parameter], phase: Phase) -> nn.Parameter | None:
    """The codebook a phase K-Means-initialised and trains (``main``/``tokenize`` of level l: codebook l)."""
    if phase.initialises_level and TRAINABLE[phase.name]["codebooks"]:
        return codebooks[phase.level]
    return None


@torch.no_grad()
def scale_update(parameter: nn.Parameter, before: Tensor, multiplier: float) -> None:
    """Scale the update an optimiser step made to ``parameter``: ``before + multiplier * (after - before)``.

    For Adam without weight decay this is exactly a learning rate ``multiplier`` times the group's.
    """
    parameter.copy_(before + multiplier * (parameter - before))


@torch.no_grad()
def view_health(tokenizer: MultiViewTokenizer, features: Tensor, codes: Tensor) -> dict[str, float]:
    """:func:`multiview_health` of (N, V, l) codes plus ``view_cosine``: mean cosine of one item's views
    before quantisation, over the (N, D) features."""
    health = multiview_health(codes, tokenizer.vocab_sizes[: codes.shape[-1]])
    health["view_cosine"] = view_latent_cosine(tokenizer.view_latents(features))
    return health


@torch.no_grad()
def epoch_end_health(tokenizer: MultiViewTokenizer, sids: Any,
                     previous: Tensor | None) -> tuple[Tensor, Tensor | None, dict[str, float]]:
    """Refresh the SID table of ``sids``; return its (N, V, l) codes over the l levels built, the code drift
    (share of items whose earlier-level codes differ from ``previous``; None without a comparable
    ``previous``) and :func:`view_health` (empty before any level is built)."""
    levels = int(sids.initialised_levels)
    codes = sids.refresh(tokenizer)[:, :, :levels].clone()
    drift = None
    if previous is not None and 0 < previous.shape[-1] <= levels:
        earlier = previous.shape[-1]
        drift = (codes[:, :, :earlier] != previous.to(codes.device)).any(-1).any(-1).float().mean()
    health = view_health(tokenizer, sids.features_on_device(), codes) if levels else {}
    return codes, drift, health


def parameter_groups(tokenizer: MultiViewTokenizer, model: nn.Module, query_head: nn.Module) -> dict[str, list]:
    """GRDR's parameters in the four groups of :data:`grcm.retriever.phases.GROUPS` (each in exactly one):
    the codebooks (shared with ``model`` when tied), the rest of the tokenizer, the retriever's query
    encoder with ``query_head``, and the rest of ``model`` (its decoder)."""
    codebooks = list(tokenizer.codebooks)
    shared = {id(p) for p in codebooks}
    encoder_modules = [model.token_embedding, model.position_embedding, model.encoder_layers,
                       model.encoder_norms, query_head]
    encoder = {id(p): p for module in encoder_modules for p in module.parameters()}
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUPS}
    groups["codebooks"] = codebooks
    groups["tokenizer"] = [p for p in tokenizer.parameters() if id(p) not in shared]
    groups["encoder"] = list(encoder.values())
    groups["decoder"] = [p for p in model.parameters() if id(p) not in shared and id(p) not in encoder]
    return groups


def initialise_level(module: L.LightningModule, tokenizer: MultiViewTokenizer, sids: Any, level: int, seed: int,
                     per_view: bool) -> None:
    """K-Means-initialise codebook ``level`` from the residuals of ``sids``' features on rank 0, broadcast the
    centroids, and count the level as built (``sids.initialised_levels``)."""
    codebook = tokenizer.codebooks[level]
    centroids = None
    if is_rank_zero(module):
        tokenizer.init_level(sids.features_on_device(), level, seed=seed, per_view=per_view)
        centroids = codebook.detach().cpu()
    centroids = broadcast_from_rank_zero(module, centroids)
    codebook.data.copy_(centroids.to(codebook))
    sids.initialised_levels.fill_(level + 1)


def adam_warmup_cosine(module: L.LightningModule, epochs: int, lr: float, weight_decay: float,
                       warmup_epochs: float, min_lr: float) -> dict[str, Any]:
    """Adam over every parameter with a per-step warm-up + cosine schedule over ``epochs`` epochs."""
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    trainer = module.trainer
    trainer.estimated_stepping_batches  # noqa: B018 -- fills num_training_batches
    batches = trainer.num_training_batches
    steps = max(1, math.ceil(batches / trainer.accumulate_grad_batches)) if math.isfinite(batches) else 1
    scheduler = warmup_cosine_restarts(
        optimizer, warmup_steps=round(warmup_epochs * steps), restart_period=max(1, epochs * steps),
        warmup_start_lr=lr * 1e-3, min_lr=min_lr,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
