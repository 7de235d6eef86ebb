"""Readers for the six real benchmarks and the step that turns one into a corpus directory.

>>> from grcm.data.datasets import prepare_dataset
>>> prepare_dataset("msvd", "annotations/msvd", "feats.npy", "feat_ids.txt", "data/msvd/corpus")  # doctest: +SKIP

Each reader reads a benchmark's official annotation files into a :class:`CaptionSet`
(item ids, captions, standard retrieval splits); :func:`build_corpus` joins it with
precomputed item features (``.npy``/``.safetensors`` + one id per line) and writes the
corpus directory that :class:`~grcm.data.datamodules.CorpusDataModule` serves.
"""

from __future__ import annotations

import logging
from pathlib import Path

from grcm.data.corpus import CorpusError
from grcm.data.datasets import audiocaps, clotho, coco, flickr30k, msrvtt, msvd
from grcm.data.datasets.build import build_corpus, load_feature_matrix, read_feature_ids, summary
from grcm.data.datasets.captions import CaptionSet, DatasetReader

logger = logging.getLogger(__name__)

DATASET_READERS: dict[str, DatasetReader] = {
    module.READER.name: module.READER for module in (msrvtt, msvd, flickr30k, coco, clotho, audiocaps)
}


def get_reader(name: str) -> DatasetReader:
    """The registry entry of ``name``; unknown names list the known ones."""
    if name not in DATASET_READERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASET_READERS)}.")
    return DATASET_READERS[name]


def read_captions(name: str, annotation_dir: str | Path, **reader_options) -> CaptionSet:
    """Read the captions of benchmark ``name`` (reader options as in its ``read_<name>``)."""
    return get_reader(name)(annotation_dir, **reader_options)


def prepare_dataset(
    name: str,
    annotation_dir: str | Path,
    features: str | Path,
    feature_ids: str | Path,
    out_dir: str | Path,
    skip_missing: bool = False,
    keep_uncaptioned: bool = False,
    feature_format: str = "npy",
    allow_empty: bool = False,
    **reader_options,
) -> Path:
    """Read benchmark ``name`` and write its corpus directory (with ``preparation.json``).

    The reader's notes (absent splits, files not found, protocol caveats) are logged at INFO level
    (``grcm prepare`` prints them as ``grcm: notice:`` lines) and kept in ``preparation.json``.

    Args:
        name: one of :data:`DATASET_READERS` (msrvtt, msvd, flickr30k, coco, clotho, audiocaps).
        annotation_dir: folder with the benchmark's annotation files.
        features: ``(N, D)`` ``.npy`` or ``.safetensors`` item features.
        feature_ids: text file, line i = id of feature row i (file names or ids; matched through
            the reader's ``feature_key``).
        out_dir: corpus directory to write.
        skip_missing: drop (and report) items without features instead of failing.
        keep_uncaptioned: keep items with features but no captions as extra gallery items.
        feature_format: ``"npy"`` or ``"safetensors"`` for the written features.
        allow_empty: write the corpus even when a split read has no captions or feature rows are
            unused (logged as warnings) instead of failing.
        **reader_options: passed to the reader, e.g. ``msrvtt_data_json=``, ``karpathy_json=``,
            ``validation=``, ``splits=``.

    Returns:
        ``out_dir``.
    """
    reader = get_reader(name)
    captions = reader(annotation_dir, **reader_options)
    for note in captions.notes:
        logger.info("%s: %s", name, note)
    _require_training_captions(name, captions)
    return build_corpus(
        captions,
        features,
        feature_ids,
        out_dir,
        feature_key=reader.feature_key,
        skip_missing=skip_missing,
        keep_uncaptioned=keep_uncaptioned,
        feature_format=feature_format,
        allow_empty=allow_empty,
        id_format=reader.id_format,
    )


def _require_training_captions(name: str, captions: CaptionSet) -> None:
    """Items read for training but not one training caption: fail now, not at fit time."""
    if "train" not in captions.splits:
        return
    uncaptioned = int((~captions.captioned()).sum())
    if captions.counts()["captions"]["train"] == 0 and uncaptioned:
        notes = " ".join(captions.notes)
        raise CorpusError(
            f"grcm prepare {name}: the corpus would have no training captions ({uncaptioned} items have none). "
            f"{notes} Fix: give the missing annotation file (MSR-VTT: --msrvtt-data-json MSRVTT_data.json), "
            "or build a test-only corpus with --splits test."
        )


__all__ = [
    "DATASET_READERS",
    "CaptionSet",
    "DatasetReader",
    "build_corpus",
    "get_reader",
    "load_feature_matrix",
    "prepare_dataset",
    "read_captions",
    "read_feature_ids",
    "summary",
]
