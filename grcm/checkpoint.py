"""Checkpointing whose ``last.ckpt`` is always the latest training state.

Lightning (2.5+) writes ``last.ckpt`` only in a step where a top-k checkpoint was also
written. With a monitored metric (``monitor: val/recall@1``) that makes ``last.ckpt`` the
last *improvement*, so ``grcm fit --ckpt_path=last`` after a crash would silently rewind
training to an older state; and a step-triggered save (``every_n_train_steps``) waits for
the monitored metric, so before the first validation nothing is written mid-epoch.
:class:`ModelCheckpoint` keeps every other behaviour of Lightning's and writes ``last.ckpt``
at every checkpoint opportunity (every epoch, and every ``every_n_train_steps`` steps when
set), which is what an exact resume after a kill needs.

Reading checkpoints: :func:`read_checkpoint` loads one with ``weights_only=True`` and turns every
failure (missing, truncated, not a checkpoint) into one :class:`CheckpointError` line that names the
file and the checkpoints beside it. :class:`RunSettingsRecorder` writes the fit's data settings into
every checkpoint, so ``grcm test|validate|predict --ckpt_path`` evaluate on the data that trained it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from grcm.errors import GrcmError

__all__ = ["RUN_SETTINGS_KEY", "CheckpointError", "ModelCheckpoint", "RunSettingsRecorder", "read_checkpoint"]


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


# ------------------------------------------------------------------------------ reading checkpoints
class CheckpointError(GrcmError):
    """A checkpoint file that cannot be used: missing, truncated, not a checkpoint, or another model's."""


def _other_checkpoints(path: Path) -> str:
    """Where to look instead: the ``.ckpt`` files beside ``path`` (inside it, for a run directory), ``last.ckpt`` first."""
    folders = [path, path / "checkpoints"] if path.is_dir() else [path.parent]
    found = sorted(
        (p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt") if p != path and p.is_file()),
        key=lambda p: (p.name != "last.ckpt", p.name != "best.ckpt", str(p)),
    )
    if not found:
        return "pass the run's <run dir>/checkpoints/last.ckpt, or train one first (grcm fit -c <config>)"
    names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
    text = f"{found[0].parent} holds {names}"
    if found[0].name in ("last.ckpt", "best.ckpt"):
        return f"{text}: pass --ckpt_path={found[0]}"
    return f"{text}; pass a run's <run dir>/checkpoints/last.ckpt"


def read_checkpoint(path: str | os.PathLike, what: str = "--ckpt_path") -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``; every failure is one :class:`CheckpointError`.

    The message names the file, what is wrong with it (missing, truncated or damaged, not a checkpoint,
    Python objects other than tensors) and the checkpoints beside it, ``last.ckpt`` first. It never
    repeats torch's advice to load with ``weights_only=False`` (which runs arbitrary code).

    Returns:
        the checkpoint dictionary (``state_dict``, ``hyper_parameters``, ...).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        kind = "a directory, not a checkpoint file" if path.is_dir() else "no such checkpoint"
        raise CheckpointError(f"{what}={path}: {kind}; {_other_checkpoints(path)}.")
    with path.open("rb") as handle:
        head = handle.read(4)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- whatever torch raises, the file is the user's to replace
        text = str(error)
        if "Unsupported global" in text:
            reason = "it holds Python objects other than tensors and plain values, which grcm never unpickles"
        elif head == b"PK\x03\x04":
            reason = "truncated or damaged (a run killed while saving?)"
        elif path.stat().st_size == 0:
            reason = "an empty file"
        else:
            reason = "not a PyTorch checkpoint"
        raise CheckpointError(f"{what}={path}: cannot be loaded, {reason}; {_other_checkpoints(path)}.") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{what}={path}: a PyTorch file but not a Lightning checkpoint (no state_dict); "
            f"{_other_checkpoints(path)}."
        )
    return checkpoint


# ------------------------------------------------------------------- what built a checkpoint
#: Checkpoint key under which :class:`RunSettingsRecorder` stores the fit's data settings and saved config.
RUN_SETTINGS_KEY = "grcm_run"


class RunSettingsRecorder(Callback):
    """Writes the data settings that built a checkpoint into it, so evaluations can restore them.

    Every checkpoint gets ``checkpoint["grcm_run"] = {"data": {"class_path": ..., "init_args": {...}},
    "config": <the fit's saved config file or None>}``, plain values only (it still loads with
    ``weights_only=True``). ``grcm test|validate|predict --ckpt_path`` read it back
    (:class:`grcm.lightning_cli.GrcmCLI`).

    Args:
        data: the resolved ``data`` section of the run's config (class path and init args).
        config_name: the file name the run's resolved config is saved under in the trainer's log dir.
    """

    def __init__(self, data: dict[str, Any], config_name: str | None = None) -> None:
        self.data = json.loads(json.dumps(data, default=str))
        self.config_name = config_name

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        from grcm.run_results import log_dir

        folder = log_dir(trainer)
        config = str(Path(folder) / self.config_name) if self.config_name and folder else None
        checkpoint[RUN_SETTINGS_KEY] = {"data": self.data, "config": config}
