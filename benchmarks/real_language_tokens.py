"""Real-language benchmark, ``--protocol tokens``: the transductive corpus with each item's held-out caption
embeddings as its token features (the hybrid tower and attention-pooling rows, issue 24).

Run through ``benchmarks/real_language.py --protocol tokens`` (its shared rows and options live there).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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
from grcm.rerank.fusion_weight import fusion_weight_callbacks, pick_fusion_weight

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
