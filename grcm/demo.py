"""``grcm demo``: the whole pipeline on the synthetic corpus, then one results table.

Every stage is an ordinary experiment config run through :class:`grcm.lightning_cli.GrcmCLI`,
exactly as ``grcm fit -c <config>`` / ``grcm test -c <config>`` would run it, so the
table is reproducible stage by stage from the command line. Results, with every stage's
wall time, are also written to ``<out>/results.json``. The ACE w/o fusion ablation is not
a demo stage (it trains a second retriever); run ``experiments/synthetic/ace_retriever_no_fusion.yaml``.
"""

from __future__ import annotations

import argparse
import shutil
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
    ("corpus scored", "test/corpus_fraction_scored", "{:.2%}"),
)


@dataclass
class Stage:
    """One step of the demo.

    Attributes:
        name: row label (or a step name when ``test`` is False).
        config: experiment YAML, relative to the experiments folder.
        fit: train before testing.
        test: run ``trainer.test`` and report a row.
        overrides: extra CLI arguments (dotted overrides).
        test_from: name of an earlier fitted stage whose best checkpoint is tested instead of training,
            reloaded with ``hparams`` overriding its hyperparameters (an evaluation-only ablation).
        hparams: hyperparameter overrides applied when reloading ``test_from``.
        two_stage: rerank the decoded candidates with the dense model of stage ``reranker`` (adds the
            :class:`~grcm.rerank.two_stage.TwoStageEvaluation` callback; the row shows its metrics).
        reranker: the fitted dense stage whose best checkpoint reranks (empty: ``DENSE``; or ``HYBRID``).
        rerank_store: the two-stage rerank store (:class:`~grcm.rerank.index.DenseIndexConfig` fields;
            empty: float32 ``flat``).
        generative_weight: the two-stage fused score's weight of the stage-1 log-probability (0: dense only).
    """

    name: str
    config: str
    fit: bool = True
    test: bool = True
    overrides: list[str] = field(default_factory=list)
    test_from: str | None = None
    hparams: dict = field(default_factory=dict)
    two_stage: bool = False
    reranker: str = ""
    rerank_store: dict = field(default_factory=dict)
    generative_weight: float = 0.0


DENSE = "dual tower (FAISS Flat, exact)"
HYBRID = "hybrid tower (token features, FAISS Flat)"
# The hybrid tower reads token features: the corpus is generated with them (same items and captions;
# pooled features = mean of the tokens), also when the ACE retriever is tested with the hybrid reranker.
TOKENS = ["--data.init_args.token_features=true"]
ACE = "ACE generative (beam 25)"
GRDR = "GRDR generative (4 views, beam 20)"
#: The GRDR stage's CPU budget: cheap query-guidance embeddings (MiniLM word embeddings, no transformer) and
#: one epoch per phase (6 epochs; grdr.yaml's schedule is 14, about 2.3x the time: docs/studies/grdr.md).
GRDR_DEMO = [
    "--model.init_args.query_encoder=minilm_static",
    "--model.init_args.pretrain_epochs=[1,0,0]", "--model.init_args.main_epochs=[1,1,1]",
    "--model.init_args.fit_epochs=[0,0,2]", "--trainer.max_epochs=6", "--trainer.check_val_every_n_epoch=6",
]
STAGES: tuple[Stage, ...] = (
    Stage(DENSE, "dual_tower.yaml"),
    Stage("ACE tokenizer (SID bundle)", "ace_tokenizer.yaml", test=False),
    Stage(ACE, "ace_retriever.yaml"),
    Stage("ACE w/o constrained beam search", "ace_retriever.yaml", fit=False, test_from=ACE,
          hparams={"constrained": False}),
    Stage("two-stage: ACE recall + dense rerank", "ace_retriever.yaml", fit=False, test_from=ACE, two_stage=True),
    # the same rerank from a product-quantised store (experiments/synthetic/two_stage_pq.yaml): 1/12 of Flat's bytes
    Stage("two-stage: ACE recall + dense rerank (PQ store)", "ace_retriever.yaml", fit=False, test_from=ACE,
          two_stage=True, rerank_store={"kind": "pq", "pq_m": 128, "pq_bits": 4}),
    Stage(GRDR, "grdr.yaml", overrides=GRDR_DEMO),
    Stage("two-stage: GRDR recall + dense rerank", "grdr.yaml", fit=False, test_from=GRDR, two_stage=True,
          overrides=GRDR_DEMO),
    # 2 of the config's 8 epochs (about 2 minutes on 2 cores; benchmarks/hybrid_tower.py runs all 8)
    Stage(HYBRID, "hybrid_tower.yaml", overrides=["--trainer.max_epochs=2"]),
    Stage("generative recall + hybrid-tower rerank", "ace_retriever.yaml", fit=False, test_from=ACE, two_stage=True,
          reranker=HYBRID, overrides=TOKENS),
)


#: Stage configs that read another stage's output, and the argument that points at it.
BUNDLE_OF = {
    "ace_retriever.yaml": "ace_tokenizer.yaml",
    "ace_retriever_no_fusion.yaml": "ace_tokenizer.yaml",
}


def _run_dir(out: Path, config: str) -> Path:
    """Where the demo runs a config: ``<out>/<config stem>`` (its own runs, never a user's)."""
    return out / Path(config).stem


def _run_stage(
    stage: Stage, experiments: Path, checkpoints: dict[str, str], out: Path, callbacks: tuple = ()
) -> dict[str, float]:
    """Fit and/or test one stage; ``callbacks`` join the test run after the stage's own (e.g. a timer)."""
    from grcm.lightning_cli import GrcmCLI  # imports Lightning: not at module level (grcm --help stays fast)

    overrides = [f"--trainer.default_root_dir={_run_dir(out, stage.config)}"]
    if stage.config in BUNDLE_OF:
        overrides.append(f"--model.init_args.bundle_dir={_run_dir(out, BUNDLE_OF[stage.config]) / 'bundle'}")
    cli = GrcmCLI(args=["-c", str(experiments / stage.config), *overrides, *stage.overrides], run=False)
    model = cli.model
    if stage.test_from is not None:
        model = type(model).load_from_checkpoint(checkpoints[stage.test_from], weights_only=True, **stage.hparams)
    if stage.fit:
        cli.trainer.fit(model, datamodule=cli.datamodule)
        best = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
        checkpoints[stage.name] = best
        model = type(model).load_from_checkpoint(best, weights_only=True)
    if not stage.test:
        return {}
    if stage.two_stage:
        from grcm.rerank.two_stage import TwoStageEvaluation

        beam_size = int(getattr(model.hparams, "beam_size", 25))
        callback = TwoStageEvaluation(
            dense_checkpoint=checkpoints[stage.reranker or DENSE], beam_size=beam_size,
            rerank_store=stage.rerank_store or None, generative_weight=stage.generative_weight,
        )
        cli.trainer.callbacks.append(callback)
    cli.trainer.callbacks.extend(callbacks)
    # an evaluation-only stage restores the data module's state (a trained query vocabulary) from the checkpoint
    restore = checkpoints[stage.test_from] if stage.test_from is not None else None
    results = cli.trainer.test(model, datamodule=cli.datamodule, verbose=False, ckpt_path=restore)[0]
    metrics = {key: float(value) for key, value in results.items()}
    if stage.two_stage:  # the row shows the reranked metrics; stage-1 metrics stay in results.json
        metrics.update({key.replace("test/two_stage/", "test/"): v for key, v in metrics.items() if "two_stage" in key})
    return metrics


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
    parser.add_argument(
        "--out", default="runs/demo",
        help="the demo's folder: results.json and one run directory per stage (replaced on every demo run)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="run only the stages whose name contains one of these")
    args = parser.parse_args(argv)
    experiments = Path(args.experiments)
    if not experiments.is_dir():
        raise SystemExit(f"grcm demo: {experiments} not found; run from the repository root or pass --experiments.")
    out = Path(args.out)
    for stage in STAGES:  # the demo's own run directories from an earlier demo
        if stage.fit and (not args.only or any(word in stage.name for word in args.only)):
            shutil.rmtree(_run_dir(out, stage.config), ignore_errors=True)
    rows: list[tuple[str, dict[str, float]]] = []
    checkpoints: dict[str, str] = {}
    stage_seconds: dict[str, float] = {}
    started = time.perf_counter()
    for stage in STAGES:
        if args.only and not any(word in stage.name for word in args.only):
            continue
        print(f"\n=== grcm demo: {stage.name} ({stage.config}) ===", flush=True)
        stage_start = time.perf_counter()
        metrics = _run_stage(stage, experiments, checkpoints, out)
        stage_seconds[stage.name] = time.perf_counter() - stage_start
        if stage.test:
            rows.append((stage.name, metrics))
    elapsed = time.perf_counter() - started
    table = format_table(rows)
    write_json_atomic(
        out / "results.json", {"rows": dict(rows), "seconds": elapsed, "stage_seconds": stage_seconds}
    )
    print(f"\ngrcm demo: synthetic corpus, test split ({elapsed:.0f} s)\n")
    print(table)
    print("\nwall time per stage: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in stage_seconds.items()))
