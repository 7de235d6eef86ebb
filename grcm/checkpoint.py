"""Checkpointing whose ``last.ckpt`` is always the latest training state.

Lightning (2.5+) writes ``last.ckpt`` only in a step where a top-k checkpoint was also
written. With a monitored metric (``monitor: val/recall@1``) that makes ``last.ckpt`` the
last *improvement*, so ``grcm fit --ckpt_path=last`` after a crash would silently rewind
training to an older state; and a step-triggered save (``every_n_train_steps``) waits for
the monitored metric, so before the first validation nothing is written mid-epoch.
:class:`ModelCheckpoint` keeps every other behaviour of Lightning's and writes ``last.ckpt``
at every checkpoint opportunity (every epoch, and every ``every_n_train_steps`` steps when
set), which is what an exact resume after a kill needs.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; ``save_last`` writes the latest state whenever top-k is considered."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        due = (
            self.save_last
            and self._every_n_train_steps >= 1
            and trainer.global_step % self._every_n_train_steps == 0
            and not self._should_skip_saving_checkpoint(trainer)
        )
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if due and self._last_global_step_saved != trainer.global_step:
            # top-k waits for the monitored metric; the latest state is written now
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_topk_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            # open Lightning's "a top-k checkpoint was saved in this step" gate for last.ckpt
            self._last_global_step_saved = trainer.global_step
