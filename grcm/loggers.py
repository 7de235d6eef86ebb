"""Loggers of a run: Weights & Biases extras, a CSV log beside W&B, no empty log folder after a failed start.

- :func:`add_csv_beside_wandb`: a W&B-logged run also writes ``<run dir>/logs/version_N/metrics.csv``.
- :func:`new_log_dirs` / :func:`remove_unused_log_dirs`: the CLI notes the version folders a run will
  create and, when the run fails before logging a metric, deletes them (no empty ``version_N``).
- :func:`finish_wandb`: closes the W&B runs at the end of a command.

W&B extras: a results table per run and the SID health table/plot, logged from rank 0.

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

__all__ = [
    "add_csv_beside_wandb",
    "finish_wandb",
    "log_run_tables",
    "new_log_dirs",
    "remove_unused_log_dirs",
    "wandb_loggers",
]


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


# ------------------------------------------------------------------------------ local logs and cleanup
def add_csv_beside_wandb(trainer: L.Trainer) -> None:
    """A run logged to W&B also gets a local CSV log (``<run dir>/logs/version_N``), placed first.

    Placed first, it is ``trainer.log_dir``: the resolved config is saved beside its ``metrics.csv``.
    Nothing changes when no ``WandbLogger`` is attached or a ``CSVLogger`` already is.
    """
    from lightning.pytorch.loggers import CSVLogger

    if not wandb_loggers(trainer) or any(isinstance(logger, CSVLogger) for logger in trainer.loggers):
        return
    trainer.loggers = [CSVLogger(save_dir=trainer.default_root_dir, name="logs"), *trainer.loggers]


def finish_wandb(trainer: L.Trainer) -> None:
    """Close the attached W&B runs now (their sync output comes before grcm's last line, not at exit)."""
    for logger in wandb_loggers(trainer):
        run = getattr(logger, "_experiment", None)
        if run is not None and hasattr(run, "finish"):
            run.finish()


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def new_log_dirs(trainer: L.Trainer) -> list[tuple[Path, Path]]:
    """The loggers' version folders this run will create: ``(log_dir, the nearest folder above that exists)``.

    Call before the run starts (it fixes a ``CSVLogger``'s version number, as the run would).
    """
    found = []
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir and not Path(log_dir).exists():
            found.append((Path(log_dir), _nearest_existing(Path(log_dir))))
    return found


def _holds_metrics(log_dir: Path) -> bool:
    metrics = log_dir / "metrics.csv"
    if metrics.is_file():
        with metrics.open() as handle:
            return sum(1 for _ in handle) > 1  # a header and at least one row
    return any(path.suffix not in (".yaml", ".csv") for path in log_dir.rglob("*") if path.is_file())


def remove_unused_log_dirs(created: list[tuple[Path, Path]]) -> None:
    """After a failed start: delete the version folders that logged no metric, and the folders made for them.

    A run that logged metrics before failing keeps its folder (its curves matter); a start that failed in
    set-up leaves no empty ``logs/version_N`` behind, so the next run takes the same number.
    """
    import shutil

    for log_dir, existing in created:
        if not log_dir.is_dir() or _holds_metrics(log_dir):
            continue
        shutil.rmtree(log_dir, ignore_errors=True)
        parent = log_dir.parent
        while parent != existing and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
