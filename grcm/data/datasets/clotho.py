"""Clotho v2.1 text-to-audio retrieval: development / validation / evaluation -> train / val / test.

Annotation files in ``annotation_dir``: ``clotho_captions_{development,validation,evaluation}.csv``
(header ``file_name,caption_1,...,caption_5``; quoted fields, LF or CRLF line ends).

A few file names occur in two splits (different recordings), so item ids are split-qualified:
``"development/<file_name>"``, the folder the official audio archive unpacks into. File names are
kept verbatim, leading spaces included (``" Ambience Birds.wav"``); feature ids match with or
without them, and under any folder whose name contains the split (``clotho_audio_development/``).

The validation CSV is a separate download: without ``splits`` the reader reads the splits whose
CSV exists and notes each missing one (fit then validates on held-out training captions).
"""

from __future__ import annotations

import re
from pathlib import Path

from grcm.data.corpus import CorpusError
from grcm.data.datasets.captions import CaptionSet, CaptionSetBuilder, DatasetReader, detect_splits
from grcm.data.datasets.files import annotation_root, find_optional_file, media_stem, read_csv_rows

CLOTHO_SPLITS = {"train": "development", "val": "validation", "test": "evaluation"}
CAPTION_COLUMNS = tuple(f"caption_{k}" for k in range(1, 6))
HINT = "download the Clotho v2.1 caption CSVs from Zenodo record 4783391."


def read_clotho(annotation_dir: str | Path, *, splits: tuple[str, ...] | None = None) -> CaptionSet:
    """Read Clotho captions, 5 per clip, item ids ``"<development|validation|evaluation>/<file_name>"``.

    Args:
        annotation_dir: folder with the caption CSVs (or a ``csv_files/`` subfolder holding them).
        splits: splits to read (each needs its CSV); None reads those whose CSV exists.
    """
    root = annotation_root(annotation_dir)
    builder = CaptionSetBuilder("clotho", "audio", root)
    names = {split: f"clotho_captions_{official}.csv" for split, official in CLOTHO_SPLITS.items()}
    found = {split: find_optional_file(root, [name, f"csv_files/{name}"]) for split, name in names.items()}
    for split in detect_splits(builder, splits, found, names, HINT):
        official, path = CLOTHO_SPLITS[split], found[split]
        for number, row in enumerate(read_csv_rows(path, ("file_name", *CAPTION_COLUMNS)), start=2):
            item_id = f"{official}/{row['file_name']}"
            if builder.has_item(item_id):
                raise CorpusError(f"{path}: row {number} repeats file name {row['file_name']!r}.")
            builder.add_item(item_id)
            for column in CAPTION_COLUMNS:
                builder.add_caption(item_id, row[column], split, path)
    return builder.build()


def clotho_feature_key(raw_id: str) -> str:
    """``"data/clotho_audio_development/ Ambience Birds.wav"`` -> ``"development/Ambience Birds"``.

    The split comes from the nearest folder whose name contains it; an id without one keeps
    only its base name (and will not match a split-qualified item).
    """
    parts = re.split(r"[\\/]", raw_id)
    name = media_stem(parts[-1])
    for folder in reversed(parts[:-1]):
        split = next((s for s in CLOTHO_SPLITS.values() if s in folder.lower()), None)
        if split:
            return f"{split}/{name}"
    return name


READER = DatasetReader(
    name="clotho",
    modality="audio",
    read=read_clotho,
    feature_key=clotho_feature_key,
    files="clotho_captions_{development,validation,evaluation}.csv",
    id_format="<development|validation|evaluation>/<file_name>, e.g. development/Birds in the park.wav "
    "(the folder the Zenodo archive unpacks into, then the CSV's file_name)",
)
