"""Real-language benchmark, ``--protocol inductive`` (MSVD's standard split): every model trains on the train
videos' captions only and is tested on the test videos' captions in two settings, the pool = the test videos and
the pool = every video; the generative retrievers recall by SID prefix (``recall_levels``) with the pool capped at
``--pool-share`` of it, each + dense rerank and + fused rerank (:func:`run_inductive`).

Run through ``benchmarks/real_language.py --protocol inductive`` (its shared rows and options live there).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from real_language import (
    DENSE_ROWS,
    MINILM_TUNED,
    PICK_METRICS,
    QUICK,
    READER_OPTIONS,
    ZERO_SHOT,
    Row,
    _cli,
    _embedder,
    _fit,
    _test,
    _validate,
    pick_dense_row,
)

from grcm.data.caption_features import CaptionSplitPlan, caption_feature_corpus
from grcm.data.corpus import save_corpus
from grcm.data.datasets import read_captions
from grcm.index_items import restrict_sid_table
from grcm.io import write_json_atomic
from grcm.rerank.fusion_weight import fusion_weight_callbacks, pick_fusion_weight

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


def pool_cap(share: float, pool_items: int, smallest: int = 10) -> int:
    """Most items a prefix-recall pool may hold: ``share`` of the pool, at least ``smallest`` (the largest
    reported cut-off, R@10 / MRR@10)."""
    return max(smallest, int(share * pool_items))


#: Pool checkpoints written by :func:`_pool_model` in this process: path -> the checkpoint it was cut from.
_RESTRICTED: dict[Path, str] = {}


def _pool_model(model_class, checkpoint: str, pool, out: Path, args: argparse.Namespace, beam: int | None = None,
                **hparams):
    """The trained retriever restricted to ``pool``'s items (:func:`restrict_sid_table`), decoding by prefix
    (beam ``beam``, default ``--recall-beam``; ``hparams``: more of the retriever's, e.g. its prefix scorer)."""
    if _RESTRICTED.get(out) != checkpoint:  # the same pool of the same checkpoint: written once per process
        restrict_sid_table(checkpoint, list(pool.item_ids), out)
        _RESTRICTED[out] = checkpoint
    return model_class.load_from_checkpoint(out, weights_only=True, recall_levels=args.recall_levels,
                                            beam_size=args.recall_beam if beam is None else beam,
                                            max_pool_items=pool_cap(args.pool_share, pool.num_items), **hparams)


def add_arguments(group) -> None:
    """The inductive protocol's options, added to ``group`` of benchmarks/real_language.py's parser."""
    group.add_argument("--val-per-item", type=int, default=5, help="validation queries per val video")
    group.add_argument("--pool-share", type=float, default=0.10,
                       help="prefix recall keeps at most this share of the pool (model.max_pool_items)")
    group.add_argument("--recall-levels", type=int, default=1, help="SID levels decoded (model.recall_levels)")
    group.add_argument("--recall-beam", type=int, default=25, help="beam over SID prefixes")
    group.add_argument("--generative", nargs="*", default=list(GENERATIVE), choices=list(GENERATIVE),
                       help="generative retrievers to run")
    group.add_argument("--reuse", action="store_true",
                       help="skip a fit whose checkpoint is already under --work (same recipe, e.g. a rerun that "
                       "adds rows): the dual tower, the ACE tokenizer and retriever, GRDR, the prefix scorer")
    group.add_argument("--prefix-scorer", action="store_true",
                       help="ACE: also the rows of a prefix scorer (grcm.retriever.prefix_scorer) fitted on the train "
                       "videos' captions, its beam, weight and untrained bonus picked on the val videos")
    group.add_argument("--scorer-rows-only", action="store_true",
                       help="with --prefix-scorer: skip ACE's rows without the scorer (e.g. measured by a former run)")
    group.add_argument("--scorer-epochs", type=int, default=30, help="epochs of the prefix scorer's fit")
    group.add_argument("--scorer-beams", type=int, nargs="+", default=[25, 40],
                       help="beams over SID prefixes tried on validation for the prefix scorer")
    group.add_argument("--scorer-weights", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0],
                       help="prefix_scorer_weight values tried on validation")
    group.add_argument("--scorer-bonuses", type=float, nargs="+", default=[0.0, 1.0, 2.0],
                       help="prefix_scorer_untrained_bonus values tried on validation (pool = all videos only: in "
                       "the test-videos pool no item has training captions, so a bonus changes nothing)")


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

    def fit(cli, stage: str) -> str:
        """_fit, or with ``--reuse`` the checkpoint a former fit of ``stage`` left under ``--work``."""
        found = [work / stage / "checkpoints" / f for f in ("best.ckpt", "last.ckpt")]
        found = [path for path in found if path.is_file()]
        if args.reuse and found:
            print(f"[{name}] {stage}: reusing {found[0]}", flush=True)
            return str(found[0])
        return _fit(cli)

    checkpoints: dict[str, str] = {}
    t0 = time.perf_counter()
    cli = _cli("zero_shot_minilm.yaml", overrides("zero_shot_minilm", "all", test_only))
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)  # attaches the trainer for the save
    checkpoints[ZERO_SHOT] = str(work / "zero_shot_minilm" / "zero_shot.ckpt")
    cli.trainer.save_checkpoint(checkpoints[ZERO_SHOT])
    dense_rows(ZERO_SHOT, "zero_shot_minilm.yaml", "zero_shot_minilm", cli.model, 0.0)

    t0 = time.perf_counter()
    cli = _cli("dual_tower_minilm.yaml", overrides("dual_tower_minilm"))
    checkpoints[MINILM_TUNED] = fit(cli, "dual_tower_minilm")
    model = type(cli.model).load_from_checkpoint(checkpoints[MINILM_TUNED], weights_only=True)
    result["train_seconds"][MINILM_TUNED] = time.perf_counter() - t0
    dense_rows(MINILM_TUNED, "dual_tower_minilm.yaml", "dual_tower_minilm", model, time.perf_counter() - t0)

    def scorer_rows(label: str, config: str, stage: str, extra: list[str], trained: str, model_class) -> None:
        """ACE prefix recall with a prefix scorer: fitted on the train videos' captions (the retriever frozen),
        its beam / weight / untrained bonus and the fused rerank's weight picked on the setting's val queries."""
        import torch

        from grcm.retriever.prefix_scorer import PrefixItemScorer
        from grcm.retriever.prefix_scorer_fit import fit_from_checkpoint

        scorer_file = work / stage / "prefix_scorer.pt"
        t0 = time.perf_counter()
        if not (args.reuse and scorer_file.is_file()):
            summary = fit_from_checkpoint(trained, str(scorer_file), levels=args.recall_levels,
                                          epochs=args.scorer_epochs, corpus_dir=str(dirs["all"]))
            print(f"[{name}] prefix scorer fitted: {summary}", flush=True)
        result["train_seconds"][f"{label} prefix scorer"] = time.perf_counter() - t0
        scorer = PrefixItemScorer.load(scorer_file)
        row_of = {item: row for row, item in enumerate(corpora["all"].item_ids)}  # = the checkpoint's table
        picks = result.setdefault("prefix_scorer", {"epochs": args.scorer_epochs})
        for setting, (val_key, test_key) in SETTINGS.items():
            dense = pick_dense_row(rows[setting]).name
            files = {}
            for key in {val_key, test_key}:
                files[key] = work / stage / f"prefix_scorer_{key}.pt"
                scorer.subset(torch.tensor([row_of[i] for i in corpora[key].item_ids])).save(files[key])
            bonuses = args.scorer_bonuses if setting == "all videos" else [0.0]
            grid, t1 = {}, time.perf_counter()
            for beam in args.scorer_beams:
                for weight in args.scorer_weights:
                    for bonus in bonuses:
                        model = _pool_model(model_class, trained, corpora[val_key], work / stage / f"pool_{val_key}.ckpt",
                                            args, beam, prefix_scorer=str(files[val_key]), prefix_scorer_weight=weight,
                                            prefix_scorer_untrained_bonus=bonus)
                        cli = _cli(config, overrides(stage, val_key, [*extra, "--data.init_args.max_val_queries=null"]))
                        cli.trainer.callbacks.append(TwoStageEvaluation(
                            dense_checkpoint=checkpoints[dense], name="two_stage", full_dense_reference=False))
                        v = cli.trainer.validate(model, datamodule=cli.datamodule, verbose=False)[0]
                        grid[(beam, weight, bonus)] = {
                            "val/two_stage/recall@1": float(v["val/two_stage/recall@1"]),
                            "val/unseen/candidate_recall": float(v["val/unseen/candidate_recall"]),
                            "val/recall@1": float(v["val/recall@1"]), "val/prefix_share": float(v["val/prefix_share"])}
                        print(f"[{name}] {setting} val: scorer beam {beam}, w {weight}, bonus {bonus}: "
                              f"{grid[(beam, weight, bonus)]}", flush=True)
            # the best rerank R@1 on validation, then gold in pool, then the narrower beam and smaller weight/bonus
            beam, weight, bonus = max(grid, key=lambda c: (grid[c]["val/two_stage/recall@1"],
                                                           grid[c]["val/unseen/candidate_recall"], -c[0], -c[1], -c[2]))
            hparams = dict(prefix_scorer_weight=weight, prefix_scorer_untrained_bonus=bonus)
            model = _pool_model(model_class, trained, corpora[val_key], work / stage / f"pool_{val_key}.ckpt", args,
                                beam, prefix_scorer=str(files[val_key]), **hparams)
            cli = _cli(config, overrides(stage, val_key, [*extra, "--data.init_args.max_val_queries=null"]))
            cli.trainer.callbacks.extend(fusion_weight_callbacks(checkpoints[dense]))
            fused_weight, scores = pick_fusion_weight(cli.trainer.validate(model, datamodule=cli.datamodule,
                                                                           verbose=False)[0])
            pick_seconds = time.perf_counter() - t1
            picks[setting] = {"beam": beam, "weight": weight, "untrained_bonus": bonus, "fusion_weight": fused_weight,
                              "pick_seconds": pick_seconds,
                              "grid": [{"beam": c[0], "weight": c[1], "untrained_bonus": c[2], **m}
                                       for c, m in grid.items()],
                              "val_recall@1_by_fusion_weight": {str(w): r1 for w, (r1, _) in scores.items()}}
            t1 = time.perf_counter()
            model = _pool_model(model_class, trained, corpora[test_key], work / stage / f"pool_{test_key}.ckpt", args,
                                beam, prefix_scorer=str(files[test_key]), **hparams)
            cli = _cli(config, overrides(stage, test_key, [*extra, *test_only]))
            metrics = _test(cli, model, [
                TwoStageEvaluation(dense_checkpoint=checkpoints[dense], name="two_stage", full_dense_reference=False),
                TwoStageEvaluation(dense_checkpoint=checkpoints[dense], name="fused", generative_weight=fused_weight,
                                   full_dense_reference=False)])
            seconds = time.perf_counter() - t1
            what = f"p = {args.recall_levels}, beam {beam}, scorer w = {weight}" + (f", bonus {bonus}" if bonus else "")
            rows[setting].append(Row(f"{label} prefix recall + prefix scorer ({what}, picked on val)", metrics, seconds))
            for prefix, row_name, extra_seconds in (
                    ("two_stage", f"{label} recall + prefix scorer + rerank by {dense}", 0.0),
                    ("fused", f"{label} recall + prefix scorer + fused rerank by {dense} (w = {fused_weight}, "
                              "picked on val)", pick_seconds)):
                stage_metrics = {k.replace(f"test/{prefix}/", "test/"): v for k, v in metrics.items()
                                 if k.startswith(f"test/{prefix}/")}
                stage_metrics["stage1/test/prefix_share"] = metrics["test/prefix_share"]
                rows[setting].append(Row(row_name, stage_metrics, seconds + extra_seconds))
            print(f"[{name}] {setting}: {label} + prefix scorer (beam {beam}, w {weight}, bonus {bonus}) R@1 "
                  f"{metrics['test/recall@1']:.4f}, gold in pool {metrics['test/unseen/candidate_recall']:.4f}, + rerank "
                  f"{metrics['test/two_stage/recall@1']:.4f}, + fused (w = {fused_weight}) "
                  f"{metrics['test/fused/recall@1']:.4f}, items under the prefixes {metrics['test/prefix_share']:.2%}",
                  flush=True)
            save_partial()

    for kind in args.generative:
        label, config, stage = GENERATIVE[kind]
        t0 = time.perf_counter()
        extra: list[str] = []
        if kind == "ace":
            if not (args.reuse and (work / "ace_tokenizer" / "bundle" / "meta.json").is_file()):
                _fit(_cli("ace_tokenizer.yaml", overrides("ace_tokenizer")))
            extra = [f"--model.init_args.bundle_dir={work / 'ace_tokenizer' / 'bundle'}"]
        cli = _cli(config, overrides(stage, "all", [*extra, *NO_VALIDATION]))
        trained = fit(cli, stage)
        model_class = type(cli.model)
        result["train_seconds"][label] = time.perf_counter() - t0
        print(f"[{name}] {label} trained in {result['train_seconds'][label]:.0f} s: {trained}", flush=True)
        for setting, (val_key, test_key) in SETTINGS.items():
            if kind == "ace" and args.prefix_scorer and args.scorer_rows_only:
                break
            dense = pick_dense_row(rows[setting]).name

            t1 = time.perf_counter()  # the fusion weight, on every validation query of the setting's val pool
            cli = _cli(config, overrides(stage, val_key, [*extra, "--data.init_args.max_val_queries=null"]))
            cli.trainer.callbacks.extend(fusion_weight_callbacks(checkpoints[dense]))
            validation = {k: float(v) for k, v in
                          cli.trainer.validate(_pool_model(model_class, trained, corpora[val_key],
                                                           work / stage / f"pool_{val_key}.ckpt", args),
                                               datamodule=cli.datamodule, verbose=False)[0].items()}
            weight, scores = pick_fusion_weight(validation)
            pick_seconds = time.perf_counter() - t1
            t1 = time.perf_counter()
            cli = _cli(config, overrides(stage, test_key, [*extra, *test_only]))
            pool_model = _pool_model(model_class, trained, corpora[test_key], work / stage / f"pool_{test_key}.ckpt",
                                     args)
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
                stage_metrics["stage1/test/prefix_share"] = metrics["test/prefix_share"]
                rows[setting].append(Row(row_name, {**stage_metrics, **fused}, seconds + extra_seconds))
            print(f"[{name}] {setting}: {label} R@1 {metrics['test/recall@1']:.4f}, + rerank "
                  f"{metrics['test/two_stage/recall@1']:.4f}, + fused (w = {weight}) {metrics['test/fused/recall@1']:.4f}"
                  f", pool {metrics['test/pool_share']:.2%}", flush=True)
            save_partial()
        if kind == "ace" and args.prefix_scorer:
            scorer_rows(label, config, stage, extra, trained, model_class)
    return result


def _prefix_share(metrics: dict[str, float]) -> float | None:
    """Share of the pool under a row's decoded prefixes (what stage 1 expands, and a prefix scorer reads); None
    for a dense row or a result without it."""
    return metrics.get("test/prefix_share", metrics.get("stage1/test/prefix_share"))


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
                               "under_decoded_prefixes": _prefix_share(r.metrics),
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
        lines.append("| method | R@1 | R@5 | R@10 | MRR@10 | gold in pool | pool scored | under decoded prefixes | "
                     "R@1 / picked dense | s |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row_name, row in summary["rows"].items():
            m, gold, read = row["metrics"], row["gold_in_pool"], row.get("under_decoded_prefixes")
            lines.append(f"| {row_name} | {m['test/recall@1']:.2%} | {m['test/recall@5']:.2%} | "
                         f"{m['test/recall@10']:.2%} | {m['test/mrr@10']:.4f} | "
                         f"{'-' if gold is None else f'{gold:.1%}'} | {row['pool_scored']:.1%} | "
                         f"{'-' if read is None else f'{read:.1%}'} | "
                         f"{row['r1_vs_picked_dense']:.2f}x | {row['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)
