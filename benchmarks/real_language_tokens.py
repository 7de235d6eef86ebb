"""Real-language benchmark, ``--protocol tokens``: the transductive corpus with each item's held-out caption
embeddings as its token features (the hybrid tower and attention-pooling rows, issue 24).

Run through ``benchmarks/real_language.py --protocol tokens`` (its shared rows and options live there).

Run directly, it is the seed study of the MiniLM token rows on a corpus that protocol built: each row of
``SEED_ROWS`` fitted once per seed, and ACE's pool decoded once (``PoolRecorder``) and reranked by zero-shot MiniLM
and by every fit, pure and fused with the weight picked on the validation queries (``rerank_pool``)::

    python benchmarks/real_language_tokens.py --corpus-dir runs/real_language_tokens/msvd/corpus --seeds 0 1 2 \
      --ace-checkpoint runs/real_language_v2/msvd/ace_retriever/checkpoints/best.ckpt \
      --work runs/real_language_tokens_seeds --out runs/real_language_tokens_seeds/msvd.json

``--model-arg NAME=VALUE`` sets ``--model.init_args.NAME=VALUE`` on every fitted row (a learning-rate grid on
validation: one ``--work`` / ``--out`` per setting).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning as L
from real_language import (
    DATASET_OVERRIDES,
    DENSE_ROWS,
    MINILM_TUNED,
    QUICK,
    READER_OPTIONS,
    SCRATCH,
    ZERO_SHOT,
    Row,
    _cli,
    _embedder,
    _fit,
    _summary,
    _test,
    _validate,
    pick_dense_row,
)

from grcm.data.caption_features import CaptionSplitPlan, caption_feature_corpus
from grcm.data.corpus import save_corpus
from grcm.data.datasets import read_captions
from grcm.io import write_json_atomic
from grcm.rerank.fusion_weight import FUSION_WEIGHTS, fusion_weight_callbacks, pick_fusion_weight

# ------------------------------------------------------------------------------------------------ token features
ATTENTION = "dual tower, attention pooling over caption tokens (scratch text tower)"
HYBRID = "hybrid tower (PIG) over caption tokens (scratch text tower)"
ATTENTION_MINILM = "dual tower, attention pooling over caption tokens (MiniLM text tower fine-tuned)"
HYBRID_MINILM = "hybrid tower (PIG) over caption tokens (MiniLM text tower fine-tuned)"
#: The token-feature rows of ``--protocol tokens``: label -> (config, run directory). The MiniLM rows share
#: dual_tower_minilm.yaml's text tower, projections (identity start), optimiser and steps.
TOKEN_ROWS = {ATTENTION: ("dual_tower_attention.yaml", "dual_tower_attention"),
              HYBRID: ("hybrid_tower_pig.yaml", "hybrid_tower_pig"),
              ATTENTION_MINILM: ("dual_tower_attention_minilm.yaml", "dual_tower_attention_minilm"),
              HYBRID_MINILM: ("hybrid_tower_pig_minilm.yaml", "hybrid_tower_pig_minilm")}
#: ACE's pool is reranked by the dense row picked on validation and by each of these token rows.
TOKEN_RERANKERS = (HYBRID, ATTENTION_MINILM, HYBRID_MINILM)
QUICK_TOKENS = {"dual_tower_attention": QUICK["dual_tower_scratch"], "hybrid_tower_pig": QUICK["dual_tower_scratch"],
                "dual_tower_attention_minilm": QUICK["dual_tower_minilm"],
                "hybrid_tower_pig_minilm": QUICK["dual_tower_minilm"]}


def token_feature_corpus(captions, embed, plan: CaptionSplitPlan, seed: int = 0, max_items: int | None = None):
    """:func:`caption_feature_corpus` with token features: item i's tokens ``(held_out, D)`` are the embeddings of
    its held-out captions, whose L2-normalised mean is its feature (the same items, captions and features)."""
    import dataclasses

    import numpy as np

    from grcm.data.caption_features import split_item_captions

    corpus = caption_feature_corpus(captions, embed, plan, seed=seed, max_items=max_items)
    item_ids, held_out, _ = split_item_captions(captions, plan, seed, max_items)
    if item_ids != corpus.item_ids:
        raise RuntimeError("token_feature_corpus: the held-out captions' items differ from the corpus's (a bug)")
    flat = [text for texts in held_out for text in texts]
    tokens = np.asarray(embed(flat), dtype=np.float32).reshape(len(item_ids), plan.held_out, -1)
    return dataclasses.replace(corpus, token_features=tokens, token_lengths=None).validate(
        source=f"{captions.source} (caption-derived, caption tokens)")


def run_tokens(name: str, args: argparse.Namespace) -> dict:
    """Issue 24's real-language tokens: the transductive corpus with each item's held-out caption embeddings as
    its token features; the dense rows, the attention-pooling dual tower and the hybrid tower (scratch and MiniLM
    text towers), then ACE recall reranked by the dense row picked on validation and by each of
    ``TOKEN_RERANKERS`` (pure and fused)."""
    from grcm.rerank.two_stage import TwoStageEvaluation

    work = Path(args.work) / name
    captions = read_captions(name, Path(args.annotation_dir) / name, **READER_OPTIONS[name])
    plan = CaptionSplitPlan(held_out=args.held_out, test=args.test_per_item, val=1, max_train=args.max_train_per_item)
    corpus = token_feature_corpus(captions, _embedder(args), plan, seed=args.seed, max_items=args.max_items)
    corpus_dir = save_corpus(corpus, work / "corpus")
    counts = {split: int((corpus.caption_split == split).sum()) for split in ("train", "val", "test")}
    print(f"[{name}] token corpus {corpus_dir}: {corpus.num_items} items, tokens {corpus.token_features.shape}, "
          f"queries {counts}", flush=True)

    def overrides(stage: str, extra: tuple | list = ()) -> list[str]:
        quick = QUICK_TOKENS.get(stage, QUICK.get(stage, [])) if args.quick else []
        return [f"--data.init_args.corpus_dir={corpus_dir}", f"--trainer.default_root_dir={work / stage}",
                *DATASET_OVERRIDES.get(name, {}).get(stage, []), *quick, *extra]

    rows: list[Row] = []
    checkpoints: dict[str, str] = {}

    def save_partial() -> None:
        if any(r.name in DENSE_ROWS for r in rows):
            summary = _summary(corpus, counts, plan, args, rows, captions)
            summary["protocol"] = "tokens"
            args.partial_results.setdefault("datasets", {})[name] = summary
            write_json_atomic(args.out, args.partial_results)

    t0 = time.perf_counter()
    cli = _cli("zero_shot_minilm.yaml", overrides("zero_shot_minilm"))
    metrics, seconds = _test(cli, cli.model), time.perf_counter() - t0
    rows.append(Row(ZERO_SHOT, metrics, seconds, _validate("zero_shot_minilm.yaml", overrides("zero_shot_minilm"),
                                                           cli.model)))
    checkpoints[ZERO_SHOT] = str(work / "zero_shot_minilm" / "zero_shot.ckpt")
    cli.trainer.save_checkpoint(checkpoints[ZERO_SHOT])
    save_partial()
    trained = [(MINILM_TUNED, "dual_tower_minilm.yaml", "dual_tower_minilm"),
               (SCRATCH, "dual_tower_scratch.yaml", "dual_tower_scratch"),
               *((label, config, stage) for label, (config, stage) in TOKEN_ROWS.items())]
    for label, config, stage in trained:
        t0 = time.perf_counter()
        cli = _cli(config, overrides(stage))
        best = checkpoints[label] = _fit(cli)
        model = type(cli.model).load_from_checkpoint(best, weights_only=True)
        metrics, seconds = _test(cli, model), time.perf_counter() - t0
        rows.append(Row(label, metrics, seconds, _validate(config, overrides(stage), model)))
        print(f"[{name}] {label}: test R@1 {metrics['test/recall@1']:.4f} ({seconds:.0f} s)", flush=True)
        save_partial()

    # ACE: a given checkpoint trained on this corpus's items (e.g. the transductive run's), or trained here
    t0 = time.perf_counter()
    if args.ace_checkpoint:
        from grcm.retriever.module import GenerativeRetriever

        ace_model = GenerativeRetriever.load_from_checkpoint(args.ace_checkpoint, weights_only=True)
        bundle = Path(args.ace_checkpoint).parents[2] / "ace_tokenizer" / "bundle"  # <run>/ace_retriever/checkpoints
        if not bundle.is_dir():
            raise SystemExit(f"--ace-checkpoint={args.ace_checkpoint}: no tokenizer bundle at {bundle}; pass the "
                             "checkpoint of a benchmark run directory (<work>/<dataset>/ace_retriever/checkpoints)")
        retriever_overrides = [*overrides("ace_retriever"), f"--model.init_args.bundle_dir={bundle}"]
    else:
        _fit(_cli("ace_tokenizer.yaml", overrides("ace_tokenizer")))
        retriever_overrides = [*overrides("ace_retriever"),
                               f"--model.init_args.bundle_dir={work / 'ace_tokenizer' / 'bundle'}"]
        cli = _cli("ace_retriever.yaml", retriever_overrides)
        ace_model = type(cli.model).load_from_checkpoint(_fit(cli), weights_only=True)
    beam = ace_model.hparams.beam_size
    picked = pick_dense_row(rows).name
    rerankers = [picked, *TOKEN_RERANKERS]
    # the fusion weight of each reranker on every validation query: one decode, a callback per (reranker, weight)
    t1 = time.perf_counter()
    cli = _cli("ace_retriever.yaml", [*retriever_overrides, "--data.init_args.max_val_queries=null"])
    for r, dense in enumerate(rerankers):
        cli.trainer.callbacks.extend(fusion_weight_callbacks(checkpoints[dense], prefix=f"r{r}w", beam_size=beam))
    validation = cli.trainer.validate(ace_model, datamodule=cli.datamodule, verbose=False)[0]
    weights = {}
    for r, dense in enumerate(rerankers):
        weight, scores = pick_fusion_weight(validation, prefix=f"r{r}w")
        weights[dense] = (weight, {str(w): r1 for w, (r1, _) in scores.items()})
    pick_seconds = time.perf_counter() - t1
    t1 = time.perf_counter()
    cli = _cli("ace_retriever.yaml", retriever_overrides)
    callbacks = []
    for r, dense in enumerate(rerankers):
        callbacks += [TwoStageEvaluation(dense_checkpoint=checkpoints[dense], beam_size=beam, name=f"r{r}pure"),
                      TwoStageEvaluation(dense_checkpoint=checkpoints[dense], beam_size=beam, name=f"r{r}fused",
                                         generative_weight=weights[dense][0], full_dense_reference=False)]
    metrics = _test(cli, ace_model, callbacks)
    seconds = time.perf_counter() - t1
    rows.append(Row(f"ACE generative (beam {beam})", {k: v for k, v in metrics.items() if k.count("/") == 1},
                    seconds))
    for r, dense in enumerate(rerankers):
        weight, by_weight = weights[dense]
        for tag, label, extra in (
                ("pure", f"ACE recall + rerank by {dense}", 0.0),
                ("fused", f"ACE recall + fused rerank by {dense} (w = {weight}, picked on val)", pick_seconds)):
            reranked = {k.replace(f"test/r{r}{tag}/", "test/"): v for k, v in metrics.items()
                        if k.startswith(f"test/r{r}{tag}/")}
            if tag == "fused":
                reranked |= {"fusion_weight": weight, "val_recall@1_by_weight": by_weight}
            rows.append(Row(label, reranked, seconds + extra))
    print(f"[{name}] ACE reranked ({time.perf_counter() - t0:.0f} s): "
          + "; ".join(f"{r.name} R@1 {r.metrics['test/recall@1']:.4f}" for r in rows if r.name.startswith("ACE")),
          flush=True)
    save_partial()
    return args.partial_results["datasets"][name]


# ------------------------------------------------------------------------------- seeds over one recorded ACE pool
#: The rows of the seed study (``main``): name -> (label, config). Each is fitted once per seed on the same corpus.
SEED_ROWS = {"dual_tower_minilm": (MINILM_TUNED, "dual_tower_minilm.yaml"),
             "hybrid_minilm": (HYBRID_MINILM, "hybrid_tower_pig_minilm.yaml"),
             "attention_minilm": (ATTENTION_MINILM, "dual_tower_attention_minilm.yaml")}
METRIC_KEYS = ("recall@1", "recall@5", "recall@10", "mrr@10")


class PoolRecorder(L.Callback):
    """Keeps, per val/test batch, the queries and the stage-1 pool the retriever's step returned.

    ``batches[stage]`` is a list of dicts on the CPU: ``input_ids`` / ``attention_mask`` (B, T), ``query_index``
    (B,), ``gold_items`` (B, G) and the step's ``candidates`` (B, M) and ``candidate_scores`` (B, M), exactly
    what :class:`~grcm.rerank.two_stage.TwoStageEvaluation` reranks, so one decode serves any number of dense
    models (:func:`rerank_pool`).
    """

    KEYS = ("input_ids", "attention_mask", "query_index", "gold_items")

    def __init__(self) -> None:
        super().__init__()
        self.batches: dict[str, list[dict]] = {}

    def _keep(self, stage: str, outputs, batch) -> None:
        if not isinstance(outputs, dict) or "candidate_scores" not in outputs:
            raise RuntimeError("PoolRecorder: the retriever's step returned no candidates with candidate_scores; "
                               "record the pool of a GenerativeRetriever")
        kept = {key: batch[key].detach().cpu() for key in self.KEYS}
        kept |= {key: outputs[key].detach().cpu() for key in ("candidates", "candidate_scores")}
        self.batches.setdefault(stage, []).append(kept)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.batches["val"] = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.batches["test"] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep("val", outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep("test", outputs, batch)


def rerank_pool(batches: list[dict], dense_checkpoint: str, datamodule, weights=(0.0,)) -> dict[float, dict]:
    """Item-level metrics of the recorded pool (``PoolRecorder.batches[stage]``) reranked by the dense model of
    ``dense_checkpoint``, one entry per fusion weight ``w`` (score ``<query, item> + w * log p``), computed as
    :class:`~grcm.rerank.two_stage.TwoStageEvaluation` with a flat store computes them, but with the queries
    encoded once for every weight. ``datamodule``: the evaluation data module (its corpus and tokenizer)."""
    import torch

    from grcm.metrics import ItemRetrievalMetrics
    from grcm.rerank.candidate_rerank import rerank_candidates
    from grcm.rerank.dense_models import corpus_item_embeddings, dense_query_tokenizer, load_dense_model
    from grcm.rerank.query_bridge import dense_query_inputs, dense_tokenizer_for

    dense = load_dense_model(dense_checkpoint)
    vocab = int(dense.hparams.vocab_size)
    tokenizer = dense_tokenizer_for(datamodule, dense_query_tokenizer(dense_checkpoint, vocab), vocab)
    corpus = datamodule.corpus
    items = torch.from_numpy(corpus_item_embeddings(dense, corpus))
    metrics = {float(w): ItemRetrievalMetrics(ks=(1, 5, 10), mrr_k=10) for w in weights}
    with torch.no_grad():
        for batch in batches:
            queries = dense.encode_queries(*dense_query_inputs(batch, tokenizer, corpus))
            for weight, metric in metrics.items():
                ranked, _ = rerank_candidates(queries, batch["candidates"].long(), items, 10,
                                              generative_scores=batch["candidate_scores"], generative_weight=weight)
                metric.update(ranked, batch["gold_items"], batch["query_index"])
    return {weight: {key: float(value) for key, value in metric.compute().items()}
            for weight, metric in metrics.items()}


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of ``values``."""
    import numpy as np

    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max()), "n": len(array)}


def run_seeds(args: argparse.Namespace) -> dict:
    """The MiniLM rows of ``SEED_ROWS`` fitted once per seed on an existing token corpus, each tested and validated
    on every validation query, then ACE's pool (decoded once for the val and test queries) reranked by zero-shot
    MiniLM and by every fit, pure and fused (the weight picked per fit on the validation queries)."""
    import torch

    from grcm.retriever.module import GenerativeRetriever

    work, corpus_dir = Path(args.work), Path(args.corpus_dir)
    model_args = [f"--model.init_args.{item}" for item in args.model_arg]
    report: dict = {"corpus_dir": str(corpus_dir), "ace_checkpoint": args.ace_checkpoint, "seeds": args.seeds,
                    "threads": torch.get_num_threads(), "load_before": _load(), "model_args": model_args,
                    "fits": {}, "rerank": {}}
    if Path(args.out).is_file():  # a resumed run keeps what the earlier one measured
        report = {**json.loads(Path(args.out).read_text()), "seeds": args.seeds}
        if report.get("model_args", []) != model_args:
            raise SystemExit(f"{args.out} was measured with model args {report.get('model_args', [])}, not "
                             f"{model_args}: pass the same --model-arg values or a new --work / --out")

    def overrides(stage: str, run: str) -> list[str]:
        quick = QUICK_TOKENS.get(stage, QUICK.get(stage, [])) if args.quick else []
        return [f"--data.init_args.corpus_dir={corpus_dir}", f"--trainer.default_root_dir={work / run}",
                "--trainer.enable_progress_bar=false", *DATASET_OVERRIDES.get("msvd", {}).get(stage, []), *quick]

    checkpoints = {"zero_shot": str(work / "zero_shot_minilm" / "zero_shot.ckpt")}
    if "zero_shot" not in report["fits"] or not Path(checkpoints["zero_shot"]).is_file():
        t0 = time.perf_counter()
        cli = _cli("zero_shot_minilm.yaml", overrides("zero_shot_minilm", "zero_shot_minilm"))
        metrics = _test(cli, cli.model)
        cli.trainer.save_checkpoint(checkpoints["zero_shot"])
        report["fits"]["zero_shot"] = {"label": ZERO_SHOT, "test": metrics, "seconds": time.perf_counter() - t0,
                                       "val": _validate("zero_shot_minilm.yaml",
                                                        overrides("zero_shot_minilm", "zero_shot_minilm"), cli.model),
                                       "load_after": _load()}
        write_json_atomic(args.out, report)
    for seed in args.seeds:
        for row in args.rows:
            label, config = SEED_ROWS[row]
            key, stage = f"{row}/seed{seed}", Path(config).stem
            run = f"{row}_seed{seed}"
            best = work / run / "checkpoints" / "best.ckpt"
            if key in report["fits"] and best.is_file():
                checkpoints[key] = str(best)
                continue
            t0, load = time.perf_counter(), _load()
            cli = _cli(config, [*overrides(stage, run), f"--seed_everything={seed}", *model_args])
            checkpoints[key] = _fit(cli)
            fit_seconds = time.perf_counter() - t0
            model = type(cli.model).load_from_checkpoint(checkpoints[key], weights_only=True)
            metrics = _test(cli, model)
            report["fits"][key] = {"label": label, "seed": seed, "test": metrics, "fit_seconds": fit_seconds,
                                   "seconds": time.perf_counter() - t0, "checkpoint": checkpoints[key],
                                   "val": _validate(config, overrides(stage, run), model),
                                   "load_before": load, "load_after": _load()}
            print(f"[seeds] {key}: test R@1 {metrics['test/recall@1']:.4f}, fit {fit_seconds:.0f} s, load {_load()}",
                  flush=True)
            write_json_atomic(args.out, report)

    if args.ace_checkpoint:
        t0, load = time.perf_counter(), _load()
        ace_model = GenerativeRetriever.load_from_checkpoint(args.ace_checkpoint, weights_only=True)
        bundle = Path(args.ace_checkpoint).parents[2] / "ace_tokenizer" / "bundle"
        recorder = PoolRecorder()
        ace = [*overrides("ace_retriever", "ace_retriever"), f"--model.init_args.bundle_dir={bundle}"]
        cli = _cli("ace_retriever.yaml", [*ace, "--data.init_args.max_val_queries=null"])
        cli.trainer.callbacks.append(recorder)
        cli.trainer.validate(ace_model, datamodule=cli.datamodule, verbose=False)
        generative = _test(cli, ace_model)
        report["ace"] = {"test": {k: v for k, v in generative.items() if k.count("/") == 1},
                         "decode_seconds": time.perf_counter() - t0, "load_before": load, "load_after": _load()}
        for name, checkpoint in (item.split("=", 1) for item in args.rerank_also):
            checkpoints[f"also/{name}"] = checkpoint
        for key, checkpoint in checkpoints.items():
            t1 = time.perf_counter()
            val = rerank_pool(recorder.batches["val"], checkpoint, cli.datamodule, FUSION_WEIGHTS)
            picked, _ = pick_fusion_weight({f"val/w{i}/{name}": val[w][name] for i, w in enumerate(FUSION_WEIGHTS)
                                            for name in ("recall@1", "mrr@10")})
            test = rerank_pool(recorder.batches["test"], checkpoint, cli.datamodule, sorted({0.0, picked}))
            report["rerank"][key] = {"pure": test[0.0], "fused": test[picked], "fusion_weight": picked,
                                     "val_by_weight": {str(w): val[w] for w in FUSION_WEIGHTS},
                                     "seconds": time.perf_counter() - t1, "load_after": _load()}
            print(f"[seeds] ACE + {key}: pure R@1 {test[0.0]['recall@1']:.4f}, fused (w = {picked}) "
                  f"{test[picked]['recall@1']:.4f}", flush=True)
            write_json_atomic(args.out, report)
    report["summary"] = summarise(report)
    report["load_after"] = _load()
    write_json_atomic(args.out, report)
    return report


def summarise(report: dict) -> dict:
    """Per row over its seeds: ``spread`` of test and val metrics, and of the pure / fused rerank of ACE's pool."""
    summary: dict = {}
    for key, fit in report["fits"].items():
        row = key.split("/")[0]
        entry = summary.setdefault(row, {"label": fit["label"], "seeds": [], "test": {}, "val": {}})
        entry["seeds"].append(fit.get("seed"))
        for name in METRIC_KEYS:
            entry["test"].setdefault(name, []).append(fit["test"][f"test/{name}"])
            entry["val"].setdefault(name, []).append(fit["val"][f"val/{name}"])
        for tag in ("pure", "fused"):
            if key in report["rerank"]:
                for name in METRIC_KEYS:
                    entry.setdefault(f"rerank_{tag}", {}).setdefault(name, []).append(report["rerank"][key][tag][name])
    for entry in summary.values():
        for part in ("test", "val", "rerank_pure", "rerank_fused"):
            if part in entry:
                entry[part] = {name: spread(values) for name, values in entry[part].items()}
    return summary


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Issue 24's MiniLM token rows over seeds on an existing token "
                                     "corpus, and ACE's pool reranked by each fit (one decode).")
    parser.add_argument("--corpus-dir", required=True, help="a --protocol tokens corpus (token_features.npy)")
    parser.add_argument("--ace-checkpoint", help="an ACE retriever checkpoint of a benchmark run on the same items "
                        "(<work>/<dataset>/ace_retriever/checkpoints/best.ckpt); omitted: no rerank rows")
    parser.add_argument("--rows", nargs="+", default=list(SEED_ROWS), choices=list(SEED_ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", required=True, help="the fits' run directories")
    parser.add_argument("--out", required=True, help="JSON results (rewritten after every fit; a rerun resumes)")
    parser.add_argument("--rerank-also", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="one more dense checkpoint (trained on the same items) to rerank ACE's pool with")
    parser.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="a model init arg of every fitted row, e.g. item_lr=3e-3")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.rerank_also):
        parser.error(f"--rerank-also takes NAME=CHECKPOINT, got {args.rerank_also}")
    if any("=" not in item for item in args.model_arg):
        parser.error(f"--model-arg takes NAME=VALUE (a model init arg), got {args.model_arg}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return run_seeds(args)


if __name__ == "__main__":
    main()
