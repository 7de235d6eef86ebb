"""SID training loss: cross-entropy plus the R-Drop consistency term (ACE).

Two forward passes of the same batch with independent dropout masks give
per-level distributions P and Q; the loss is

    CE + omega * mean_l [KL(P_l || Q_l) + KL(Q_l || P_l)]

where CE is the cross-entropy averaged over levels and over both passes.
``omega = 0`` (or no second pass) disables the consistency term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def symmetric_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(P||Q) + KL(Q||P)`` for one SID level, averaged over the batch.

    Args:
        logits_p: (B, V) logits of the first pass (any leading shape (..., V) works).
        logits_q: logits of the second pass, same shape.

    Returns:
        Scalar tensor >= 0; exactly symmetric in its arguments.
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}.")
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    # KL(P||Q) + KL(Q||P) = sum_v (p_v - q_v) * (log p_v - log q_v)
    per_row = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1)
    return per_row.mean()


def _level_cross_entropy(logits: Sequence[Tensor], targets: Tensor) -> Tensor:
    if len(logits) != targets.shape[1]:
        raise ValueError(f"got logits for {len(logits)} levels but targets of shape {tuple(targets.shape)}.")
    losses = [F.cross_entropy(level_logits.float(), targets[:, level]) for level, level_logits in enumerate(logits)]
    return torch.stack(losses).mean()


def sid_loss(
    logits_a: Sequence[Tensor],
    logits_b: Sequence[Tensor] | None,
    targets: Tensor,
    omega: float = 0.15,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy over SID levels plus ``omega`` times the symmetric KL of two passes.

    Args:
        logits_a: L tensors (B, V_l) from the first pass.
        logits_b: L tensors (B, V_l) from a second pass with fresh dropout, or None.
        targets: (B, L) long target codes.
        omega: weight of the consistency term (ACE: 0.15).

    Returns:
        ``(loss, parts)``: scalar loss and detached parts ``{"ce", "kl"}`` (``kl`` is the
        level-averaged symmetric KL, 0 without a second pass).
    """
    ce = _level_cross_entropy(logits_a, targets)
    kl = ce.new_zeros(())
    if logits_b is not None:
        if len(logits_b) != len(logits_a):
            raise ValueError(f"the two passes have {len(logits_a)} and {len(logits_b)} levels.")
        ce = 0.5 * (ce + _level_cross_entropy(logits_b, targets))
        kl = torch.stack([symmetric_kl(p, q) for p, q in zip(logits_a, logits_b)]).mean()
    loss = ce + omega * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}
