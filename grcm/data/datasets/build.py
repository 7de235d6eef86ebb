"""Join a :class:`CaptionSet` with user-provided item features and write a corpus directory.

Features come as a ``(N, D)`` matrix (``.npy``, or ``.safetensors`` holding a tensor
``features`` or a single tensor) plus a text file naming the item of each row, one id
per line. Ids are matched through the dataset's ``feature_key`` (so ``video7.mp4``
and ``video7`` join). The corpus directory (layout in :mod:`grcm.data.corpus`) gets
a ``preparation.json`` report beside it: counts, skipped items, notes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from grcm.data.corpus import SPLITS, Corpus, CorpusError, load_features, save_corpus
from grcm.data.datasets.captions import CaptionSet
from grcm.data.datasets.files import read_id_list
from grcm.io import atomic_directory, write_json_atomic

logger = logging.getLogger(__name__)


def read_feature_ids(path: str | Path) -> list[str]:
    """Item ids of a feature matrix, one per line (line i <-> row i); LF or CRLF; spaces inside ids kept."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: feature id file not found; write one item id per feature row.")
    return read_id_list(path)


def load_feature_matrix(path: str | Path) -> np.ndarray:
    """A ``(N, D)`` float feature matrix: ``.npy`` (memory-mapped) or ``.safetensors``."""
    path = Path(path)
    features = load_features(
        path, missing_hint="pass an (N, D) .npy or .safetensors matrix", single_tensor_ok=True
    )
    if features.dtype not in (np.float16, np.float32, np.float64):
        raise CorpusError(f"{path}: features dtype is {features.dtype}; store float16 or float32.")
    return features


def id_hint(captions: CaptionSet, key: Callable[[str], str], id_format: str = "") -> str:
    """What the feature ids of ``captions``'s dataset look like, with an item id of its annotations."""
    example = captions.item_ids[0] if captions.item_ids else ""
    expected = f"{captions.name} feature ids look like {id_format}" if id_format else (
        "feature ids must name the items as the annotations do")
    return (f"{expected}; the annotations' first item is {example!r}, matched as {key(example)!r} "
            "(docs/data.md, \"Feature ids\")")


def _keyed_rows(feature_ids: list[str], key: Callable[[str], str], ids_path: Path, hint: str) -> dict[str, int]:
    rows: dict[str, int] = {}
    for row, raw in enumerate(feature_ids):
        canonical = key(raw)
        if canonical in rows:
            first = rows[canonical]
            raise CorpusError(
                f"{ids_path}: lines {first + 1} ({feature_ids[first]!r}) and {row + 1} ({raw!r}) both name item "
                f"{canonical!r}; keep one feature row per item. Hint: {hint}."
            )
        rows[canonical] = row
    return rows


def _item_rows(
    captions: CaptionSet, key: Callable[[str], str], row_of_key: dict[str, int], hint: str
) -> np.ndarray:
    """``(N,)`` feature row of every item of ``captions``, -1 where there is none."""
    rows = np.full(captions.num_items, -1, dtype=np.int64)
    owner: dict[str, str] = {}
    for index, item_id in enumerate(captions.item_ids):
        canonical = key(item_id)
        if canonical in owner:
            raise CorpusError(
                f"{captions.name}: items {owner[canonical]!r} and {item_id!r} map to the same feature key "
                f"{canonical!r}; their features could not be told apart. Hint: {hint}."
            )
        owner[canonical] = item_id
        rows[index] = row_of_key.get(canonical, -1)
    return rows


def _empty_split_problems(captions: CaptionSet, kept: CaptionSet, hint: str) -> list[str]:
    """One message per split the reader read (``captions.splits``) that ends up with no captions."""
    problems = []
    before, after = captions.counts(), kept.counts()
    for split in captions.splits:
        if after["captions"][split]:
            continue
        if before["captions"][split]:
            reason = (f"all {before['items'][split]} of its captioned items have no feature row and were skipped; "
                      f"extract features for them or check the ids ({hint})")
        else:
            others = [other for other in captions.splits if after["captions"][other]]
            only = f" (--splits {' '.join(others)})" if others else ""
            where = captions.split_files.get(split)
            about = [note for note in captions.notes if where and where in note]
            source = (f"{where} gives none ({' '.join(about) or 'a header only?'})" if where else
                      f"the annotation files in {captions.source or 'the annotation folder'} give none"
                      + (f" ({' '.join(captions.notes)})" if captions.notes else ""))
            reason = f"{source}; check {'that file' if where else 'them'}, or read only the other splits{only}"
        problems.append(f"{captions.name}: split {split!r} would have no captions: {reason}")
    return problems


def _unused_row_problem(
    feature_ids: list[str], used: np.ndarray, matched: np.ndarray, ids_path: Path, key, hint: str
) -> str | None:
    """The message for feature rows that end up in no corpus row (None when every row is used)."""
    unused = np.flatnonzero(~used)
    if unused.size == 0:
        return None
    no_item = [row for row in unused.tolist() if not matched[row]]
    uncaptioned = int(unused.size - len(no_item))
    parts = []
    if no_item:
        examples = [feature_ids[row] for row in no_item[:3]]
        parts.append(f"{len(no_item)} match no item of the splits read (e.g. {examples}, matched as "
                     f"{[key(e) for e in examples]})")
    if uncaptioned:
        parts.append(f"{uncaptioned} name items without captions")
    return (
        f"{ids_path}: {unused.size} of {len(feature_ids)} feature rows would be unused: {'; '.join(parts)}. "
        f"Hint: {hint}. Fix the ids, keep such rows as gallery items with keep_uncaptioned=True "
        "(--keep-uncaptioned)"
    )


def build_corpus(
    captions: CaptionSet,
    features_path: str | Path,
    feature_ids_path: str | Path,
    out_dir: str | Path,
    *,
    feature_key: Callable[[str], str] | None = None,
    skip_missing: bool = False,
    keep_uncaptioned: bool = False,
    feature_format: str = "npy",
    allow_empty: bool = False,
    id_format: str = "",
) -> Path:
    """Join ``captions`` with a feature matrix and write the corpus directory ``out_dir`` atomically.

    Fails (a :class:`CorpusError`, nothing written) when a split the reader read
    (``captions.splits``) ends up with no captions, or when feature rows end up unused (their
    ids match no item, or items without captions); ``allow_empty`` logs a warning instead.

    Args:
        captions: what a dataset reader returned.
        features_path: ``(N_f, D)`` ``.npy`` / ``.safetensors`` feature matrix.
        feature_ids_path: text file, line i = item id of feature row i.
        out_dir: corpus directory to write (replaced as a whole on success).
        feature_key: canonical form of an id on both sides of the join (identity if None).
        skip_missing: drop captioned items without a feature row (and their captions) instead of
            failing; the dropped ids are listed in ``preparation.json``.
        keep_uncaptioned: keep items that have features but no captions (gallery distractors):
            annotation items without captions and feature rows no annotation names.
        feature_format: ``"npy"`` or ``"safetensors"`` for the written features.
        allow_empty: write the corpus despite empty splits and unused feature rows (warned, listed
            in ``preparation.json`` under ``warnings``).
        id_format: what a feature id of this dataset looks like, for the hints of id errors.

    Returns:
        ``out_dir``.
    """
    features_path, feature_ids_path = Path(features_path), Path(feature_ids_path)
    key = feature_key or (lambda raw: raw)
    features = load_feature_matrix(features_path)
    feature_ids = read_feature_ids(feature_ids_path)
    if len(feature_ids) != features.shape[0]:
        raise CorpusError(
            f"{feature_ids_path}: {len(feature_ids)} ids but {features_path} has {features.shape[0]} rows; "
            "line i of the id file must name feature row i."
        )
    hint = id_hint(captions, key, id_format)
    rows = _item_rows(captions, key, _keyed_rows(feature_ids, key, feature_ids_path, hint), hint)
    captioned = captions.captioned()
    missing = captioned & (rows < 0)
    if missing.any() and (not skip_missing or missing.sum() == captioned.sum()):
        missing_ids = [captions.item_ids[i] for i in np.flatnonzero(missing)[:5].tolist()]
        example = feature_ids[0] if feature_ids else "<empty>"
        fix = (
            "Check that the id file names this dataset's items"
            if skip_missing
            else "Extract features for these items, or pass skip_missing=True to drop them and their captions"
        )
        raise CorpusError(
            f"{feature_ids_path}: no feature row for item {missing_ids[0]!r} ({int(missing.sum())} of "
            f"{int(captioned.sum())} captioned {captions.name} items missing, e.g. {missing_ids}; ids are matched "
            f"as {key(missing_ids[0])!r}, the id file's first line {example!r} as {key(example)!r}). {fix}. "
            f"Hint: {hint}."
        )
    keep = (rows >= 0) & (captioned | keep_uncaptioned)
    kept = captions.subset(keep)
    feature_rows = rows[keep]
    extra_rows = np.zeros(0, dtype=np.int64)
    if keep_uncaptioned:
        named = np.zeros(len(feature_ids), dtype=bool)
        named[rows[rows >= 0]] = True
        extra_rows = np.flatnonzero(~named)
    used = np.zeros(len(feature_ids), dtype=bool)
    used[np.concatenate([feature_rows, extra_rows])] = True
    matched = np.zeros(len(feature_ids), dtype=bool)
    matched[rows[rows >= 0]] = True
    problems = _empty_split_problems(captions, kept, hint)
    unused_problem = _unused_row_problem(feature_ids, used, matched, feature_ids_path, key, hint)
    if unused_problem:
        problems.append(unused_problem)
    if problems and not allow_empty:
        raise CorpusError(
            f"{problems[0]}; or pass allow_empty=True (grcm prepare --allow-empty) to write the corpus anyway"
            + (f" (and {len(problems) - 1} more problem(s))." if len(problems) > 1 else ".")
        )
    for problem in problems:
        logger.warning("%s (written anyway: allow_empty)", problem)
    matrix = np.asarray(features[np.concatenate([feature_rows, extra_rows])])
    if matrix.dtype == np.float64:
        matrix = matrix.astype(np.float32)
    corpus = Corpus(
        name=captions.name,
        modality=captions.modality,
        item_ids=kept.item_ids + [feature_ids[row] for row in extra_rows.tolist()],
        features=matrix,
        caption_item=kept.caption_item,
        caption_text=kept.caption_text,
        caption_split=kept.caption_split,
    ).validate(source=f"{feature_ids_path} + {captions.source}")

    skipped = [captions.item_ids[i] for i in np.flatnonzero(missing).tolist()]
    skipped_captions = captions.caption_split[missing[captions.caption_item]]
    report = {
        "dataset": captions.name,
        "modality": captions.modality,
        "annotation_dir": captions.source,
        "features": str(features_path),
        "feature_ids": str(feature_ids_path),
        "num_items": corpus.num_items,
        "feature_dim": corpus.feature_dim,
        **kept.counts(),
        "uncaptioned_items_kept": int((~captioned & keep).sum()) + int(extra_rows.size),
        "unused_feature_rows": int(len(feature_ids) - feature_rows.size - extra_rows.size),
        "skipped_items": skipped,
        "skipped_captions": {split: int((skipped_captions == split).sum()) for split in SPLITS},
        "splits": list(captions.splits),
        "notes": captions.notes,
        "warnings": problems,
    }
    if skipped:
        logger.warning(
            "%s: skipped %d item(s) without features and their %d caption(s), e.g. %s (listed in preparation.json)",
            captions.name,
            len(skipped),
            int(skipped_captions.size),
            skipped[:3],
        )
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_corpus(corpus, tmp, feature_format=feature_format)
        write_json_atomic(tmp / "preparation.json", report)
    return out_dir


def summary(report: dict) -> str:
    """One line of a ``preparation.json`` report: items and captions per split, unused feature rows."""
    splits = ", ".join(
        f"{split} {report['items'][split]} items / {report['captions'][split]} captions" for split in SPLITS
    )
    kept = f", {report['uncaptioned_items_kept']} uncaptioned kept" if report["uncaptioned_items_kept"] else ""
    return (f"{report['num_items']} items ({splits}{kept}), {report['unused_feature_rows']} unused feature rows, "
            f"{len(report['skipped_items'])} items skipped for lack of features")
