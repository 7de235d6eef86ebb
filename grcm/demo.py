"""``grcm demo``: the whole pipeline on the synthetic corpus, then one results table.

Every stage is an ordinary experiment config run through :class:`grcm.cli.GrcmCLI`,
exactly as ``grcm fit -c <config>`` / ``grcm test -c <config>`` would run it, so the
table is reproducible stage by stage from the command line. Results are also written
to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from grcm.io import write_json_atomic

COLUMNS = (
    ("R@1", "test/recall@1", "{:.2%}"),
    ("R@5", "test/recall@5", "{:.2%}"),
    ("R@10", "test/recall@10", "{:.2%}"),
    ("MRR@10", "test/mrr@10", "{:.4f}"),
    ("queries/s", "test/queries_per_s", "{:,.0f}"),
    ("index bytes/item", "test/index_bytes_per_item", "{:,.1f}"),
)


@dataclass
class Stage:
    """One step of the demo.

    Attributes:
        name: row label (or a step name when ``row`` is False).
        config: experiment YAML, relative to the experiments folder.
        fit: train before testing.
        test: run ``trainer.test`` and report a row.
        overrides: extra CLI arguments (dotted overrides).
        test_from: name of an earlier stage whose trained model is tested with ``overrides`` applied
            to the model's hyperparameters (an evaluation-only ablation, no retraining).
    """

    name: str
    config: str
    fit: bool = True
    test: bool = True
    overrides: list[str] = field(default_factory=list)
    test_from: str | None = None


STAGES: tuple[Stage, ...] = (
    Stage("dual tower (FAISS Flat, exact)", "dual_tower.yaml"),
)


def _run_stage(stage: Stage, experiments: Path, trained: dict) -> dict[str, float]:
    from grcm.cli import GrcmCLI

    args = ["-c", str(experiments / stage.config), *stage.overrides]
    cli = GrcmCLI(args=args, run=False)
    model = cli.model
    if stage.test_from is not None:
        source_model = trained[stage.test_from]
        model.load_state_dict(source_model.state_dict())
    if stage.fit:
        cli.trainer.fit(model, datamodule=cli.datamodule)
        best = getattr(cli.trainer.checkpoint_callback, "best_model_path", "")
        if best:
            model = type(model).load_from_checkpoint(best, weights_only=True)
    trained[stage.name] = model
    if not stage.test:
        return {}
    results = cli.trainer.test(model, datamodule=cli.datamodule, verbose=False)
    return {key: float(value) for key, value in results[0].items()}


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """Plain-text results table (method + the columns above)."""
    header = ["method", *(name for name, _, _ in COLUMNS)]
    body = [
        [name, *(fmt.format(metrics[key]) if key in metrics else "-" for _, key, fmt in COLUMNS)]
        for name, metrics in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    render = lambda row: " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([render(header), line, *(render(row) for row in body)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="grcm demo", description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", default="experiments/synthetic", help="folder of the stage configs")
    parser.add_argument("--out", default="runs/demo", help="where results.json is written")
    parser.add_argument("--only", nargs="*", default=None, help="run only the stages whose name contains one of these")
    args = parser.parse_args(argv)
    experiments = Path(args.experiments)
    if not experiments.is_dir():
        raise SystemExit(f"grcm demo: {experiments} not found; run from the repository root or pass --experiments.")
    rows: list[tuple[str, dict[str, float]]] = []
    trained: dict = {}
    started = time.perf_counter()
    for stage in STAGES:
        if args.only and not any(word in stage.name for word in args.only):
            continue
        print(f"\n=== grcm demo: {stage.name} ({stage.config}) ===", flush=True)
        metrics = _run_stage(stage, experiments, trained)
        if stage.test:
            rows.append((stage.name, metrics))
    elapsed = time.perf_counter() - started
    table = format_table(rows)
    write_json_atomic(Path(args.out) / "results.json", {"rows": dict(rows), "seconds": elapsed})
    print(f"\ngrcm demo: synthetic corpus, test split ({elapsed:.0f} s)\n")
    print(table)
