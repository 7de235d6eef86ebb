"""Scale: accuracy, cost and memory of dense and generative retrieval as the synthetic corpus grows.

One command runs every size in turn (default N = 2,000, 10,000 and 50,000 items of the synthetic generator, the
same captions per item) and tests every row on a fixed random sample of 2,000 test queries per size
(``data.max_test_queries``). Each stage is an experiment config of ``experiments/synthetic`` run through the
demo's stage runner (:func:`grcm.demo._run_stage`) with ``--data.init_args.num_items=N``; nothing else changes
between sizes. Rows per size:

- dual tower, FAISS Flat (exact), HNSW and IVF-PQ; each approximate index at its cheapest setting whose
  recall@10 against Flat is >= 0.95, picked on validation queries (:mod:`benchmarks.scale_dense`);
- ACE generative-only; ACE recall + dense rerank from the flat store and from the PQ store; ACE recall + fused
  rerank (PQ store, the weight picked on validation queries);
- GRDR generative and GRDR recall + dense rerank (sizes up to ``--grdr-max-n``);
- stage 1 compared: HNSW's top-P candidate recall at P = ACE's pool size.

Per row: R@1, R@10, MRR@10, candidate recall (gold item in the pool) and pool size, share of the corpus scored,
queries per CPU-second (one torch / FAISS thread; query encoding included), index bytes per item, and the
training wall time, epochs and optimizer steps of the fits the row needs.

Training budget rule (the same for every method, at every N): each config keeps its epochs, batch size and
schedule shape, so every method takes the same number of optimizer steps per item at every N as its config
takes at 2,000 items (steps grow linearly with N; nothing is tuned on test).

Runs write under ``<root>/<N>/`` (one run directory per config) and record every finished fit and row in
``<root>/<N>/results.json`` as soon as it finishes; running the command again skips what is recorded and
resumes at the first missing row; a fit killed half-way continues from its run directory's ``last.ckpt``
(written at least every epoch; :mod:`benchmarks.scale_fit`), so a size too long for one sitting can be spread
over several runs of the same command. The summary goes to ``<root>/scale.json``, ``scale.png`` and
``scale.md``.

    nice -n 5 python benchmarks/scale.py                  # 2k, 10k, 50k in turn, resumable
    python benchmarks/scale.py --sizes 2000 10000          # a subset of the sizes
    python benchmarks/scale.py --quick --root runs/scale_quick   # tiny corpus, one epoch per fit: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parents[1]
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from scale_fit import fit_stage  # noqa: E402

from grcm.demo import ACE, DENSE, GRDR, GRDR_DEMO, Stage, _run_dir  # noqa: E402
from grcm.io import write_json_atomic  # noqa: E402

SIZES = (2_000, 10_000, 50_000)
TEST_QUERIES = 2_000
VAL_QUERIES = 2_000  # validation queries that pick the fusion weight and the approximate indexes' settings
GRDR_MAX_N = 10_000
PQ_STORE = {"kind": "pq", "pq_m": 128, "pq_bits": 4}  # experiments/synthetic/two_stage_pq.yaml

FIT_DENSE, FIT_TOKENIZER, FIT_ACE, FIT_GRDR = "fit: dual tower", "fit: ACE tokenizer", "fit: ACE retriever", "fit: GRDR"
HNSW, IVFPQ = "dual tower (FAISS HNSW)", "dual tower (FAISS IVF-PQ)"
RERANK_FLAT = "ACE recall + dense rerank (flat store)"
RERANK_PQ = "ACE recall + dense rerank (PQ store)"
FUSED = "ACE recall + fused rerank (PQ store, w picked on val)"
GRDR_RERANK = "GRDR recall + dense rerank (flat store)"
#: the fits each row depends on (its training time and epochs are theirs)
FITS_OF = {
    DENSE: (FIT_DENSE,), HNSW: (FIT_DENSE,), IVFPQ: (FIT_DENSE,),
    ACE: (FIT_TOKENIZER, FIT_ACE), RERANK_FLAT: (FIT_TOKENIZER, FIT_ACE, FIT_DENSE),
    RERANK_PQ: (FIT_TOKENIZER, FIT_ACE, FIT_DENSE), FUSED: (FIT_TOKENIZER, FIT_ACE, FIT_DENSE),
    GRDR: (FIT_GRDR,), GRDR_RERANK: (FIT_GRDR, FIT_DENSE),
}
#: --quick: one or two epochs per fit, small networks (a smoke run and the tests; not a measurement)
QUICK = {
    "dual_tower.yaml": ["--trainer.max_epochs=1", "--model.init_args.text_width=64", "--model.init_args.text_layers=1"],
    "ace_tokenizer.yaml": ["--trainer.max_epochs=2", "--model.init_args.warmup_epochs=1",
                           "--model.init_args.hidden_dims=[64]", "--model.init_args.latent_dim=16"],
    "ace_retriever.yaml": ["--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
                           "--model.init_args.restart_period=1", "--model.init_args.d_model=32",
                           "--model.init_args.ffn_dim=64", "--model.init_args.num_encoder_layers=1",
                           "--model.init_args.num_decoder_layers=1"],
    "grdr.yaml": ["--model.init_args.main_epochs=[1,1,1]", "--model.init_args.fit_epochs=[0,0,0]",
                  "--trainer.max_epochs=4", "--trainer.check_val_every_n_epoch=4", "--model.init_args.d_model=32",
                  "--model.init_args.ffn_dim=64", "--model.init_args.num_encoder_layers=1",
                  "--model.init_args.num_decoder_layers=1"],
}


class TestCPUClock(L.Callback):
    """Lightning callback: this process's CPU and wall seconds spent in test batches, and the queries they held.

    Appended after the stage's own callbacks, so a batch's time includes the two-stage rerank. It switches off
    the two-stage callback's full-corpus dense reference (an extra exact search per batch that a deployed
    two-stage system does not run; the exact dense row measures it on its own).
    """

    def __init__(self) -> None:
        self.cpu_seconds = self.wall_seconds = 0.0
        self.queries = 0
        self._started: tuple[float, float] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        from grcm.rerank.two_stage import TwoStageEvaluation

        for callback in trainer.callbacks:
            if isinstance(callback, TwoStageEvaluation):
                callback.full_dense_reference = False

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._started = (time.process_time(), time.perf_counter())

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        cpu, wall = self._started
        self.cpu_seconds += time.process_time() - cpu
        self.wall_seconds += time.perf_counter() - wall
        self.queries += len(batch["query_index"])


def plan(num_items: int, grdr_max_n: int) -> list[Stage]:
    """Every fit and Lightning-tested row of one size, in run order (the dense rows run after ``RERANK_PQ``)."""
    stages = [
        Stage(FIT_DENSE, "dual_tower.yaml", test=False),
        Stage(FIT_TOKENIZER, "ace_tokenizer.yaml", test=False),
        Stage(FIT_ACE, "ace_retriever.yaml", test=False),
        Stage(ACE, "ace_retriever.yaml", fit=False, test_from=FIT_ACE),
        Stage(RERANK_FLAT, "ace_retriever.yaml", fit=False, test_from=FIT_ACE, two_stage=True, reranker=FIT_DENSE),
        Stage(RERANK_PQ, "ace_retriever.yaml", fit=False, test_from=FIT_ACE, two_stage=True, reranker=FIT_DENSE,
              rerank_store=PQ_STORE),
        Stage(FUSED, "ace_retriever.yaml", fit=False, test_from=FIT_ACE, two_stage=True, reranker=FIT_DENSE,
              rerank_store=PQ_STORE),
    ]
    if num_items <= grdr_max_n:
        stages += [
            Stage(FIT_GRDR, "grdr.yaml", test=False, overrides=GRDR_DEMO),
            Stage(GRDR, "grdr.yaml", fit=False, test_from=FIT_GRDR, overrides=GRDR_DEMO),
            Stage(GRDR_RERANK, "grdr.yaml", fit=False, test_from=FIT_GRDR, two_stage=True, reranker=FIT_DENSE,
                  overrides=GRDR_DEMO),
        ]
    return stages


def size_overrides(num_items: int, test_queries: int, quick: bool, config: str) -> list[str]:
    """The only differences between sizes: the corpus size and the test sample (plus --quick's short fits)."""
    return [
        f"--data.init_args.num_items={num_items}", f"--data.init_args.max_test_queries={test_queries}",
        "--trainer.enable_progress_bar=false", *(QUICK.get(config, []) if quick else []),
    ]


class SizeRun:
    """One size's run directory and its ``results.json`` (fits and rows, written after each one finishes)."""

    def __init__(self, root: Path, num_items: int, args: argparse.Namespace) -> None:
        self.num_items, self.args = num_items, args
        self.dir = root / str(num_items)
        self.path = self.dir / "results.json"
        self.state = (json.loads(self.path.read_text()) if self.path.is_file()
                      else {"num_items": num_items, "fits": {}, "rows": {}})
        if self.state.get("test_queries", args.test_queries) != args.test_queries:
            sys.exit(f"{self.path}: written with {self.state['test_queries']} test queries, not "
                     f"--test-queries {args.test_queries}; pass --root with a new folder.")
        self.state["test_queries"] = args.test_queries

    def save(self) -> None:
        write_json_atomic(self.path, self.state)

    def checkpoints(self) -> dict[str, str]:
        return {name: fit["checkpoint"] for name, fit in self.state["fits"].items()}

    def with_size(self, stage: Stage) -> Stage:
        extra = size_overrides(self.num_items, self.args.test_queries, self.args.quick, stage.config)
        return Stage(**{**stage.__dict__, "overrides": [*stage.overrides, *extra]})


def run_stage(size: SizeRun, stage: Stage, callbacks: tuple = ()) -> None:
    """Fit (recording the checkpoint) or test (recording the row) one stage, unless recorded already.

    A fit continues from its run directory's ``last.ckpt`` when an earlier run was killed during it
    (:func:`scale_fit.fit_stage`); ``callbacks`` join the fit (tests stop a fit with one).
    """
    from grcm import demo

    experiments = REPO / "experiments" / "synthetic"
    checkpoints = size.checkpoints()
    staged = size.with_size(stage)
    if not stage.test:
        record = fit_stage(staged, experiments, checkpoints, size.dir, callbacks=callbacks)
        record["steps_per_item"] = record["steps"] / size.num_items
        size.state["fits"][stage.name] = record
        return
    if stage.name == FUSED:
        weight, by_weight = pick_fusion_weight(size, stage)
        staged = Stage(**{**staged.__dict__, "generative_weight": weight})
    clock = TestCPUClock()
    started = time.perf_counter()
    metrics = demo._run_stage(staged, experiments, checkpoints, size.dir, callbacks=(clock,))
    row = row_from_test(metrics, clock, size.num_items)
    row["wall_s"] = time.perf_counter() - started
    if stage.name == FUSED:
        row.update({"fusion_weight": weight, "val_recall@1_by_weight": by_weight})
    size.state["rows"][stage.name] = row


def row_from_test(metrics: dict[str, float], clock, num_items: int) -> dict:
    """A table row from a Lightning test's metrics (two-stage rows: the reranked ones) and its CPU clock."""
    beam = int(metrics.get("test/two_stage/beam_size", 0))
    row = {
        "recall@1": metrics["test/recall@1"], "recall@10": metrics["test/recall@10"],
        "mrr@10": metrics["test/mrr@10"],
        "index_bytes_per_item": metrics.get("test/index_bytes_per_item"),
        "queries_per_cpu_s": clock.queries / max(clock.cpu_seconds, 1e-9),
        "queries_per_s": clock.queries / max(clock.wall_seconds, 1e-9),
        "test_queries": clock.queries,
    }
    if beam:
        row.update({
            "candidate_recall": metrics[f"test/two_stage/candidate_recall@{beam}"],
            "pool_size": metrics["test/two_stage/candidates_per_query"],
            "corpus_fraction_scored": metrics["test/two_stage/corpus_fraction_scored"],
            "generative_recall@1": metrics.get("test/two_stage/stage1_recall@1"),
            "full_dense_recall@1": metrics.get("test/two_stage/full_dense_recall@1"),
        })
    return row


def pick_fusion_weight(size: SizeRun, stage: Stage) -> tuple[float, dict[str, float]]:
    """The fused rerank's weight with the best R@1 (ties: MRR@10, then the smaller weight) on validation queries.

    One decode of ``VAL_QUERIES`` validation queries, one :class:`TwoStageEvaluation` per weight of
    :data:`~grcm.rerank.fusion_weight.FUSION_WEIGHTS`; no test query is read.
    """
    from grcm.lightning_cli import GrcmCLI
    from grcm.rerank.fusion_weight import fusion_weight_callbacks
    from grcm.rerank.fusion_weight import pick_fusion_weight as best_weight

    checkpoints = size.checkpoints()
    staged = size.with_size(stage)
    bundle = _run_dir(size.dir, "ace_tokenizer.yaml") / "bundle"
    cli = GrcmCLI(args=[
        "-c", str(REPO / "experiments" / "synthetic" / stage.config), *staged.overrides,
        f"--trainer.default_root_dir={_run_dir(size.dir, stage.config)}", f"--model.init_args.bundle_dir={bundle}",
        f"--data.init_args.max_val_queries={size.args.val_queries}",
    ], run=False)
    model = type(cli.model).load_from_checkpoint(checkpoints[FIT_ACE], weights_only=True)
    beam = int(model.hparams.beam_size)
    cli.trainer.callbacks.extend(fusion_weight_callbacks(checkpoints[FIT_DENSE], beam_size=beam, rerank_store=PQ_STORE))
    val = cli.trainer.validate(model, datamodule=cli.datamodule, verbose=False, ckpt_path=checkpoints[FIT_ACE])[0]
    weight, scores = best_weight(val)
    return weight, {str(w): r1 for w, (r1, _) in scores.items()}


def dense_stage(size: SizeRun) -> None:
    """The dense rows (Flat, HNSW, IVF-PQ) and HNSW's top-P candidate recall at ACE's pool size P."""
    from scale_dense import dense_rows

    pool = size.state["rows"][RERANK_PQ]["pool_size"]
    overrides = size.with_size(Stage(DENSE, "dual_tower.yaml")).overrides
    rows, stage1 = dense_rows(
        REPO / "experiments" / "synthetic" / "dual_tower.yaml",
        [*overrides, f"--trainer.default_root_dir={_run_dir(size.dir, 'dual_tower.yaml')}",
         f"--data.init_args.max_val_queries={size.args.val_queries}"],
        size.checkpoints()[FIT_DENSE], pool_size=round(pool), quick=size.args.quick,
    )
    size.state["rows"].update(rows)
    size.state["stage1_comparison"] = {**stage1, "ace_pool_size": pool,
                                       "ace_candidate_recall": size.state["rows"][RERANK_PQ]["candidate_recall"]}


def run_size(root: Path, num_items: int, args: argparse.Namespace) -> dict:
    """Every missing fit and row of one size, in order, each recorded as soon as it finishes."""
    size = SizeRun(root, num_items, args)
    for stage in plan(num_items, args.grdr_max_n):
        done = size.state["fits" if not stage.test else "rows"]
        if stage.name in done:
            continue
        print(f"\n=== scale N={num_items}: {stage.name} ({stage.config}) ===", flush=True)
        run_stage(size, stage)
        size.save()
        if stage.name == FUSED and DENSE not in size.state["rows"]:
            print(f"\n=== scale N={num_items}: dense rows ===", flush=True)
            dense_stage(size)
            size.save()
    if DENSE not in size.state["rows"]:
        dense_stage(size)
        size.save()
    finish_rows(size.state)
    size.save()
    return size.state


def finish_rows(state: dict) -> None:
    """Fill each row's training time / epochs from its fits, and ACE generative-only's pool from its rerank row."""
    fits = state["fits"]
    for name, row in state["rows"].items():
        needed = [fits[f] for f in FITS_OF.get(name, ()) if f in fits]
        row["train_seconds"] = sum(f["seconds"] for f in needed)
        row["train_epochs"] = {f: fits[f]["epochs"] for f in FITS_OF.get(name, ()) if f in fits}
        row["train_steps_per_item"] = {f: fits[f]["steps_per_item"] for f in FITS_OF.get(name, ()) if f in fits}
    n = state["num_items"]
    if ACE in state["rows"] and RERANK_FLAT in state["rows"]:  # the same decode: the pool generative-only ranks
        rerank = state["rows"][RERANK_FLAT]
        state["rows"][ACE].update({"candidate_recall": rerank["candidate_recall"], "pool_size": rerank["pool_size"],
                                   "corpus_fraction_scored": 0.0})
    if GRDR in state["rows"] and GRDR_RERANK in state["rows"]:
        rerank = state["rows"][GRDR_RERANK]
        state["rows"][GRDR].update({"candidate_recall": rerank["candidate_recall"], "pool_size": rerank["pool_size"],
                                    "corpus_fraction_scored": 0.0})
    exact = state["rows"].get(DENSE, {}).get("recall@1")
    for row in state["rows"].values():
        row["recall@1_vs_exact_dense"] = row["recall@1"] / exact if exact else None
        if row.get("pool_size") is not None and "corpus_fraction_scored" not in row:
            row["corpus_fraction_scored"] = row["pool_size"] / n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="corpus sizes, run in this order")
    parser.add_argument("--root", type=Path, default=Path("runs/scale"), help="runs and results: <root>/<N>/")
    parser.add_argument("--test-queries", type=int, default=TEST_QUERIES, help="fixed random test sample per size")
    parser.add_argument("--val-queries", type=int, default=VAL_QUERIES,
                        help="validation queries that pick the fusion weight and the approximate index settings")
    parser.add_argument("--grdr-max-n", type=int, default=GRDR_MAX_N, help="GRDR rows at sizes up to this")
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads (queries/CPU-s at 1)")
    parser.add_argument("--quick", action="store_true", help="short fits (tests and smoke runs; use its own --root)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import faiss
    import torch
    from scale_report import write_report

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sizes = {}
    for num_items in args.sizes:
        sizes[str(num_items)] = run_size(args.root, num_items, args)
    summary = {
        "benchmark": "scale", "sizes": sizes, "test_queries": args.test_queries, "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": args.threads, "loadavg_at_end": os.getloadavg()},
        "budget_rule": "each config's epochs, batch size and schedule at every N: fixed optimizer steps per item",
    }
    write_report(args.root, summary)
    return summary


if __name__ == "__main__":
    main()
