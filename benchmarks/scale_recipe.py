"""Scale study, recipe levers without a new fit: beam width and prefix recall at a fixed scored share, on validation.

Reads one size's fits from ``benchmarks/scale.py`` (``<root>/<N>/results.json``: the ACE retriever and the dual
tower) and, for each (beam width B, decoded SID levels p) asked for, decodes ``--val-queries`` validation queries
once and measures on that decode (no test query is read):

- the whole pool: items per query and candidate recall (gold item anywhere in it);
- the pool capped at ``--pool`` items (best beams first; ``TwoStageEvaluation.max_pool_items``), i.e. a fixed
  share of the corpus scored: its candidate recall, the PQ-store dense rerank's R@1 and the fused rerank's R@1
  (weight ``--fusion-weight``, the one the size's run picked on validation);
- generative-only R@1 / R@10 of the retriever at that beam (``val/recall@k``);
- once (the first setting): exact dense top-P candidate recall over all N items (the dual tower's, P = ``--pool``).

A wider beam at a fixed pool tests whether the generative pool misses gold items by search error (the beam
drops a better SID) rather than by model error; prefix recall (p levels < the SID length) spends one beam on each
SID prefix and brings every item under it, instead of one beam per item (ACE's last level only numbers the
items of a shared prefix). Results: ``<out>/levers.json`` (one run directory of its own; nothing else is written).

A retrained variant (``--variant NAME --retriever-override=--trainer.max_epochs=14 ...``) first fits the ACE
retriever with those config overrides on the size's SID bundle under ``<out>/<NAME>/`` (resumable mid-fit, as
``benchmarks/scale.py``'s fits: :mod:`benchmarks.scale_fit`), then measures it the same way into
``<out>/<NAME>/levers.json``.

    nice -n 5 python benchmarks/scale_recipe.py --size-dir runs/scale/10000 --out runs/scale/recipe_10000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from scale import FIT_ACE, FIT_DENSE, PQ_STORE  # noqa: E402  (the scale study's fits and rerank store)

from grcm.demo import _run_dir  # noqa: E402
from grcm.io import write_json_atomic  # noqa: E402


def setting_callbacks(dense: str, pool: int, weight: float, reference: bool) -> list:
    """The two-stage callbacks that score one decode: the whole pool, the capped pool, the capped fused pool."""
    from grcm.rerank.two_stage import TwoStageEvaluation

    common = {"dense_checkpoint": dense, "rerank_store": PQ_STORE}
    return [
        TwoStageEvaluation(**common, name="pool", full_dense_reference=reference, ks=(1, 10, pool)),
        TwoStageEvaluation(**common, name="cap", full_dense_reference=False, max_pool_items=pool),
        TwoStageEvaluation(**common, name="cap_fused", full_dense_reference=False, max_pool_items=pool,
                           generative_weight=weight),
    ]


def fit_variant(size_dir: Path, out: Path, overrides: list[str]) -> dict:
    """Fit the ACE retriever with ``overrides`` on the size's SID bundle, in ``<out>/ace_retriever`` (resumable);
    its record (``<out>/fit.json``) is written once the fit ends and read instead of fitting again."""
    from scale_fit import fit_stage

    from grcm.demo import Stage

    path = out / "fit.json"
    if path.is_file():
        return json.loads(path.read_text())
    num_items = int(size_dir.name)
    stage = Stage(FIT_ACE, "ace_retriever.yaml", test=False, overrides=[
        f"--data.init_args.num_items={num_items}", "--trainer.enable_progress_bar=false",
        f"--model.init_args.bundle_dir={_run_dir(size_dir, 'ace_tokenizer.yaml') / 'bundle'}", *overrides,
    ])
    record = fit_stage(stage, REPO / "experiments" / "synthetic", {}, out)
    record.update({"overrides": overrides, "steps_per_item": record["steps"] / num_items})
    write_json_atomic(path, record)
    return record


def measure(size_dir: Path, out: Path, beam: int, levels: int | None, args: argparse.Namespace,
            reference: bool, retriever: str | None = None) -> dict:
    """Validate the size's ACE retriever at beam ``beam`` decoding ``levels`` SID levels (None: all)."""
    from grcm.lightning_cli import GrcmCLI

    fits = json.loads((size_dir / "results.json").read_text())["fits"]
    checkpoint = retriever or fits[FIT_ACE]["checkpoint"]
    num_items = int(size_dir.name)
    tag = f"beam{beam}_levels{levels or 'all'}"
    cli = GrcmCLI(args=[
        "-c", str(REPO / "experiments" / "synthetic" / "ace_retriever.yaml"),
        f"--trainer.default_root_dir={out / tag}", "--trainer.enable_progress_bar=false",
        f"--model.init_args.bundle_dir={_run_dir(size_dir, 'ace_tokenizer.yaml') / 'bundle'}",
        f"--data.init_args.num_items={num_items}", f"--data.init_args.max_val_queries={args.val_queries}",
    ], run=False)
    model = type(cli.model).load_from_checkpoint(checkpoint, weights_only=True, beam_size=beam,
                                                 recall_levels=levels)
    cli.trainer.callbacks.extend(setting_callbacks(fits[FIT_DENSE]["checkpoint"], args.pool, args.fusion_weight,
                                                   reference))
    started = time.perf_counter()
    val = cli.trainer.validate(model, datamodule=cli.datamodule, verbose=False,
                               ckpt_path=checkpoint)[0]
    val = {key: float(value) for key, value in val.items()}
    result = {
        "beam_size": beam, "recall_levels": levels, "recall_levels_decoded": val["val/pool/recall_levels"],
        "pool_cap": args.pool, "wall_s": time.perf_counter() - started, "loadavg_after": os.getloadavg(),
        "generative_recall@1": val["val/recall@1"], "generative_recall@10": val["val/recall@10"],
        "pool_items": val["val/pool/candidates_per_query"],
        "pool_candidate_recall": val[f"val/pool/candidate_recall@{beam}"],
        "pool_rerank_recall@1": val["val/pool/recall@1"],
        "capped_items": val["val/cap/candidates_per_query"],
        "capped_candidate_recall": val[f"val/cap/candidate_recall@{beam}"],
        "capped_rerank_recall@1": val["val/cap/recall@1"], "capped_fused_recall@1": val["val/cap_fused/recall@1"],
        "capped_stage1_recall@1": val["val/cap/stage1_recall@1"],
    }
    if reference:
        result["exact_dense_top_p_candidate_recall"] = val[f"val/pool/full_dense_recall@{args.pool}"]
        result["exact_dense_recall@1"] = val["val/pool/full_dense_recall@1"]
    return result


def parse_settings(values: list[str]) -> list[tuple[int, int | None]]:
    """``B`` or ``B:p`` -> (beam width, SID levels decoded; None = all)."""
    settings = []
    for value in values:
        beam, _, levels = value.partition(":")
        settings.append((int(beam), int(levels) if levels else None))
    return settings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-dir", type=Path, required=True, help="a size of benchmarks/scale.py: <root>/<N>")
    parser.add_argument("--out", type=Path, required=True, help="this run's own folder (levers.json, logs)")
    parser.add_argument("--settings", nargs="+", default=["25", "50", "100", "25:3", "50:3", "25:2"],
                        help="beam width B, or B:p to decode only the first p SID levels (prefix recall)")
    parser.add_argument("--pool", type=int, default=25, help="items scored per query (the capped pool)")
    parser.add_argument("--fusion-weight", type=float, default=0.05, help="the fused rerank's weight (picked on val)")
    parser.add_argument("--val-queries", type=int, default=2_000, help="validation queries decoded")
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    parser.add_argument("--variant", default=None, help="fit a variant of the ACE retriever under <out>/<variant>")
    parser.add_argument("--retriever-override", action="append", default=[],
                        help="a config override of the variant, e.g. --retriever-override=--trainer.max_epochs=14")
    args = parser.parse_args(argv)
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not (args.size_dir / "results.json").is_file():
        sys.exit(f"{args.size_dir / 'results.json'} not found: run benchmarks/scale.py for that size first.")
    out, retriever, fit = args.out, None, None
    if args.variant:
        out = args.out / args.variant
        fit = fit_variant(args.size_dir, out, args.retriever_override)
        retriever = fit["checkpoint"]
    path = out / "levers.json"
    done = json.loads(path.read_text()) if path.is_file() else {"size_dir": str(args.size_dir), "settings": {}}
    if fit is not None:
        done["fit"] = fit
    for beam, levels in parse_settings(args.settings):
        key = f"{beam}:{levels}" if levels else str(beam)
        if key in done["settings"]:
            continue
        print(f"\n=== recipe lever: beam {beam}, levels {levels or 'all'} ===", flush=True)
        reference = "exact_dense_top_p_candidate_recall" not in done
        result = measure(args.size_dir, out, beam, levels, args, reference, retriever)
        if reference:
            done["exact_dense_top_p_candidate_recall"] = result.pop("exact_dense_top_p_candidate_recall")
            done["exact_dense_recall@1"] = result.pop("exact_dense_recall@1")
        done["settings"][key] = result
        write_json_atomic(path, done)
        print(json.dumps(result), flush=True)
    return done


if __name__ == "__main__":
    main()
