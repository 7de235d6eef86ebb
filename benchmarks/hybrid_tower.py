"""Hybrid tower vs dual tower on the synthetic corpus with token features, side by side in one run.

Every arm is an experiment config run through :class:`grcm.cli.GrcmCLI` (fit, then test of
the best checkpoint), with the same corpus (``data.token_features=true``), text tower,
embedding size, optimiser and epochs:

* ``dual_tower``: ``experiments/synthetic/dual_tower.yaml``; it reads each item's pooled
  feature, i.e. the L2-normalised mean of the item's valid tokens;
* ``dual_tower_attention``: ``experiments/synthetic/dual_tower_attention.yaml``, the same
  token attention pooling (one learned query) as the hybrid tower, no pseudo-query: the
  baseline the pseudo-query has to beat (``hybrid_no_generator`` is the same model, kept
  under its old name);
* ``hybrid_tower``: ``experiments/synthetic/hybrid_tower.yaml``, one pseudo-query vector
  and one pooling layer; ``hybrid_no_selector``: without the token selector;
* ``pig``: ``experiments/synthetic/hybrid_tower_pig.yaml``, pseudo-query tokens supervised
  token-level, two interaction layers; ``pig_*``: one flag changed each (generator off,
  sentence-level target, interaction depth, generation weight, contrastive term);
  ``pig_depth0_no_generation_loss`` (two flags changed) has its own config,
  ``experiments/synthetic/hybrid_tower_pig_depth0_no_generation_loss.yaml``, the setting the study recommends.

Both kinds of model store one ``embed_dim`` float32 vector per item in a FAISS Flat index, so
index bytes per item are equal. With ``--ace-checkpoint`` (a trained
``experiments/synthetic/ace_retriever.yaml`` checkpoint) it also runs two-stage retrieval:
the same generative recall (beam 25, decoded once for the test queries) re-ranked by each
dense model.

Usage::

    python benchmarks/hybrid_tower.py --out benchmarks/results/hybrid_tower.json
    python benchmarks/hybrid_tower.py --quick --out /tmp/hybrid_quick.json   # tiny smoke run
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from grcm.io import write_json_atomic

_PIG = "hybrid_tower_pig.yaml"
ARMS = {
    "dual_tower": ("dual_tower.yaml", []),
    "dual_tower_attention": ("dual_tower_attention.yaml", []),
    "hybrid_tower": ("hybrid_tower.yaml", []),
    "hybrid_no_generator": ("hybrid_tower.yaml", ["--model.init_args.use_generator=false"]),
    "hybrid_no_selector": ("hybrid_tower.yaml", ["--model.init_args.use_selector=false"]),
    "pig": (_PIG, []),
    "pig_no_generator": (_PIG, ["--model.init_args.use_generator=false"]),
    "pig_sentence": (_PIG, ["--model.init_args.generation_target=sentence"]),
    "pig_depth0": (_PIG, ["--model.init_args.interaction_layers=0"]),
    "pig_depth1": (_PIG, ["--model.init_args.interaction_layers=1"]),
    "pig_depth3": (_PIG, ["--model.init_args.interaction_layers=3"]),
    "pig_depth0_sentence": (_PIG, ["--model.init_args.interaction_layers=0",
                                   "--model.init_args.generation_target=sentence"]),
    # hybrid_tower_pig.yaml with interaction_layers=0 and generation_weight=0 (a test checks it): the study's best row
    "pig_depth0_no_generation_loss": ("hybrid_tower_pig_depth0_no_generation_loss.yaml", []),
    "pig_depth0_no_generator": (_PIG, ["--model.init_args.interaction_layers=0",
                                       "--model.init_args.use_generator=false"]),
    "pig_no_generation_loss": (_PIG, ["--model.init_args.generation_weight=0"]),
    "pig_generation_weight0.3": (_PIG, ["--model.init_args.generation_weight=0.3"]),
    "pig_generation_weight3": (_PIG, ["--model.init_args.generation_weight=3"]),
    "pig_contrastive": (_PIG, ["--model.init_args.generation_contrastive=0.5"]),
}
QUICK = [
    "--data.init_args.num_items=200",
    "--trainer.max_epochs=1",
    "--model.init_args.embed_dim=32",
    "--model.init_args.text_width=32",
]


def _uptime() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} x {len(names)}" if names else "unknown"


def _run_arm(config: Path, overrides: list[str], out: Path, reuse: bool) -> tuple[dict[str, float], str, float, int]:
    from grcm.cli import GrcmCLI

    args = ["-c", str(config), "--data.init_args.token_features=true", f"--trainer.default_root_dir={out}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", *overrides]
    cli = GrcmCLI(args=args, run=False)
    cli.trainer.checkpoint_callback.dirpath = str(out / "checkpoints")
    best, seconds = str(out / "checkpoints" / "best.ckpt"), 0.0
    if not (reuse and Path(best).is_file()):
        started = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        seconds = time.perf_counter() - started
        best = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
    model = type(cli.model).load_from_checkpoint(best, weights_only=True)
    results = cli.trainer.test(model, datamodule=cli.datamodule, verbose=False)[0]
    item_parameters = sum(p.numel() for p in model.item_tower.parameters())
    return {key: float(value) for key, value in results.items()}, best, seconds, item_parameters


def _two_stage(ace_checkpoint: str, dense_checkpoints: dict[str, str], cache: Path, quick: bool) -> dict:
    """Generative recall once (beam 25, test queries), re-ranked by each dense model; item-level metrics.

    The candidates are decoded once and cached in ``cache`` (a later run with another dense model
    reuses them), so every reranker sees exactly the same pools. Reranking is
    :func:`grcm.rerank.two_stage.rerank_candidates`, the item embeddings come from
    :func:`grcm.rerank.dense_models.corpus_item_embeddings` (what ``TwoStageEvaluation`` uses).
    """
    import torch

    from grcm.data import SyntheticDataModule
    from grcm.decoding import beams_to_items
    from grcm.metrics import ItemRetrievalMetrics, candidate_recall
    from grcm.rerank.dense_models import corpus_item_embeddings, load_dense_model
    from grcm.rerank.two_stage import full_dense_ranking, rerank_candidates
    from grcm.retriever.module import GenerativeRetriever

    dm = SyntheticDataModule(num_items=200 if quick else 2000, feature_dim=256, token_features=True)
    queries = dm.query_batches("test")
    if cache.is_file():
        candidates = torch.load(cache, weights_only=True)
    else:
        retriever = GenerativeRetriever.load_from_checkpoint(ace_checkpoint, weights_only=True).eval()
        blocks = []
        with torch.no_grad():
            for start in range(0, len(queries), 250):
                rows = list(range(start, min(start + 250, len(queries))))
                batch = queries(rows)
                output = retriever.decode(batch["input_ids"], batch["attention_mask"], beam_size=25)
                blocks.append(beams_to_items(output, retriever.trie))
        width = max(block.shape[1] for block in blocks)
        candidates = torch.cat([torch.nn.functional.pad(b, (0, width - b.shape[1]), value=-1) for b in blocks])
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(candidates, cache)
    gold = queries.gold_items
    report = {"candidate_recall@25": float(candidate_recall(candidates, gold).float().mean()),
              "num_queries": len(queries)}
    for name, path in dense_checkpoints.items():
        dense = load_dense_model(path)
        items = torch.from_numpy(corpus_item_embeddings(dense, dm.corpus))
        with torch.no_grad():
            q = dense.encode_queries(queries.input_ids, queries.attention_mask)
        reranked, _ = rerank_candidates(q, candidates, items, 10)
        metrics, full = ItemRetrievalMetrics(ks=(1, 5, 10), mrr_k=10), ItemRetrievalMetrics(ks=(1, 5, 10), mrr_k=10)
        metrics.update(reranked, gold, queries.query_index)
        full.update(full_dense_ranking(q, items, 10), gold, queries.query_index)
        report[name] = {"two_stage": {k: float(v) for k, v in metrics.compute().items()},
                        "full_dense": {k: float(v) for k, v in full.compute().items()}, "load_after": _uptime()}
        print("two-stage +", name, report[name], flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", default="experiments/synthetic")
    parser.add_argument("--runs", default="runs/bench_hybrid", help="where the arms' checkpoints go")
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--ace-checkpoint", help="trained ace_retriever.yaml checkpoint: also run two-stage")
    parser.add_argument("--quick", action="store_true", help="tiny corpus and models, 1 epoch (smoke run)")
    parser.add_argument("--reuse", action="store_true", help="test an arm's existing best.ckpt instead of fitting")
    parser.add_argument("--override", action="append", default=[], help="an extra dotted override for every arm (repeatable)")
    args = parser.parse_args()
    experiments, runs = Path(args.experiments), Path(args.runs)
    report: dict = {"load_before": _uptime(), "cpu": _cpu(), "arms": {}, "two_stage": {}}
    checkpoints = {}
    for name in args.arms:
        config, overrides = ARMS[name]
        if args.quick:
            overrides = [*overrides, *QUICK] + (["--model.init_args.item_width=32"] if config != "dual_tower.yaml" else [])
        overrides = [*overrides, *args.override]
        metrics, checkpoint, seconds, item_parameters = _run_arm(experiments / config, overrides, runs / name,
                                                                 args.reuse)
        checkpoints[name] = checkpoint
        report["arms"][name] = {"metrics": metrics, "fit_seconds": seconds, "checkpoint": checkpoint,
                                "item_tower_parameters": item_parameters, "load_after": _uptime()}
        print(name, {k: round(v, 4) for k, v in metrics.items()}, f"fit {seconds:.0f} s", flush=True)
    if args.ace_checkpoint:
        dense = {name: path for name, path in checkpoints.items()
                 if name in ("dual_tower", "dual_tower_attention", "hybrid_tower", "pig")}
        report["two_stage"] = _two_stage(args.ace_checkpoint, dense, runs / "ace_test_candidates.pt", args.quick)
    report["load_after"] = _uptime()
    write_json_atomic(Path(args.out), report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
