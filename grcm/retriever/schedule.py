"""Learning-rate schedule of the ACE retriever: linear warm-up, then cosine annealing with warm restarts."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LinearLR, LRScheduler, SequentialLR


def warmup_cosine_restarts(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    restart_period: int,
    restart_mult: int = 1,
    warmup_start_lr: float = 1e-6,
    min_lr: float = 0.0,
) -> LRScheduler:
    """Linear warm-up from ``warmup_start_lr`` to the optimizer's lr, then ``CosineAnnealingWarmRestarts``.

    Meant to be stepped once per optimizer step. At step ``s < warmup_steps`` the lr is
    ``start + (peak - start) * s / warmup_steps``; from ``warmup_steps`` on it follows a
    cosine from ``peak`` to ``min_lr`` over ``restart_period`` steps, restarting at ``peak``
    with periods growing by ``restart_mult``.

    Args:
        optimizer: optimizer whose param groups hold the peak lr.
        warmup_steps: warm-up length in steps (0 disables warm-up).
        restart_period: first cosine period in steps (``T_0``).
        restart_mult: period growth factor after each restart (``T_mult``).
        warmup_start_lr: lr at step 0 (ACE: 1e-6).
        min_lr: lowest lr of each cosine period (``eta_min``).
    """
    if restart_period < 1:
        raise ValueError(f"restart_period must be at least one step, got {restart_period}.")
    if restart_mult < 1:
        raise ValueError(f"restart_mult must be an integer >= 1, got {restart_mult}.")
    cosine = CosineAnnealingWarmRestarts(optimizer, T_0=restart_period, T_mult=restart_mult, eta_min=min_lr)
    if warmup_steps <= 0:
        return cosine
    peak = optimizer.param_groups[0]["lr"]
    # CosineAnnealingWarmRestarts already set the lr to its step-0 value (peak); reset for LinearLR.
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    warmup = LinearLR(
        optimizer, start_factor=min(warmup_start_lr / peak, 1.0), end_factor=1.0, total_iters=warmup_steps
    )
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
