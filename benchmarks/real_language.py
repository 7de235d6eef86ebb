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
``--pool-share`` of it, each + dense rerank and + fused rerank (:func:`run_inductive`).

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


# --------------------------------------------------------------------------------------------- inductive protocol
#: The inductive protocol's settings: name -> (validation corpus, test corpus) among :func:`inductive_corpora`'s.
#: "test videos": each split's own videos are the pool; "all videos": every video of the corpus is.
SETTINGS = {"test videos": ("pool_val", "pool_test"), "all videos": ("all", "all")}
#: The generative retrievers of the inductive protocol: key -> (row label, config, run directory).
GENERATIVE = {"ace": ("ACE", "ace_retriever.yaml", "ace_retriever"), "grdr": ("GRDR", "grdr.yaml", "grdr")}
QUICK_INDUCTIVE = {
    "grdr": ["--trainer.max_epochs=3", "--model.init_args.num_levels=2", "--model.init_args.pretrain_epochs=[1,0]",
             "--model.init_args.main_epochs=[1,1]", "--model.init_args.fit_epochs=[0,0]",
             "--model.init_args.codebook_size=8", "--model.init_args.d_model=32", "--model.init_args.ffn_dim=64"],
}
#: Fits of generative retrievers validate nothing: the val videos have no training captions, so no val SID
#: accuracy can be monitored (grcm refuses to fit them on such a split); the last checkpoint is evaluated.
NO_VALIDATION = ["--trainer.limit_val_batches=0"]


def standard_item_splits(captions) -> dict[str, str]:
    """Item id -> the split of the reader's standard split (``captions.caption_split``) its captions are in."""
    splits: dict[str, str] = {}
    for item, split in zip(captions.caption_item.tolist(), captions.caption_split.tolist()):
        item_id = captions.item_ids[item]
        if splits.setdefault(item_id, split) != split:
            raise ValueError(f"{captions.name}: item {item_id!r} has captions in both {splits[item_id]!r} and "
                             f"{split!r}; the inductive protocol needs a reader whose splits are sets of items")
    return splits


def inductive_corpora(corpus, item_split: dict[str, str], test: int | None, val: int | None,
                      max_train: int | None) -> dict:
    """The inductive protocol's corpora, re-split from a :func:`caption_feature_corpus` by the standard item split.

    Every caption of ``corpus`` is a query of its item (its held-out captions are in its feature, as in the
    transductive corpus, so features and the embedding cache are the same). Per item, its queries in the
    corpus's per-item order (its test, val, then train captions) go to the item's standard split: a train item
    keeps up to ``max_train`` as training captions, a val item ``val`` as validation queries and a test item
    ``test`` as test queries (None: all); the rest are dropped. No val or test item keeps a training caption.

    Args:
        corpus: a caption-feature corpus (N items, (N, D) features).
        item_split: item id -> "train" / "val" / "test" (:func:`standard_item_splits`).
        test, val, max_train: queries kept per test / val / train item.

    Returns:
        ``{"all": every item (the pool "all videos"), "pool_test": the test items and their test queries,
        "pool_val": the val items and their val queries}``; an item's feature row is the same in each.
    """
    import dataclasses

    import numpy as np

    missing = [item for item in corpus.item_ids if item not in item_split]
    if missing:
        raise ValueError(f"{len(missing)} items of corpus {corpus.name!r} (e.g. {missing[0]!r}) are in no standard "
                         "split; pass the split of every item")
    quota = {"train": max_train, "val": val, "test": test}
    by_item: list[list[int]] = [[] for _ in range(corpus.num_items)]
    for split in ("test", "val", "train"):  # each item's queries in the order split_item_captions drew them
        for row in corpus.captions_of_split(split).tolist():
            by_item[int(corpus.caption_item[row])].append(row)
    split_of_item = [item_split[item] for item in corpus.item_ids]
    kept: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for item, rows in enumerate(by_item):
        split = split_of_item[item]
        kept[split] += rows[: quota[split]]
    order = [row for split in ("train", "val", "test") for row in sorted(kept[split])]
    new_split = {row: split for split, rows in kept.items() for row in rows}

    def build(items: list[int], splits: tuple[str, ...], name: str):
        position = {item: i for i, item in enumerate(items)}
        rows = [row for row in order if new_split[row] in splits and int(corpus.caption_item[row]) in position]
        return dataclasses.replace(
            corpus, name=f"{corpus.name}-{name}", item_ids=[corpus.item_ids[i] for i in items],
            features=np.ascontiguousarray(corpus.features[items]),
            caption_item=np.asarray([position[int(corpus.caption_item[r])] for r in rows], dtype=np.int64),
            caption_text=[corpus.caption_text[r] for r in rows],
            caption_split=np.asarray([new_split[r] for r in rows], dtype="<U5"),
        ).validate(source=f"{corpus.name} ({name})")

    items_of = {split: [i for i, s in enumerate(split_of_item) if s == split] for split in ("train", "val", "test")}
    return {
        "all": build(list(range(corpus.num_items)), ("train", "val", "test"), "inductive"),
        "pool_test": build(items_of["test"], ("test",), "test-pool"),
        "pool_val": build(items_of["val"], ("val",), "val-pool"),
    }


def restrict_sid_table(checkpoint_path: str | Path, item_ids: list[str], out: str | Path) -> Path:
    """Write a copy of a generative retriever checkpoint whose SID table holds only ``item_ids``, in that order.

    The pool of an evaluation corpus that holds a subset of the trained items (e.g. only the test videos): the rows
    of the ACE table ``sid_codes`` (N, L) or of GRDR's ``sids.sid_codes`` / ``sids.anchor_codes`` (N, V, L) are
    kept for those items, unchanged; the trie is rebuilt from the table when the checkpoint is loaded.
    """
    import torch

    from grcm.checkpoint import read_checkpoint
    from grcm.index_items import ACE_KEY, GRDR_KEY

    checkpoint = read_checkpoint(checkpoint_path)
    state = checkpoint["state_dict"]
    if ACE_KEY in checkpoint and "sid_codes" in state:
        key, names = ACE_KEY, ["sid_codes"]
    elif GRDR_KEY in checkpoint and "sids.sid_codes" in state:
        key, names = GRDR_KEY, ["sids.sid_codes", "sids.anchor_codes"]
    else:
        raise ValueError(f"{checkpoint_path}: not a GenerativeRetriever or GRDRRetriever checkpoint (no SID table)")
    row_of = {item: row for row, item in enumerate(checkpoint[key]["item_ids"])}
    missing = [item for item in item_ids if item not in row_of]
    if missing:
        raise ValueError(f"{checkpoint_path}: {len(missing)} pool items (e.g. {missing[0]!r}) have no SID in the "
                         "checkpoint; the pool must be a subset of the indexed items")
    rows = torch.tensor([row_of[item] for item in item_ids], dtype=torch.long)
    for name in names:
        state[name] = state[name][rows].clone()
    checkpoint[key]["item_ids"] = list(item_ids)
    if key == ACE_KEY:
        checkpoint[key]["feature_checksum"] = ""  # the table is a subset of the tokenizer run's corpus
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    return out


def pool_cap(share: float, pool_items: int, smallest: int = 10) -> int:
    """Most items a prefix-recall pool may hold: ``share`` of the pool, at least ``smallest`` (the largest
    reported cut-off, R@10 / MRR@10)."""
    return max(smallest, int(share * pool_items))


def _pool_model(model_class, checkpoint: str, pool, out: Path, args: argparse.Namespace):
    """The trained retriever restricted to ``pool``'s items (:func:`restrict_sid_table`), decoding by prefix."""
    path = restrict_sid_table(checkpoint, list(pool.item_ids), out)
    return model_class.load_from_checkpoint(path, weights_only=True, recall_levels=args.recall_levels,
                                            beam_size=args.recall_beam,
                                            max_pool_items=pool_cap(args.pool_share, pool.num_items))


def run_inductive(name: str, args: argparse.Namespace) -> dict:
    """MSVD's standard split, inductive: train on the train videos' captions, test on the test videos' in both
    :data:`SETTINGS`; dense rows, then each generative retriever's prefix recall, + dense and + fused rerank."""
    from grcm.rerank.two_stage import TwoStageEvaluation

    if name != "msvd":
        raise SystemExit(f"--protocol inductive needs a standard split of train/val/test videos; {name} at hand "
                         "has only its test videos (run --datasets msvd)")
    work = Path(args.work) / name
    captions = read_captions(name, Path(args.annotation_dir) / name, **READER_OPTIONS[name])
    plan = CaptionSplitPlan(held_out=args.held_out, test=1, val=1, max_train=None)  # = the transductive features
    started = time.perf_counter()
    corpus = caption_feature_corpus(captions, _embedder(args), plan, seed=args.seed, max_items=args.max_items)
    corpora = inductive_corpora(corpus, standard_item_splits(captions), test=args.test_per_item,
                                val=args.val_per_item, max_train=args.max_train_per_item)
    dirs = {key: save_corpus(c, work / f"corpus_{key}") for key, c in corpora.items()}
    sizes = {key: {"items": c.num_items, **{s: int((c.caption_split == s).sum()) for s in ("train", "val", "test")}}
             for key, c in corpora.items()}
    print(f"[{name}] inductive corpora {sizes} ({time.perf_counter() - started:.0f} s)", flush=True)

    def overrides(stage: str, key: str = "all", extra: tuple | list = ()) -> list[str]:
        quick = [*QUICK.get(stage, []), *QUICK_INDUCTIVE.get(stage, [])] if args.quick else []
        return [f"--data.init_args.corpus_dir={dirs[key]}", f"--trainer.default_root_dir={work / stage}",
                "--data.init_args.uncovered_items=ignore", *quick, *extra]

    test_only = NO_VALIDATION  # a test pool has no val captions: nothing to validate or hold out
    rows: dict[str, list[Row]] = {setting: [] for setting in SETTINGS}
    result: dict = {"protocol": "inductive", "corpora": sizes, "plan": vars(plan) | {
        "test_per_item": args.test_per_item, "val_per_item": args.val_per_item,
        "max_train_per_item": args.max_train_per_item, "max_items": args.max_items},
        "prefix_recall": {"recall_levels": args.recall_levels, "beam_size": args.recall_beam,
                          "pool_share": args.pool_share}, "train_seconds": {}, "settings": {}}

    def save_partial() -> None:
        result["settings"] = {s: _setting_summary(r) for s, r in rows.items() if any(x.name in DENSE_ROWS for x in r)}
        args.partial_results.setdefault("datasets", {})[name] = result
        write_json_atomic(args.out, args.partial_results)

    def dense_rows(label: str, config: str, stage: str, model, seconds: float) -> None:
        for setting, (val_key, test_key) in SETTINGS.items():
            t0 = time.perf_counter()
            metrics = _test(_cli(config, overrides(stage, test_key, test_only)), model)
            validation = _validate(config, overrides(stage, val_key), model)
            rows[setting].append(Row(label, metrics, seconds + time.perf_counter() - t0, validation))
        save_partial()

    checkpoints: dict[str, str] = {}
    t0 = time.perf_counter()
    cli = _cli("zero_shot_minilm.yaml", overrides("zero_shot_minilm", "all", test_only))
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)  # attaches the trainer for the save
    checkpoints[ZERO_SHOT] = str(work / "zero_shot_minilm" / "zero_shot.ckpt")
    cli.trainer.save_checkpoint(checkpoints[ZERO_SHOT])
    dense_rows(ZERO_SHOT, "zero_shot_minilm.yaml", "zero_shot_minilm", cli.model, 0.0)

    t0 = time.perf_counter()
    cli = _cli("dual_tower_minilm.yaml", overrides("dual_tower_minilm"))
    checkpoints[MINILM_TUNED] = _fit(cli)
    model = type(cli.model).load_from_checkpoint(checkpoints[MINILM_TUNED], weights_only=True)
    result["train_seconds"][MINILM_TUNED] = time.perf_counter() - t0
    dense_rows(MINILM_TUNED, "dual_tower_minilm.yaml", "dual_tower_minilm", model, time.perf_counter() - t0)

    for kind in args.generative:
        label, config, stage = GENERATIVE[kind]
        t0 = time.perf_counter()
        extra: list[str] = []
        if kind == "ace":
            _fit(_cli("ace_tokenizer.yaml", overrides("ace_tokenizer")))
            extra = [f"--model.init_args.bundle_dir={work / 'ace_tokenizer' / 'bundle'}"]
        cli = _cli(config, overrides(stage, "all", [*extra, *NO_VALIDATION]))
        trained = _fit(cli)
        model_class = type(cli.model)
        result["train_seconds"][label] = time.perf_counter() - t0
        print(f"[{name}] {label} trained in {result['train_seconds'][label]:.0f} s: {trained}", flush=True)
        for setting, (val_key, test_key) in SETTINGS.items():
            dense = pick_dense_row(rows[setting]).name

            t1 = time.perf_counter()  # the fusion weight, on every validation query of the setting's val pool
            cli = _cli(config, overrides(stage, val_key, [*extra, "--data.init_args.max_val_queries=null"]))
            cli.trainer.callbacks.extend(fusion_weight_callbacks(checkpoints[dense]))
            validation = {k: float(v) for k, v in
                          cli.trainer.validate(_pool_model(model_class, trained, corpora[val_key], work / stage / f"pool_{val_key}.ckpt", args), datamodule=cli.datamodule, verbose=False)[0].items()}
            weight, scores = pick_fusion_weight(validation)
            pick_seconds = time.perf_counter() - t1
            t1 = time.perf_counter()
            cli = _cli(config, overrides(stage, test_key, [*extra, *test_only]))
            pool_model = _pool_model(model_class, trained, corpora[test_key], work / stage / f"pool_{test_key}.ckpt", args)
            metrics = _test(cli, pool_model, [
                TwoStageEvaluation(dense_checkpoint=checkpoints[dense], name="two_stage", full_dense_reference=False),
                TwoStageEvaluation(dense_checkpoint=checkpoints[dense], name="fused", generative_weight=weight,
                                   full_dense_reference=False)])
            seconds = time.perf_counter() - t1
            beam = f"p = {args.recall_levels}, beam {args.recall_beam}"
            rows[setting].append(Row(f"{label} prefix recall ({beam})", metrics, seconds, validation))
            for prefix, row_name, extra_seconds, fused in (
                    ("two_stage", f"{label} recall + rerank by {dense}", 0.0, {}),
                    ("fused", f"{label} recall + fused rerank by {dense} (w = {weight}, picked on val)", pick_seconds,
                     {"fusion_weight": weight,
                      "val_recall@1_by_weight": {str(w): r1 for w, (r1, _) in scores.items()}})):
                stage_metrics = {k.replace(f"test/{prefix}/", "test/"): v for k, v in metrics.items()
                                 if k.startswith(f"test/{prefix}/")}
                rows[setting].append(Row(row_name, {**stage_metrics, **fused}, seconds + extra_seconds))
            print(f"[{name}] {setting}: {label} R@1 {metrics['test/recall@1']:.4f}, + rerank "
                  f"{metrics['test/two_stage/recall@1']:.4f}, + fused (w = {weight}) {metrics['test/fused/recall@1']:.4f}"
                  f", pool {metrics['test/pool_share']:.2%}", flush=True)
            save_partial()
    return result


def _pool_columns(metrics: dict[str, float]) -> tuple[float | None, float | None]:
    """(gold in the pool, share of the pool scored) of a row: a generative row's recalled pool, a reranked row's
    reranked pool, (None, 1.0) for a dense row (it scores every item)."""
    if "test/corpus_fraction_scored" in metrics and "test/pool_share" not in metrics:
        gold = next((v for k, v in metrics.items() if k.startswith("test/candidate_recall@")), None)
        return gold, metrics["test/corpus_fraction_scored"]
    if "test/pool_share" in metrics:
        return metrics.get("test/unseen/candidate_recall"), metrics["test/pool_share"]
    return None, 1.0


def _setting_summary(rows: list[Row]) -> dict:
    """The JSON of one inductive setting: rows, the dense row picked on validation, ratios of test R@1 against it
    and against the best dense test R@1."""
    picked = pick_dense_row(rows)
    best_dense = max(r.metrics["test/recall@1"] for r in rows if r.name in DENSE_ROWS)
    out = {"picked_dense": picked.name, "best_dense_test_recall@1": best_dense, "rows": {},
           "dense_pick": {r.name: {k: r.validation[k] for k in PICK_METRICS} for r in rows if r.name in DENSE_ROWS}}
    for r in rows:
        gold, scored = _pool_columns(r.metrics)
        out["rows"][r.name] = {"metrics": r.metrics, "seconds": r.seconds, "gold_in_pool": gold, "pool_scored": scored,
                               "r1_vs_picked_dense": r.metrics["test/recall@1"] / max(picked.metrics["test/recall@1"],
                                                                                     1e-12),
                               "r1_vs_best_dense": r.metrics["test/recall@1"] / max(best_dense, 1e-12)}
        if r.validation is not None:
            out["rows"][r.name]["validation"] = r.validation
    return out


def inductive_markdown(name: str, result: dict) -> str:
    """The tables of one inductive run (docs/studies/real-language.md)."""
    sizes = result["corpora"]
    lines = [f"**{name}, inductive** (train {sizes['all']['train']:,} captions of the train videos; "
             f"pool 'test videos': {sizes['pool_test']['items']:,} items, {sizes['pool_test']['test']:,} test queries "
             f"(val: {sizes['pool_val']['items']:,} items, {sizes['pool_val']['val']:,} queries); pool 'all videos': "
             f"{sizes['all']['items']:,} items; prefix recall p = {result['prefix_recall']['recall_levels']}, beam "
             f"{result['prefix_recall']['beam_size']}, pool capped at {result['prefix_recall']['pool_share']:.0%})\n"]
    for setting, summary in result["settings"].items():
        lines.append(f"*Pool = {setting}* (dense row picked on validation: {summary['picked_dense']}; "
                     + "; ".join(f"{row} val R@1 {m['val/recall@1']:.2%}" for row, m in summary["dense_pick"].items())
                     + ")\n")
        lines.append("| method | R@1 | R@5 | R@10 | MRR@10 | gold in pool | pool scored | R@1 / picked dense | s |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row_name, row in summary["rows"].items():
            m, gold = row["metrics"], row["gold_in_pool"]
            lines.append(f"| {row_name} | {m['test/recall@1']:.2%} | {m['test/recall@5']:.2%} | "
                         f"{m['test/recall@10']:.2%} | {m['test/mrr@10']:.4f} | "
                         f"{'-' if gold is None else f'{gold:.1%}'} | {row['pool_scored']:.1%} | "
                         f"{row['r1_vs_picked_dense']:.2f}x | {row['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ token features
ATTENTION = "dual tower, attention pooling over caption tokens (scratch text tower)"
HYBRID = "hybrid tower (PIG) over caption tokens (scratch text tower)"
#: The token-feature rows of ``--protocol tokens``: label -> (config, run directory).
TOKEN_ROWS = {ATTENTION: ("dual_tower_attention.yaml", "dual_tower_attention"),
              HYBRID: ("hybrid_tower_pig.yaml", "hybrid_tower_pig")}
QUICK_TOKENS = {stage: ["--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1"]
                for stage in ("dual_tower_attention", "hybrid_tower_pig")}


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
    its token features; the dense rows, the attention-pooling dual tower and the hybrid tower, then ACE recall
    reranked by the dense row picked on validation and by the hybrid tower (pure and fused)."""
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
        quick = [*QUICK.get(stage, []), *QUICK_TOKENS.get(stage, [])] if args.quick else []
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
    rerankers = [picked, HYBRID]
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


def main(argv: list[str] | None = None) -> dict:
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
    inductive.add_argument("--val-per-item", type=int, default=5, help="validation queries per val video")
    inductive.add_argument("--pool-share", type=float, default=0.10,
                           help="prefix recall keeps at most this share of the pool (model.max_pool_items)")
    inductive.add_argument("--recall-levels", type=int, default=1, help="SID levels decoded (model.recall_levels)")
    inductive.add_argument("--recall-beam", type=int, default=25, help="beam over SID prefixes")
    inductive.add_argument("--generative", nargs="*", default=list(GENERATIVE), choices=list(GENERATIVE),
                           help="generative retrievers to run")
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
        run = {"inductive": run_inductive, "tokens": run_tokens}.get(args.protocol, run_dataset)
        results["datasets"][name] = run(name, args)
        results["seconds"] = time.perf_counter() - started
        write_json_atomic(args.out, results)  # partial results survive a later failure
    if args.protocol == "inductive":
        table = "\n".join(inductive_markdown(name, result) for name, result in results["datasets"].items())
    else:
        table = markdown_table(results)
    Path(args.out).with_suffix(".md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
