"""Two-stage retrieval with a compact rerank store: R@1 and index bytes/item per store and beam.

One run, one machine. For every beam size it runs ``grcm test`` once on a
trained generative retriever checkpoint with the base config (default
``experiments/synthetic/two_stage_flat.yaml``: model, data, dense checkpoint)
and one :class:`~grcm.rerank.two_stage.TwoStageEvaluation` callback per rerank
store (default: the stores of ``experiments/synthetic/two_stage_{flat,sq8,pq}.yaml``,
logged as ``test/two_stage_<store>/*``). The retriever decodes each test batch
once and every store reranks those same candidates, so the stores are compared
on identical pools, side by side. Each row reports the
two-stage R@1, the same dense model's exact full-corpus R@1 (float32, every
item scored), their ratio, the share of the corpus scored, and bytes per item of
the rerank store and of the whole two-stage index (SID table + trie + store).

The acceptance check of each row: ``recall@1 >= 0.97 x full dense recall@1``,
``corpus_fraction_scored <= 2%`` and ``index_bytes_per_item <= 1/8`` of the
flat store's (a FAISS Flat index of the same embeddings, what dense retrieval
stores). Train the dual tower, the ACE tokenizer and the retriever first
(``grcm fit -c experiments/synthetic/{dual_tower,ace_tokenizer,ace_retriever}.yaml``).

Usage::

    python benchmarks/two_stage_store.py --ckpt runs/synthetic/ace_retriever/checkpoints/best.ckpt \\
        --beams 25 50 --out benchmarks/results/two_stage_store.json

Other arguments go to the test run, e.g. ``--trainer.limit_test_batches=1`` for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from grcm.io import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STORE_CONFIGS = [ROOT / "experiments" / "synthetic" / f"two_stage_{kind}.yaml" for kind in ("flat", "sq8", "pq")]
KEYS = (
    "recall@1",
    "recall@5",
    "recall@10",
    "full_dense_recall@1",
    "recall@1_vs_full_dense",
    "corpus_fraction_scored",
    "candidates_per_query",
    "rerank_store_bytes_per_item",
    "rerank_store_code_bytes_per_item",
    "index_bytes_per_item",
    "latency_ms_per_query",
)
TARGET_RATIO, TARGET_FRACTION, TARGET_SHRINK = 0.97, 0.02, 8.0


def two_stage_args(config: Path) -> dict:
    """The ``init_args`` of the TwoStageEvaluation callback in a config file."""
    callbacks = OmegaConf.to_container(OmegaConf.load(config))["trainer"]["callbacks"]
    found = [c["init_args"] for c in callbacks if c["class_path"].endswith("TwoStageEvaluation")]
    if len(found) != 1:
        sys.exit(f"{config}: expected one TwoStageEvaluation callback under trainer.callbacks, found {len(found)}")
    return found[0]


def run_beam(base: Path, stores: dict[str, dict], beam: int, ckpt: Path, overrides: Sequence[str] = ()) -> list[dict]:
    """``grcm test -c base --model.init_args.beam_size=beam [overrides] --ckpt_path=ckpt``, one callback per store."""
    from grcm.cli import GrcmCLI
    from grcm.rerank.two_stage import TwoStageEvaluation

    cli = GrcmCLI(args=["-c", str(base), f"--model.init_args.beam_size={beam}", *overrides], run=False)
    trainer = cli.trainer
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, TwoStageEvaluation)]
    for store, init_args in stores.items():
        trainer.callbacks.append(TwoStageEvaluation(**{**init_args, "name": f"two_stage_{store}"}))
    results = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt), verbose=False)[0]
    rows = []
    for store, init_args in stores.items():
        prefix = f"test/two_stage_{store}/"
        row = {"store": store, "rerank_store": init_args.get("rerank_store"), "beam": beam}
        row.update({key: float(results[prefix + key]) for key in KEYS})
        row["generative_recall@1"] = float(results["test/recall@1"])
        row["generative_index_bytes_per_item"] = float(results["test/index_bytes_per_item"])
        rows.append(row)
    return rows


def judge(rows: list[dict], flat_bytes: float) -> None:
    """Add the acceptance checks to each row, against the flat store's bytes per item."""
    for row in rows:
        row["bytes_vs_flat"] = row["index_bytes_per_item"] / flat_bytes
        row["meets_ratio"] = row["recall@1_vs_full_dense"] >= TARGET_RATIO
        row["meets_fraction"] = row["corpus_fraction_scored"] <= TARGET_FRACTION
        row["meets_bytes"] = row["index_bytes_per_item"] <= flat_bytes / TARGET_SHRINK
        row["meets_all"] = row["meets_ratio"] and row["meets_fraction"] and row["meets_bytes"]


def format_table(rows: list[dict]) -> str:
    header = "| store | beam | R@1 | full dense R@1 | ratio | corpus scored | store B/item | index B/item | vs flat |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['store']} | {row['beam']} | {row['recall@1']:.4f} | {row['full_dense_recall@1']:.4f} | "
            f"{row['recall@1_vs_full_dense']:.3f} | {row['corpus_fraction_scored']:.2%} | "
            f"{row['rerank_store_bytes_per_item']:.1f} | {row['index_bytes_per_item']:.1f} | "
            f"1/{1 / row['bytes_vs_flat']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="generative retriever checkpoint to test")
    parser.add_argument("--base", type=Path, default=STORE_CONFIGS[0], help="config of the test run (model, data)")
    parser.add_argument("--stores", type=Path, nargs="+", default=STORE_CONFIGS,
                        help="configs whose TwoStageEvaluation callbacks are run side by side (two_stage_<store>.yaml)")
    parser.add_argument("--beams", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "two_stage_store.json", help="JSON report")
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides  # anything else goes to the test run, e.g. --trainer.limit_test_batches=1
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.ckpt.is_file():
        sys.exit(f"--ckpt {args.ckpt}: no checkpoint; train it with grcm fit -c experiments/synthetic/ace_retriever.yaml")
    torch.set_num_threads(args.threads)
    started = time.time()
    stores = {config.stem.removeprefix("two_stage_"): two_stage_args(config) for config in args.stores}
    if "flat" not in stores:
        sys.exit("include experiments/synthetic/two_stage_flat.yaml: the byte target is relative to the flat store")
    rows = [row for beam in args.beams for row in run_beam(args.base, stores, beam, args.ckpt, args.overrides)]
    flat = [row for row in rows if row["store"] == "flat"]
    judge(rows, flat[0]["rerank_store_bytes_per_item"])
    report = {
        "benchmark": "two_stage_store",
        "checkpoint": str(args.ckpt),
        "base_config": str(args.base),
        "overrides": args.overrides,
        "targets": {"recall@1_vs_full_dense": TARGET_RATIO, "corpus_fraction_scored": TARGET_FRACTION,
                    "index_bytes_vs_flat": 1 / TARGET_SHRINK},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "loadavg": os.getloadavg()},
        "seconds": time.time() - started,
        "rows": rows,
    }
    write_json_atomic(args.out, report)
    print(format_table(rows))
    return report


if __name__ == "__main__":
    main()
