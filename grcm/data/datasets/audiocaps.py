"""AudioCaps (v1) text-to-audio retrieval: train / val / test = 49,838 x 1, 495 x 5, 975 x 5 captions.

Annotation files in ``annotation_dir`` (cdjkim/audiocaps ``dataset/``): ``train.csv``, ``val.csv``,
``test.csv`` with header ``audiocap_id,youtube_id,start_time,caption`` (CRLF line ends).
``audiocap_id`` names a caption; a clip is ``(youtube_id, start_time)``, item id
``"<youtube_id>_<start_time>"``. Many clips can no longer be downloaded: build with
``skip_missing=True`` to drop (and report) clips without features.
"""

from __future__ import annotations

import re
from pathlib import Path

from grcm.data.corpus import CorpusError
from grcm.data.datasets.captions import CaptionSet, CaptionSetBuilder, DatasetReader, detect_splits
from grcm.data.datasets.files import annotation_root, find_optional_file, media_stem, read_csv_rows

SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
HINT = "download train.csv, val.csv and test.csv from github.com/cdjkim/audiocaps (dataset/)."


def read_audiocaps(annotation_dir: str | Path, *, splits: tuple[str, ...] | None = None) -> CaptionSet:
    """Read AudioCaps captions grouped by clip.

    Args:
        annotation_dir: folder with the split CSVs (or its ``dataset/`` subfolder).
        splits: splits to read (each needs its CSV); None reads those whose CSV exists.
    """
    root = annotation_root(annotation_dir)
    builder = CaptionSetBuilder("audiocaps", "audio", root)
    found = {split: find_optional_file(root, [name, f"dataset/{name}"]) for split, name in SPLIT_FILES.items()}
    split_of: dict[str, str] = {}
    shared: set[str] = set()
    for split in detect_splits(builder, splits, found, SPLIT_FILES, HINT):
        path = found[split]
        for number, row in enumerate(read_csv_rows(path, COLUMNS), start=2):
            youtube_id, start = row["youtube_id"].strip(), row["start_time"].strip()
            if not youtube_id or not start.isdigit():
                raise CorpusError(
                    f"{path}: row {number} has youtube_id {youtube_id!r}, start_time {start!r}; expected an id and "
                    "whole seconds."
                )
            item_id = f"{youtube_id}_{int(start)}"
            if split_of.setdefault(item_id, split) != split:
                shared.add(item_id)
            builder.add_caption(item_id, row["caption"], split, path)
    if shared:
        builder.note(f"{len(shared)} clip(s) have captions in two splits, e.g. {sorted(shared)[:3]}.")
    return builder.build()


_CLIP = re.compile(r"^Y?([A-Za-z0-9_-]{11})_(\d+)(?:\.\d+)?(?:_\d+(?:\.\d+)?)?$")


def audiocaps_feature_key(raw_id: str) -> str:
    """Canonical clip key ``"<youtube_id>_<start>"``.

    Accepts ``"7fmOlUlwoNg_20"``, ``"7fmOlUlwoNg_20.wav"`` and AudioSet-style
    ``"Y7fmOlUlwoNg_20.000_30.000.wav"`` (YouTube ids are 11 characters).
    """
    stem = media_stem(raw_id)
    match = _CLIP.match(stem)
    return f"{match.group(1)}_{int(match.group(2))}" if match else stem


READER = DatasetReader(
    name="audiocaps",
    modality="audio",
    read=read_audiocaps,
    feature_key=audiocaps_feature_key,
    files=", ".join(SPLIT_FILES.values()),
    id_format="<youtube_id>_<start_time>, e.g. 7fmOlUlwoNg_20 (also 7fmOlUlwoNg_20.wav or the AudioSet "
    "name Y7fmOlUlwoNg_20.000_30.000.wav)",
)
