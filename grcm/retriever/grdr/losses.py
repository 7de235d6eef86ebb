"""GRDR's training losses as pure functions of tensors (no module state, no logging).

Shapes: B queries in the batch (each with its item and routed view), V views, l levels trained,
K codes per level, d latent width.

Two losses share one formula, :func:`~grcm.tokenizers.multiview.routed_view_infonce` (each query
against all V views of the batch's items, the routed view of its own item positive), and differ in
their queries and their purpose; they are named for what they do:

* :func:`query_item_infonce` (logged ``train/infonce``, phase weight ``infonce``): the retriever's
  own pooled query vectors against the view latents, GRDR's query-video InfoNCE, which aligns the
  retriever's query encoder with the item views;
* :func:`guided_view_separation` (logged ``train/view_separation_infonce``): fixed guidance query
  embeddings (MiniLM, projected) against the view latents, one of GRDR's view-separation losses
  (weight ``separation_weight``), which keeps an item's V views apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from grcm.tokenizers.multiview import routed_view_infonce


def query_item_infonce(
    queries: Tensor, latents: Tensor, item_index: Tensor, routes: Tensor, temperature: float
) -> Tensor:
    """Retriever query vectors (B, d) against view latents (B, V, d): GRDR's query-item InfoNCE (scalar)."""
    return routed_view_infonce(queries, latents, item_index, routes, temperature)


def guided_view_separation(
    guidance: Tensor, latents: Tensor, item_index: Tensor, routes: Tensor, temperature: float
) -> Tensor:
    """Projected guidance embeddings (B, d) against view latents (B, V, d): view-separation InfoNCE (scalar)."""
    return routed_view_infonce(guidance, latents, item_index, routes, temperature)


def anchor_code_loss(code_logits: list[Tensor], anchors: Tensor) -> Tensor:
    """Code loss against drift: cross-entropy of each level's code logits with the anchor codes.

    Args:
        code_logits: l tensors (B, V, K), level-j logits ``s * cos(r_j, E_j)`` of the B items' residuals.
        anchors: (B, V, >= l) long codes snapshotted at the start of the phase.

    Returns:
        Scalar mean over levels of the per-level mean cross-entropy.
    """
    return torch.stack([
        F.cross_entropy(logits.flatten(0, 1), anchors[:, :, level].flatten())
        for level, logits in enumerate(code_logits)
    ]).mean()


def routed_sid_loss(logits: list[Tensor], targets: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """SID cross-entropy of the decoder against each query's routed-view SID, over the trained levels.

    Args:
        logits: teacher-forced logits, at least l tensors (B, K) (levels past ``targets`` are ignored).
        targets: (B, l) long codes of each query's routed view.
        label_smoothing: cross-entropy label smoothing.

    Returns:
        The scalar loss (mean over levels) and (B,) bool: every level's argmax equals its target.
    """
    levels = targets.shape[1]
    loss = torch.stack([
        F.cross_entropy(logits[level], targets[:, level], label_smoothing=label_smoothing) for level in range(levels)
    ]).mean()
    exact = torch.stack([logits[level].argmax(-1) == targets[:, level] for level in range(levels)], 1).all(1)
    return loss, exact


#: which of an item's V SIDs a training query's SID loss trains: ``routed`` (the view its route names),
#: ``marginal`` (-log of the summed likelihood of all V SIDs) or ``best`` (hard EM: the view the decoder
#: already finds most likely, picked without gradient)
VIEW_TARGETS = ("routed", "marginal", "best")


def view_sid_nll(logits: list[Tensor], targets: Tensor, label_smoothing: float) -> Tensor:
    """Per-view SID negative log-likelihood, summed over the trained levels.

    Args:
        logits: l tensors (B, V, K), teacher-forced level-j logits given view v's SID prefix.
        targets: (B, V, l) long codes of every view of each query's item.
        label_smoothing: cross-entropy label smoothing (0: the exact -log p(SID_v | query)).

    Returns:
        (B, V): ``sum_j CE(logits[j][b, v], targets[b, v, j])``.
    """
    levels = targets.shape[-1]
    return torch.stack([
        F.cross_entropy(logits[level].flatten(0, 1), targets[..., level].flatten(),
                        label_smoothing=label_smoothing, reduction="none").view(targets.shape[:2])
        for level in range(levels)
    ], -1).sum(-1)


def multi_view_sid_loss(view_nll: Tensor, levels: int, view_target: str) -> tuple[Tensor, Tensor]:
    """The SID loss over all V views of each query's item, as a mean over levels like :func:`routed_sid_loss`.

    Args:
        view_nll: (B, V) per-view SID NLL summed over levels (:func:`view_sid_nll`).
        levels: l, the levels trained (the loss is divided by it).
        view_target: ``marginal``: ``-logsumexp_v(-nll_v) / l`` (its gradient weights each view's NLL by
            the view's posterior ``softmax_v(-nll)``, so every view is trained in proportion to how well it
            fits the query); ``best``: ``min_v nll_v / l`` (the view picked without gradient).

    Returns:
        The scalar loss (mean over the batch) and (B,) long: the most likely view of each query.
    """
    best = view_nll.detach().argmin(1)
    if view_target == "marginal":
        per_query = -torch.logsumexp(-view_nll, dim=1)
    elif view_target == "best":
        per_query = view_nll.gather(1, best[:, None]).squeeze(1)
    else:
        raise ValueError(f"view_target must be 'marginal' or 'best' here, got {view_target!r}")
    return per_query.mean() / max(levels, 1), best
