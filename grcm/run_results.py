"""What a finished ``grcm fit|validate|test`` leaves behind: ``<run dir>/results.json`` and one summary line.

``results.json`` holds one section per command, each replaced by the command's latest run and written
atomically (:func:`grcm.io.update_json_atomic`), so a ``grcm test`` after a ``grcm fit`` keeps the fit's
section::

    {"fit":  {"metrics": {"val/recall@1": 0.31, ...}, "monitor": "val/recall@1", "best_score": 0.31,
              "best_checkpoint": "runs/x/checkpoints/best.ckpt", "last_checkpoint": "...", "log_dir": "...",
              "epochs": 9, "global_step": 1134},
     "test": {"metrics": {"test/recall@1": 0.30, ...}, "ckpt_path": "...", "log_dir": "..."}}

``metrics`` are the trainer's final logged scalars (a fit's last validation, a test's results);
values that are not finite are written as null.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L

__all__ = ["RESULTS_FILE", "fit_summary", "log_dir", "results_path", "stage_results", "write_run_results"]

#: File name of the per-run results, in the run directory (``trainer.default_root_dir``).
RESULTS_FILE = "results.json"
#: Metric prefixes recorded per command (a fit records training, validation and SID health scalars).
PREFIXES = {"fit": ("train/", "val/", "sid/"), "validate": ("val/", "sid/"), "test": ("test/",)}


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def log_dir(trainer: L.Trainer) -> str | None:
    """The trainer's log folder as ``trainer.log_dir`` names it, without its broadcast (safe on one rank)."""
    if not trainer.loggers:
        return str(trainer.default_root_dir)
    logger = trainer.loggers[0]
    return getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)


def results_path(trainer: L.Trainer) -> Path:
    """``<run dir>/results.json``."""
    return Path(trainer.default_root_dir) / RESULTS_FILE


def _best_checkpoint(trainer: L.Trainer) -> dict[str, Any]:
    callback = trainer.checkpoint_callback
    if callback is None:
        return {}
    best = getattr(callback, "best_model_path", "") or None
    return {
        "monitor": getattr(callback, "monitor", None),
        "best_score": _number(getattr(callback, "best_model_score", None)),
        "best_checkpoint": best,
        "last_checkpoint": getattr(callback, "last_model_path", "") or None,
    }


def stage_results(trainer: L.Trainer, stage: str, ckpt_path: str | None = None) -> dict[str, Any]:
    """The section of ``results.json`` for ``stage`` (``fit``, ``validate`` or ``test``)."""
    prefixes = PREFIXES.get(stage, ())
    metrics = {name: _number(value) for name, value in sorted(trainer.callback_metrics.items()) if name.startswith(prefixes)}
    section: dict[str, Any] = {"metrics": metrics, "log_dir": log_dir(trainer)}
    if stage == "fit":
        section.update(_best_checkpoint(trainer), epochs=trainer.current_epoch, global_step=trainer.global_step)
    else:
        section["ckpt_path"] = None if ckpt_path is None else str(ckpt_path)
    return section


def write_run_results(trainer: L.Trainer, stage: str, ckpt_path: str | None = None) -> Path | None:
    """Replace ``stage``'s section of ``<run dir>/results.json`` (rank 0; atomically). Returns the file."""
    from grcm.io import update_json_atomic

    if stage not in PREFIXES or not trainer.is_global_zero:
        return None
    path = results_path(trainer)
    update_json_atomic(path, {stage: stage_results(trainer, stage, ckpt_path)})
    return path


def _shown(path: str) -> str:
    """``path`` relative to the working directory when inside it (as the user typed the run directory)."""
    absolute = Path(path).resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def fit_summary(trainer: L.Trainer) -> str:
    """The last line of ``grcm fit``: the run directory, the best checkpoint and its monitored value."""
    run = Path(trainer.default_root_dir)
    best = {key: _shown(value) if key.endswith("_checkpoint") and value else value
            for key, value in _best_checkpoint(trainer).items()}
    if best.get("best_checkpoint") and best.get("monitor"):
        score = best.get("best_score")
        value = "n/a" if score is None else f"{score:.4f}"
        checkpoint = f"best checkpoint {best['best_checkpoint']} ({best['monitor']}={value})"
    elif best.get("best_checkpoint") or best.get("last_checkpoint"):
        checkpoint = f"checkpoint {best.get('last_checkpoint') or best['best_checkpoint']} (no monitored metric)"
    else:
        checkpoint = "no checkpoint written (no ModelCheckpoint callback saved one)"
    return f"grcm fit: run directory {run}; {checkpoint}; metrics in {run / RESULTS_FILE}"
