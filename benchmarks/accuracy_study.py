"""Accuracy study of the generative retriever on the default synthetic corpus: learning curves.

Trains one experiment config (plus dotted overrides, exactly as ``grcm fit -c CONFIG ARGS`` would)
with validation after every epoch, then tests the model as training left it, and writes JSON with one row per
epoch (wall seconds since the fit started, train SID accuracy, train loss, val R@1/R@10) and the test
metrics. Each run writes under ``--root/<name>`` only.

    python benchmarks/accuracy_study.py --name base -c experiments/synthetic/ace_retriever.yaml \\
        --out benchmarks/results/accuracy/base.json

Every row of docs/studies/accuracy.md's tables is one such command (its overrides are listed there).
The SID bundle the config points at must exist (``grcm fit -c experiments/synthetic/ace_tokenizer.yaml``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L


class EpochCurve(L.Callback):
    """Collects ``{"epoch", "seconds", "train/sid_accuracy_epoch", "val/recall@1", ...}`` after every epoch."""

    KEYS = ("train/sid_accuracy_epoch", "val/recall@1", "val/recall@10", "val/mrr@10")

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after the epoch's validation, when the epoch aggregates of the train metrics exist
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1, "seconds": time.perf_counter() - self.started}
        row.update({key: float(metrics[key]) for key in self.KEYS if key in metrics})
        self.rows.append(row)
        print("curve:", {k: round(v, 4) for k, v in row.items()}, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="run name (its directory under --root)")
    parser.add_argument("-c", "--config", required=True, help="experiment YAML")
    parser.add_argument("--root", default="runs/accuracy_study", help="where runs write")
    parser.add_argument("--out", required=True, help="JSON result path")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args, overrides = parser.parse_known_args(argv)

    import torch

    from grcm.cli import GrcmCLI
    from grcm.io import write_json_atomic

    torch.set_num_threads(args.threads)
    run = Path(args.root) / args.name
    cli_args = [
        "-c", args.config, *overrides,
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}",
        f"--trainer.callbacks.init_args.dirpath={run}/checkpoints",
    ]
    cli = GrcmCLI(args=cli_args, run=False)
    curve = EpochCurve()
    cli.trainer.callbacks.append(curve)
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - started
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    result = {
        "name": args.name,
        "config": args.config,
        "overrides": overrides,
        "fit_seconds": fit_seconds,
        "load_average": os.getloadavg(),
        "curve": curve.rows,
        "test": {key: float(value) for key, value in test.items() if "valid_sid@" not in key or key.endswith("@1")},
        "test_valid_sid": [float(test[f"test/valid_sid@{r}"]) for r in range(1, 1 + sum("valid_sid@" in k for k in test))],
    }
    write_json_atomic(Path(args.out), result)
    print(f"{args.name}: test R@1 {result['test'].get('test/recall@1', float('nan')):.4f}, fit {fit_seconds:.0f} s")


if __name__ == "__main__":
    main()
