"""``grcm index-items``: give items added after training their SIDs and put them in a retriever checkpoint.

A semantic ID is a function of an item's features, so an item that arrives after training gets its SID
from the trained tokenizer, next to trained items with similar content, without retraining anything:

* **ACE** (:class:`~grcm.retriever.module.GenerativeRetriever` checkpoint): the tokenizer checkpoint
  (``--tokenizer``, the ACE tokenizer run's ``checkpoints/last.ckpt``; the bundle holds no encoder
  weights) gives the K-Means and RQ-VAE codes; the unique token of a new item counts the items already
  holding its prefix (existing ones first, then new ones in order), as the bundle's ID table does. When
  that count reaches the unique token's vocabulary the item shares the last SID of its prefix (its leaf
  then holds several items; reported as ``shared_sids``). Without a unique token (e.g. a capacity-capped
  tokenizer, ``sid_capacity``) a new item takes its nearest codes and shares the leaf of any item already
  holding them (also counted in ``shared_sids``): the cap is not applied to new items, since applying it
  would move existing items.
* **GRDR** (:class:`~grcm.retriever.grdr.GRDRRetriever` checkpoint): its own multi-view tokenizer gives
  every view's codes over the levels built.

The new rows are added to the checkpoint's SID table (``sid_codes``, for GRDR also ``anchor_codes``) and
item ids; the trie is a function of that table and is rebuilt from it when the checkpoint is loaded.
Existing items keep their SIDs (verified before writing). The new checkpoint is written atomically.

New items come either as ``--features new.npy --item_ids ids.txt`` (appended after the checkpoint's
items) or as ``--corpus_dir`` (every corpus item the checkpoint lacks is added and the table follows the
corpus's item order, so ``grcm test/predict`` on that corpus accepts the checkpoint).

The reverse, :func:`restrict_sid_table`, cuts a checkpoint's table down to a subset of its items (an
evaluation pool of only some of them, e.g. a benchmark's test items), each keeping its SID.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grcm.errors import GrcmError

ACE_KEY = "sid_bundle"  # grcm.retriever.module.CHECKPOINT_KEY
GRDR_KEY = "grdr_sid_table"  # grcm.retriever.grdr.state.CHECKPOINT_KEY


class IndexItemsError(GrcmError, ValueError):
    """New items that cannot be indexed (duplicate ids, wrong feature dimension, mismatched tokenizer)."""


def read_item_ids(path: str | Path) -> list[str]:
    """Item ids, one per non-empty line of a text file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _check_new_ids(new_ids: list[str], known: list[str], where: str) -> None:
    if len(set(new_ids)) != len(new_ids):
        repeated = next(i for i in new_ids if new_ids.count(i) > 1)
        raise IndexItemsError(f"{where}: item id {repeated!r} is given twice; item ids must be unique.")
    known_set = set(known)
    clash = [i for i in new_ids if i in known_set]
    if clash:
        raise IndexItemsError(f"{where}: item id {clash[0]!r} is already in the checkpoint "
                              f"({len(clash)} such ids); give new items new ids.")


def _check_dim(features: np.ndarray, expected: int, where: str) -> None:
    if features.ndim != 2 or features.shape[1] != expected:
        raise IndexItemsError(f"{where}: features of shape {tuple(features.shape)} but the tokenizer reads "
                              f"{expected}-d features; give (N, {expected}) features of the same encoder.")


def unique_tokens(existing_prefix: torch.Tensor, new_prefix: torch.Tensor, vocab: int) -> tuple[torch.Tensor, int]:
    """Unique tokens (k,) of new items: items already holding the prefix (existing rows (N, L'), then earlier
    new rows (k, L')), capped at ``vocab - 1``; and the number of new items that hit the cap."""
    counts: dict[tuple[int, ...], int] = {}
    for row in existing_prefix.tolist():
        key = tuple(row)
        counts[key] = counts.get(key, 0) + 1
    tokens = []
    for row in new_prefix.tolist():
        key = tuple(row)
        tokens.append(counts.get(key, 0))
        counts[key] = tokens[-1] + 1
    raw = torch.tensor(tokens, dtype=torch.long)
    return raw.clamp(max=vocab - 1), int((raw >= vocab).sum())


def _ace_new_codes(checkpoint: dict[str, Any], tokenizer_path: str | None, features: np.ndarray,
                   where: str) -> tuple[torch.Tensor, dict[str, int]]:
    """(k, L) SIDs of the new items for an ACE checkpoint, and counts for the summary."""
    from grcm.tokenizers.export import load_tokenizer
    from grcm.tokenizers.module import ACETokenizer

    if tokenizer_path is None:
        raise IndexItemsError("--tokenizer is required for an ACE retriever checkpoint: the ACE tokenizer run's "
                              "checkpoints/last.ckpt (it holds the K-Means and RQ-VAE weights).")
    tokenizer: ACETokenizer = load_tokenizer(tokenizer_path)
    _check_dim(features, int(tokenizer.hparams.feature_dim), where)
    extras = checkpoint[ACE_KEY]
    vocab_sizes = [int(v) for v in extras["vocab_sizes"]]
    prefix_vocab = tokenizer.prefix_vocab_sizes
    unique = bool(tokenizer.hparams.unique_token)
    coarse = extras.get("codebooks", {}).get("coarse")
    same_levels = vocab_sizes[: len(prefix_vocab)] == prefix_vocab and len(vocab_sizes) == len(prefix_vocab) + unique
    if not same_levels or (coarse is not None and tokenizer.coarse is not None
                           and not torch.equal(coarse.cpu(), tokenizer.coarse.centroids.detach().cpu())):
        raise IndexItemsError(f"--tokenizer={tokenizer_path} did not build this checkpoint's SIDs (levels "
                              f"{prefix_vocab}, unique token {unique} vs {vocab_sizes}, or other K-Means "
                              "centroids); pass the tokenizer run whose bundle the retriever was trained on.")
    prefix, _ = tokenizer.encode_corpus(features)
    existing = checkpoint["state_dict"]["sid_codes"][:, : len(prefix_vocab)]
    if not unique:  # no counter level: a new item whose SID is already held shares that leaf
        return prefix, {"shared_sids": unique_tokens(existing, prefix, 1)[1]}
    tokens, capped = unique_tokens(existing, prefix, vocab_sizes[-1])
    return torch.cat([prefix, tokens[:, None]], dim=1), {"shared_sids": capped}


def _grdr_new_codes(checkpoint_path: str, features: np.ndarray, where: str) -> torch.Tensor:
    """(k, V, L) codes of the new items from a GRDR checkpoint's own tokenizer (levels not built stay 0)."""
    from grcm.retriever.grdr import GRDRRetriever

    module = GRDRRetriever.load_from_checkpoint(checkpoint_path, map_location="cpu", weights_only=True).eval()
    _check_dim(features, int(module.hparams.feature_dim), where)
    levels = int(module.sids.initialised_levels)
    codes = torch.zeros(features.shape[0], module.hparams.num_views, module.hparams.num_levels, dtype=torch.long)
    if levels:
        with torch.no_grad():
            codes[:, :, :levels] = module.tokenizer.encode(torch.as_tensor(features, dtype=torch.float32), levels)
    return codes


def _new_items(args: argparse.Namespace, known: list[str]) -> tuple[list[str], np.ndarray, list[str], str]:
    """(new ids, their features (k, D), the final item order, where they came from)."""
    if args.corpus_dir is not None:
        from grcm.data.corpus import load_corpus

        corpus = load_corpus(args.corpus_dir)
        where = f"--corpus_dir={args.corpus_dir}"
        missing = sorted(set(known) - set(corpus.item_ids))
        if missing:
            raise IndexItemsError(f"{where}: lacks {len(missing)} of the checkpoint's items (e.g. {missing[0]!r}); "
                                  "the corpus must hold every indexed item plus the new ones.")
        known_set = set(known)
        rows = [i for i, item in enumerate(corpus.item_ids) if item not in known_set]
        new_ids = [corpus.item_ids[i] for i in rows]
        return new_ids, np.asarray(corpus.features[rows], dtype=np.float32), list(corpus.item_ids), where
    if args.features is None or args.item_ids is None:
        raise IndexItemsError("give the new items as --features FILE.npy and --item_ids FILE.txt, or --corpus_dir DIR.")
    from grcm.data.corpus import load_features

    where = f"--features={args.features}"
    features = np.asarray(load_features(Path(args.features), "pass an (N, D) .npy or .safetensors file"),
                          dtype=np.float32)
    new_ids = read_item_ids(args.item_ids)
    if len(new_ids) != features.shape[0]:
        raise IndexItemsError(f"--item_ids={args.item_ids} lists {len(new_ids)} ids for {features.shape[0]} "
                              f"feature rows of {args.features}; give one id per row.")
    _check_new_ids(new_ids, known, f"--item_ids={args.item_ids}")
    return new_ids, features, [*known, *new_ids], where


def _reorder(old: torch.Tensor, new: torch.Tensor, known: list[str], new_ids: list[str], order: list[str]) -> torch.Tensor:
    """Rows of ``old`` (items ``known``) and ``new`` (items ``new_ids``) in the item order ``order``."""
    position = {item: i for i, item in enumerate(known)}
    position.update({item: len(known) + i for i, item in enumerate(new_ids)})
    return torch.cat([old, new.to(old.dtype)])[torch.tensor([position[i] for i in order], dtype=torch.long)]


def _sid_table(checkpoint: dict[str, Any], where: str) -> tuple[str, list[str]]:
    """("ace" or "grdr", the state-dict names of its SID table: ACE ``sid_codes`` (N, L), GRDR
    ``sids.sid_codes`` and ``sids.anchor_codes`` (N, V, L)) of a retriever checkpoint."""
    state = checkpoint.get("state_dict", {})
    if ACE_KEY in checkpoint and "sid_codes" in state:
        return "ace", ["sid_codes"]
    if GRDR_KEY in checkpoint and "sids.sid_codes" in state:
        return "grdr", ["sids.sid_codes", "sids.anchor_codes"]
    raise IndexItemsError(f"{where}: not a GenerativeRetriever or GRDRRetriever checkpoint (no SID table); pass a "
                          "trained retriever's checkpoint.")


def restrict_sid_table(checkpoint_path: str | Path, item_ids: list[str], out: str | Path) -> Path:
    """Write a copy of a retriever checkpoint whose SID table holds only ``item_ids``, in that order.

    For evaluating on a corpus that holds a subset of the indexed items (e.g. only a benchmark's test items):
    the rows of the ACE table ``sid_codes`` (N, L) or of GRDR's ``sids.sid_codes`` / ``sids.anchor_codes``
    (N, V, L) are kept for those items, unchanged (each keeps its SID); the trie is rebuilt from the table when
    the checkpoint is loaded. Written atomically; ``out`` may equal ``checkpoint_path``.

    Raises:
        IndexItemsError: not a retriever checkpoint, or an item of ``item_ids`` has no SID in it.
    """
    from grcm.checkpoint import read_checkpoint
    from grcm.io import atomic_path

    checkpoint = read_checkpoint(checkpoint_path)
    state = checkpoint["state_dict"]
    kind, names = _sid_table(checkpoint, str(checkpoint_path))
    extras = checkpoint[ACE_KEY if kind == "ace" else GRDR_KEY]
    row_of = {item: row for row, item in enumerate(extras["item_ids"])}
    missing = [item for item in item_ids if item not in row_of]
    if missing:
        raise IndexItemsError(f"{checkpoint_path}: {len(missing)} pool items (e.g. {missing[0]!r}) have no SID in "
                              "the checkpoint; the pool must be a subset of the indexed items.")
    rows = torch.tensor([row_of[item] for item in item_ids], dtype=torch.long)
    for name in names:
        state[name] = state[name][rows].clone()
    extras["item_ids"] = list(item_ids)
    if kind == "ace":
        extras["feature_checksum"] = ""  # the table is a subset of the tokenizer run's corpus
    with atomic_path(out) as tmp:
        torch.save(checkpoint, tmp)
    return Path(out)


def index_items(args: argparse.Namespace) -> dict[str, Any]:
    """Index the new items of ``args`` into ``args.ckpt_path``'s SID table and write ``args.out``; a summary."""
    from grcm.checkpoint import read_checkpoint
    from grcm.io import atomic_path

    start = time.perf_counter()
    checkpoint = read_checkpoint(args.ckpt_path)
    state = checkpoint["state_dict"]
    kind, names = _sid_table(checkpoint, f"--ckpt_path={args.ckpt_path}")
    extras = checkpoint[ACE_KEY if kind == "ace" else GRDR_KEY]
    known = list(extras["item_ids"])
    new_ids, features, order, where = _new_items(args, known)
    if not new_ids:
        raise IndexItemsError(f"{where}: no item that the checkpoint lacks; nothing to index.")
    stats: dict[str, int] = {}
    if kind == "ace":
        new_codes, stats = _ace_new_codes(checkpoint, args.tokenizer, features, where)
    else:
        new_codes = _grdr_new_codes(args.ckpt_path, features, where)
    row_of = {item: i for i, item in enumerate(order)}
    kept = torch.tensor([row_of[item] for item in known], dtype=torch.long)
    for name in names:
        old = state[name]
        state[name] = _reorder(old, new_codes, known, new_ids, order)
        if not torch.equal(state[name][kept], old):  # existing SIDs never change
            raise RuntimeError("index-items: an existing item's SID changed while reordering (a bug)")
    extras["item_ids"] = order
    if kind == "ace":
        extras["feature_checksum"] = ""  # the table no longer comes from one tokenizer run over one corpus
        extras.setdefault("health", {})["items_indexed_after_training"] = (
            int(extras.get("health", {}).get("items_indexed_after_training", 0)) + len(new_ids))
    with atomic_path(args.out) as tmp:
        torch.save(checkpoint, tmp)
    return {"kind": kind, "added": len(new_ids), "items": len(order), "seconds": time.perf_counter() - start,
            "out": str(args.out), **stats}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grcm index-items",
        description="Give items added after training their SIDs with the trained tokenizer and add them to a "
                    "retriever checkpoint's SID table (no retraining); writes a new checkpoint atomically.",
    )
    parser.add_argument("--ckpt_path", required=True, help="the trained retriever's checkpoint (ACE or GRDR)")
    parser.add_argument("--out", required=True, help="the checkpoint to write (may equal --ckpt_path)")
    parser.add_argument("--tokenizer", help="ACE only: the tokenizer run's checkpoint (<run dir>/checkpoints/last.ckpt)")
    parser.add_argument("--features", help="(k, D) features of the new items (.npy or .safetensors)")
    parser.add_argument("--item_ids", help="text file with the k new item ids, one per line, in feature-row order")
    parser.add_argument("--corpus_dir", help="instead of --features/--item_ids: a corpus holding the checkpoint's "
                                             "items and the new ones (the table follows its item order)")
    return parser


def main(argv: list[str]) -> None:
    """``grcm index-items`` (see :func:`build_parser`)."""
    args = build_parser().parse_args(argv)
    summary = index_items(args)
    shared = f", {summary['shared_sids']} sharing a full SID" if summary.get("shared_sids") else ""
    print(f"grcm index-items: added {summary['added']} items to the {summary['kind']} SID table "
          f"({summary['items']} items{shared}) in {summary['seconds']:.2f} s; wrote {summary['out']}")
