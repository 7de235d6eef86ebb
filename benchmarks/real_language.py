"""Real-language benchmark: every method on corpora built from real human captions (offline).

For each dataset (MSVD, MSR-VTT) the reader's captions are pooled per item; ``--held-out``
captions per item become the item's feature (their mean all-MiniLM-L6-v2 embedding, a
stand-in for a well-aligned video encoder) and are never queries; the remaining captions
are split per item into train / val / test queries (``grcm/data/caption_features.py``).
Every item has training queries, so this is the transductive setting of generative retrieval.

Rows (each an experiment config in ``experiments/real_language/``):

- dual tower, scratch text tower (``dual_tower_scratch.yaml``)
- dual tower, pretrained MiniLM text tower fine-tuned (``dual_tower_minilm.yaml``)
- zero-shot MiniLM similarity (``zero_shot_minilm.yaml``, no training)
- ACE generative (tokenizer + retriever, beam 25) (``ace_tokenizer.yaml``, ``ace_retriever.yaml``)
- ACE recall + rerank by a dense row (the two-stage callback): by zero-shot MiniLM, and by the dense row
  picked on validation when that is another one
- ACE recall + fused rerank: dense score + w x the beam's log-probability, w picked on all the
  validation queries among ``FUSION_WEIGHTS`` (``TwoStageEvaluation.generative_weight``)

No choice reads the test queries. The dense row that reranks in the second rerank / fused rows, and the
reference of every ratio, is picked by :func:`pick_dense_row` on all the validation queries (R@1, ties:
MRR@10, then the order of ``DENSE_ROWS``); the JSON records the pick and the validation metrics it used.

``--protocol inductive`` (MSVD's standard split, :func:`inductive_corpora`): every model trains on the train
videos' captions only and is tested on the test videos' captions in two settings, the pool = the test videos and
the pool = every video; the generative retrievers recall by SID prefix (``recall_levels``) with the pool capped at
``--pool-share`` of it, each + dense rerank and + fused rerank (``benchmarks/real_language_inductive.py``).
``--protocol tokens``: the transductive corpus with held-out caption embeddings as item tokens, for the hybrid
tower rows (``benchmarks/real_language_tokens.py``).

Writes ``--out`` (JSON) and ``--out`` with ``.md`` (the tables of docs/studies/real-language.md). MiniLM
embeddings are cached under ``<work>/cache``; ``--quick`` shrinks everything to a smoke test.

    python benchmarks/real_language.py --annotation-dir ../shared/data --out benchmarks/results/real_language.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from grcm.data.caption_features import CaptionSplitPlan, caption_feature_corpus  # noqa: E402
from grcm.data.corpus import save_corpus  # noqa: E402
from grcm.data.datasets import read_captions  # noqa: E402
from grcm.io import write_json_atomic  # noqa: E402
from grcm.rerank.fusion_weight import FUSION_WEIGHTS, fusion_weight_callbacks, pick_fusion_weight  # noqa: E402,F401

EXPERIMENTS = REPO / "experiments" / "real_language"
READER_OPTIONS = {
    "msvd": {},
    # MSRVTT_data.json (the 9k training videos' captions) is not among the public files; the 20 captions of
    # each 1k-A test video are (msrvtt_ret_train_addition.json): the corpus is those 1,000 videos.
    "msrvtt": {"transductive": True, "splits": ("train", "test")},
}
#: Per-dataset config overrides, on top of the experiment configs. ace_retriever.yaml's 2 epochs are sized for
#: MSVD's ~23.5 training captions per video (~720 steps); MSR-VTT has ~6.6 per video (20 captions, less 12
#: held out / test / val and duplicates of a test query), so 8 epochs (~420 steps).
#: Beam 20 keeps the two-stage rows within 2% of MSR-VTT's 1,000 items (one item per SID).
DATASET_OVERRIDES = {
    "msrvtt": {"ace_retriever": ["--trainer.max_epochs=8", "--trainer.check_val_every_n_epoch=8",
                                 "--model.init_args.restart_period=8", "--model.init_args.beam_size=20"]},
}
METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10")
QUICK = {
    "dual_tower_scratch": ["--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1"],
    "dual_tower_minilm": ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.init_args.batch_size=8"],
    "ace_tokenizer": ["--trainer.max_epochs=2", "--model.init_args.warmup_epochs=1",
                      "--model.init_args.coarse_codebook_size=4", "--model.init_args.codebook_size=4",
                      "--model.init_args.hidden_dims=[32]", "--model.init_args.latent_dim=8"],
    "ace_retriever": ["--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--model.init_args.d_model=32",
                      "--model.init_args.ffn_dim=64", "--model.init_args.beam_size=5"],
}


ZERO_SHOT = "zero-shot MiniLM similarity"
MINILM_TUNED = "dual tower, MiniLM text tower fine-tuned"
SCRATCH = "dual tower, scratch text tower"
#: The dense rows, in the order that breaks a tie of validation R@1 and MRR@10 (the simplest model first).
DENSE_ROWS = (ZERO_SHOT, MINILM_TUNED, SCRATCH)
#: The validation metrics of the dense-row pick, most important first.
PICK_METRICS = ("val/recall@1", "val/mrr@10")


@dataclass
class Row:
    """One table row: test ``metrics``, wall ``seconds`` (train + test, and a fused row's pick of its weight), and
    (dense rows) ``validation`` metrics on every val query, measured outside ``seconds``."""

    name: str
    metrics: dict[str, float]
    seconds: float
    validation: dict[str, float] | None = None


def pick_dense_row(rows: list[Row]) -> Row:
    """The dense row (one of ``DENSE_ROWS`` in ``rows``) with the best validation R@1.

    Ties go to the better validation MRR@10, then to the earlier row of ``DENSE_ROWS``. Test metrics are never read.
    """
    dense = [row for row in rows if row.name in DENSE_ROWS]
    if not dense:
        raise ValueError(f"no dense row among {[row.name for row in rows]}; expected one of {DENSE_ROWS}")
    for row in dense:
        missing = [key for key in PICK_METRICS if key not in (row.validation or {})]
        if missing:
            raise ValueError(f"dense row {row.name!r} has no validation {missing}: run _validate on its model")
    return max(dense, key=lambda row: (*(row.validation[key] for key in PICK_METRICS), -DENSE_ROWS.index(row.name)))


def _cli(config: str, overrides: list[str]):
    from grcm.cli import GrcmCLI

    return GrcmCLI(args=["-c", str(EXPERIMENTS / config), *overrides], run=False)


def _test(cli, model, callbacks=()) -> dict[str, float]:
    cli.trainer.callbacks.extend(callbacks)
    results = cli.trainer.test(model, datamodule=cli.datamodule, verbose=False)[0]
    return {key: float(value) for key, value in results.items()}


def _validate(config: str, overrides: list[str], model) -> dict[str, float]:
    """``model``'s validation metrics on every validation query (the configs validate on a subset while training)."""
    cli = _cli(config, [*overrides, "--data.init_args.max_val_queries=null"])
    results = cli.trainer.validate(model, datamodule=cli.datamodule, verbose=False)[0]
    return {key: float(value) for key, value in results.items()}


def _fit(cli) -> str:
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    callback = cli.trainer.checkpoint_callback
    return callback.best_model_path or callback.last_model_path


def _embedder(args: argparse.Namespace):
    """texts -> (T, 384) MiniLM embeddings, cached under ``<work>/cache`` unless ``--no-cache``."""
    from grcm.rerank.sentence_embedding import MiniLMSentenceEncoder, embed_sentences

    encoder: list[MiniLMSentenceEncoder] = []

    def embed(texts):
        if not encoder and not args.no_cache:
            encoder.append(MiniLMSentenceEncoder(batch_size=128))
        return embed_sentences(texts, None if args.no_cache else Path(args.work) / "cache", encoder[0] if encoder else None)

    return embed


def run_dataset(name: str, args: argparse.Namespace) -> dict:
    """Build the caption-derived corpus of ``name``, run every row, return its results."""
    from grcm.rerank.two_stage import TwoStageEvaluation

    work = Path(args.work) / name
    captions = read_captions(name, Path(args.annotation_dir) / name, **READER_OPTIONS[name])
    plan = CaptionSplitPlan(held_out=args.held_out, test=args.test_per_item, val=1, max_train=args.max_train_per_item)
    started = time.perf_counter()
    corpus = caption_feature_corpus(captions, _embedder(args), plan, seed=args.seed, max_items=args.max_items)
    corpus_dir = save_corpus(corpus, work / "corpus")
    counts = {split: int((corpus.caption_split == split).sum()) for split in ("train", "val", "test")}
    print(f"[{name}] corpus {corpus_dir}: {corpus.num_items} items, queries {counts} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    def overrides(stage: str) -> list[str]:
        extra = [*DATASET_OVERRIDES.get(name, {}).get(stage, []), *(QUICK.get(stage, []) if args.quick else [])]
        return [f"--data.init_args.corpus_dir={corpus_dir}", f"--trainer.default_root_dir={work / stage}", *extra]

    rows: list[Row] = []
    checkpoints: dict[str, str] = {}

    def save_partial() -> None:  # every finished row is on disk even if a later one fails or is stopped
        partial = args.partial_results.setdefault("datasets", {})
        partial[name] = _summary(corpus, counts, plan, args, rows, captions)
        write_json_atomic(args.out, args.partial_results)

    # zero-shot MiniLM: the identity-initialised MiniLM dual tower, tested untrained (saved for reranking)
    t0 = time.perf_counter()
    cli = _cli("zero_shot_minilm.yaml", overrides("zero_shot_minilm"))
    metrics, seconds = _test(cli, cli.model), time.perf_counter() - t0
    validation = _validate("zero_shot_minilm.yaml", overrides("zero_shot_minilm"), cli.model)
    rows.append(Row(ZERO_SHOT, metrics, seconds, validation))
    checkpoints[ZERO_SHOT] = str(work / "zero_shot_minilm" / "zero_shot.ckpt")
    cli.trainer.save_checkpoint(checkpoints[ZERO_SHOT])
    save_partial()

    # ACE: tokenizer, then the generative retriever; recall reranked by zero-shot MiniLM right away
    t0 = time.perf_counter()
    _fit(_cli("ace_tokenizer.yaml", overrides("ace_tokenizer")))
    bundle = work / "ace_tokenizer" / "bundle"
    retriever_overrides = [*overrides("ace_retriever"), f"--model.init_args.bundle_dir={bundle}"]
    cli = _cli("ace_retriever.yaml", retriever_overrides)
    best = _fit(cli)
    ace_model = type(cli.model).load_from_checkpoint(best, weights_only=True)
    beam = ace_model.hparams.beam_size
    rows.append(Row(f"ACE generative (beam {beam})", _test(cli, ace_model), time.perf_counter() - t0))
    save_partial()

    def two_stage_row(dense_name: str, weight: float = 0.0, label: str = "", extra: dict | None = None,
                      started: float | None = None) -> None:
        """Test ACE recall reranked by ``dense_name`` (fused with the beam scores at ``weight``) as one row."""
        t0 = time.perf_counter() if started is None else started
        cli = _cli("ace_retriever.yaml", retriever_overrides)
        callback = TwoStageEvaluation(dense_checkpoint=checkpoints[dense_name], beam_size=beam,
                                      generative_weight=weight)
        metrics = _test(cli, ace_model, [callback])
        reranked = {k.replace("test/two_stage/", "test/"): v for k, v in metrics.items()
                    if k.startswith("test/two_stage/")}
        rows.append(Row(label or f"ACE recall + rerank by {dense_name}", {**metrics, **reranked, **(extra or {})},
                        time.perf_counter() - t0))
        save_partial()

    def fused_row(dense_name: str) -> None:
        """Pick the fusion weight on the validation queries (one decode, a callback per weight), then test it."""
        t0 = time.perf_counter()
        # every validation query (the config validates on a 300-query subset during training)
        cli = _cli("ace_retriever.yaml", [*retriever_overrides, "--data.init_args.max_val_queries=null"])
        cli.trainer.callbacks.extend(fusion_weight_callbacks(checkpoints[dense_name], beam_size=beam))
        validation = cli.trainer.validate(ace_model, datamodule=cli.datamodule, verbose=False)[0]
        weight, scores = pick_fusion_weight(validation)
        print(f"[{name}] fusion weight {weight} picked on val: "
              + ", ".join(f"w={w}: R@1 {r1:.4f}" for w, (r1, _) in scores.items()), flush=True)
        extra = {"fusion_weight": weight,
                 "val_recall@1_by_weight": {str(w): r1 for w, (r1, _) in scores.items()},
                 "val_mrr@10_by_weight": {str(w): mrr for w, (_, mrr) in scores.items()}}
        two_stage_row(dense_name, weight, f"ACE recall + fused rerank by {dense_name} (w = {weight}, picked on val)",
                      extra, started=t0)

    two_stage_row(ZERO_SHOT)
    fused_row(ZERO_SHOT)

    for label, config in ((MINILM_TUNED, "dual_tower_minilm.yaml"), (SCRATCH, "dual_tower_scratch.yaml")):
        t0 = time.perf_counter()
        stage = config.removesuffix(".yaml")
        cli = _cli(config, overrides(stage))
        best = checkpoints[label] = _fit(cli)
        model = type(cli.model).load_from_checkpoint(best, weights_only=True)
        metrics, seconds = _test(cli, model), time.perf_counter() - t0
        rows.append(Row(label, metrics, seconds, _validate(config, overrides(stage), model)))
        save_partial()

    picked = pick_dense_row(rows)
    print(f"[{name}] dense row picked on val: {picked.name} ("
          + "; ".join(f"{r.name}: R@1 {r.validation['val/recall@1']:.4f}, MRR@10 {r.validation['val/mrr@10']:.4f}"
                      for r in rows if r.name in DENSE_ROWS) + ")", flush=True)
    if picked.name != ZERO_SHOT:
        two_stage_row(picked.name)
        fused_row(picked.name)
    return _summary(corpus, counts, plan, args, rows, captions)



def _summary(corpus, counts, plan, args, rows: list[Row], captions) -> dict:
    """The JSON of one dataset: rows, the dense row picked on validation (among those run so far), ratios of test
    R@1 against it, corpus sizes, notes."""
    picked = pick_dense_row(rows)
    reference = picked.metrics["test/recall@1"]
    rows_json = {}
    for r in rows:
        rows_json[r.name] = {"metrics": r.metrics, "seconds": r.seconds}
        if r.validation is not None:
            rows_json[r.name]["validation"] = r.validation
    return {
        "corpus": {"items": corpus.num_items, "queries": counts, "plan": vars(plan) | {"max_items": args.max_items}},
        "picked_dense": picked.name,
        "dense_pick": {
            "rule": "max validation recall@1 over every validation query; ties: mrr@10, then the order below",
            "order": list(DENSE_ROWS),
            "validation": {r.name: {key: r.validation[key] for key in PICK_METRICS}
                           for r in rows if r.name in DENSE_ROWS},
        },
        "rows": rows_json,
        "ratios_vs_picked_dense_r1": {r.name: r.metrics["test/recall@1"] / max(reference, 1e-12) for r in rows},
        "notes": captions.notes,
    }


def markdown_table(results: dict) -> str:
    lines = []
    for name, result in results["datasets"].items():
        corpus = result["corpus"]
        pick = result["dense_pick"]["validation"]
        lines.append(f"**{name}** ({corpus['items']:,} items, {corpus['queries']['train']:,} train / "
                     f"{corpus['queries']['test']:,} test queries; dense row picked on validation: "
                     f"{result['picked_dense']})\n")
        lines.append("Validation (every val query) of the dense rows: " + "; ".join(
            f"{row} R@1 {m['val/recall@1']:.2%}, MRR@10 {m['val/mrr@10']:.4f}" for row, m in pick.items()) + "\n")
        lines.append("| method | R@1 | R@5 | R@10 | MRR@10 | R@1 / picked dense | corpus scored | train+test s |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row_name, row in result["rows"].items():
            m = row["metrics"]
            scored = m.get("test/corpus_fraction_scored")
            lines.append(
                f"| {row_name} | {m['test/recall@1']:.2%} | {m['test/recall@5']:.2%} | {m['test/recall@10']:.2%} | "
                f"{m['test/mrr@10']:.4f} | {result['ratios_vs_picked_dense_r1'][row_name]:.2f}x | "
                f"{'-' if scored is None else f'{scored:.2%}'} | {row['seconds']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _protocol_runner(protocol: str):
    """``run(name, args) -> dict`` of ``protocol``; the inductive and tokens protocols live in their own scripts."""
    if protocol == "inductive":
        from real_language_inductive import run_inductive

        return run_inductive
    if protocol == "tokens":
        from real_language_tokens import run_tokens

        return run_tokens
    return run_dataset


def main(argv: list[str] | None = None) -> dict:
    from real_language_inductive import add_arguments as add_inductive_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotation-dir", required=True,
                        help="folder holding msvd/ and msrvtt/ annotation folders "
                        "(downloads: docs/studies/real-language.md)")
    parser.add_argument("--datasets", nargs="+", default=["msvd", "msrvtt"], choices=sorted(READER_OPTIONS))
    parser.add_argument("--work", default="runs/real_language", help="corpora, runs and the embedding cache")
    parser.add_argument("--out", default="benchmarks/results/real_language.json")
    parser.add_argument("--held-out", type=int, default=10, help="captions per item averaged into its feature")
    parser.add_argument("--test-per-item", type=int, default=1)
    parser.add_argument("--max-train-per-item", type=int, default=None)
    parser.add_argument("--max-items", type=int, default=None, help="seeded item subsample per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-cache", action="store_true", help="do not cache MiniLM embeddings on disk")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (a minute on a CPU)")
    inductive = parser.add_argument_group("inductive protocol (--protocol inductive, MSVD's standard split)")
    parser.add_argument("--protocol", choices=("transductive", "inductive", "tokens"), default="transductive",
                        help="transductive: every item has training queries; inductive: train on the train videos "
                        "only, test on the test videos with the pool = test videos and = all videos; tokens: the "
                        "transductive corpus with held-out caption embeddings as item tokens (hybrid tower rows)")
    parser.add_argument("--ace-checkpoint", help="--protocol tokens: an ACE retriever checkpoint trained on the same "
                        "corpus items (e.g. a transductive run's) instead of training one")
    add_inductive_arguments(inductive)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {
        "command": " ".join(["python benchmarks/real_language.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "loadavg_at_start": os.getloadavg()},
        "datasets": {},
    }
    args.partial_results = results
    results["protocol"] = args.protocol
    for name in args.datasets:
        run = _protocol_runner(args.protocol)
        results["datasets"][name] = run(name, args)
        results["seconds"] = time.perf_counter() - started
        write_json_atomic(args.out, results)  # partial results survive a later failure
    if args.protocol == "inductive":
        from real_language_inductive import inductive_markdown

        table = "\n".join(inductive_markdown(name, result) for name, result in results["datasets"].items())
    else:
        table = markdown_table(results)
    Path(args.out).with_suffix(".md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
