"""Learning-rate schedule of the ACE RQ-VAE: linear warm-up, then inverse-square-root decay."""

from __future__ import annotations

import math


def warmup_inverse_sqrt(epoch: int, warmup_epochs: int, start_factor: float) -> float:
    """Multiplier of the peak learning rate at ``epoch`` (0-based).

    Rises linearly from ``start_factor`` at epoch 0 to 1 at ``warmup_epochs``,
    then decays as sqrt(warmup_epochs / epoch). With no warm-up it decays from
    1 as sqrt(1 / epoch).
    """
    if epoch < warmup_epochs:
        return start_factor + (1.0 - start_factor) * epoch / warmup_epochs
    return math.sqrt(max(warmup_epochs, 1) / max(epoch, 1))
