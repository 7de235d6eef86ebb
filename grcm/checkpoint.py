"""Checkpointing whose ``last.ckpt`` is always the latest training state.

Lightning (2.5+) writes ``last.ckpt`` only in a step where a top-k checkpoint was also
written. With a monitored metric (``monitor: val/recall@1``) that makes ``last.ckpt`` the
last *improvement*, so ``grcm fit --ckpt_path=last`` after a crash would silently rewind
training to an older state. :class:`ModelCheckpoint` keeps every other behaviour of
Lightning's and writes ``last.ckpt`` at every checkpoint opportunity (every epoch, and
every ``every_n_train_steps`` steps when set), which is what an exact resume needs.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; ``save_last`` writes the latest state whenever top-k is considered."""

    def _save_topk_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            # open Lightning's "a top-k checkpoint was saved in this step" gate for last.ckpt
            self._last_global_step_saved = trainer.global_step
