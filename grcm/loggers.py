"""Weights & Biases extras: a results table per run and the SID health table/plot, logged from rank 0.

Scalars reach W&B through Lightning's ``WandbLogger`` like any logger. At the end of a
``grcm fit`` / ``grcm test`` (the CLI calls :func:`log_run_tables` when the trainer tears down)
rank 0 adds, to every attached ``WandbLogger``:

- ``{stage}/results``: one row per run, a column per ``val/*`` (fit) or ``test/*`` (test)
  metric, so runs of a sweep compare in one W&B table;
- for SID tokenizers (fit): ``sid/health``, a (metric, value) table of the final SID health
  (utilisation, entropy, collisions, Gini, reconstruction), and ``sid/coarse_tokens``, the
  PCA plot of the items coloured by coarse token (from the written bundle).

Nothing happens without a ``WandbLogger``; metrics are already gathered over ranks, so
rank 0 alone logs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning as L

__all__ = ["log_run_tables", "wandb_loggers"]


def wandb_loggers(trainer: L.Trainer) -> list[Any]:
    """The trainer's ``WandbLogger`` instances (empty when none is attached)."""
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _scalars(trainer: L.Trainer, prefix: str) -> dict[str, float]:
    values = {}
    for name, value in trainer.callback_metrics.items():
        if name.startswith(prefix):
            try:
                values[name] = float(value)
            except (TypeError, ValueError):
                continue
    return dict(sorted(values.items()))


def _sid_plot(pl_module: L.LightningModule, trainer: L.Trainer, directory: Path) -> Path | None:
    bundle_dir = getattr(pl_module, "hparams", {}).get("bundle_dir")
    corpus = getattr(getattr(trainer, "datamodule", None), "corpus", None)
    if not bundle_dir or corpus is None or not (Path(bundle_dir) / "meta.json").is_file():
        return None
    from grcm.tokenizers.plot import plot_coarse_tokens

    return Path(plot_coarse_tokens(bundle_dir, corpus.features, directory / "coarse_tokens.png", max_points=5000))


def log_run_tables(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
    """Log the results table (and, for tokenizers, the SID health table and plot) to W&B from rank 0."""
    loggers = wandb_loggers(trainer)
    if not loggers or not trainer.is_global_zero or stage not in ("fit", "test"):
        return
    results = _scalars(trainer, "val/" if stage == "fit" else "test/")
    health = _scalars(trainer, "sid/") if stage == "fit" else {}
    with tempfile.TemporaryDirectory() as tmp:
        plot = _sid_plot(pl_module, trainer, Path(tmp)) if health else None
        for logger in loggers:
            if results:
                logger.log_table(
                    key=f"{'val' if stage == 'fit' else 'test'}/results",
                    columns=["model", *results],
                    data=[[type(pl_module).__name__, *results.values()]],
                )
            if health:
                logger.log_table(
                    key="sid/health", columns=["metric", "value"], data=[[k, v] for k, v in health.items()]
                )
            if plot is not None:
                logger.log_image(key="sid/coarse_tokens", images=[str(plot)])
