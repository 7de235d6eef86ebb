"""MSVD (YouTube2Text) text-to-video retrieval: 1,200 / 100 / 670 videos, all captions of each.

Annotation files (X-Pool layout) in ``annotation_dir``:

- ``captions_msvd.json``: ``{video_id: [caption, ...]}`` (1,970 videos, already lower-cased).
- ``train_list.txt``, ``val_list.txt``, ``test_list.txt``: one video id per line.

Item ids are the MSVD clip names (``<youtube id>_<start>_<end>``).
"""

from __future__ import annotations

from pathlib import Path

from grcm.data.corpus import SPLITS, CorpusError
from grcm.data.datasets.captions import CaptionSet, CaptionSetBuilder, DatasetReader, detect_splits
from grcm.data.datasets.files import (
    annotation_root,
    find_file,
    find_optional_file,
    media_stem,
    read_id_list,
    read_json,
)

CAPTIONS_FILE = "captions_msvd.json"
LIST_FILES = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
HINT = "MSVD captions and split lists come with the X-Pool repository (data/MSVD/)."


def read_msvd(annotation_dir: str | Path, *, splits: tuple[str, ...] | None = None) -> CaptionSet:
    """Read MSVD: every caption of every listed video, split by the list it is on.

    Args:
        annotation_dir: folder with ``captions_msvd.json`` and the three list files.
        splits: splits to read (each needs its list); None reads those whose list exists.
    """
    root = annotation_root(annotation_dir)
    builder = CaptionSetBuilder("msvd", "video", root)
    found = {split: find_optional_file(root, [name]) for split, name in LIST_FILES.items()}
    splits = detect_splits(builder, splits, found, LIST_FILES, HINT)
    captions_path = find_file(root, [CAPTIONS_FILE], HINT)
    captions = read_json(captions_path)
    if not isinstance(captions, dict):
        raise CorpusError(f"{captions_path}: expected a JSON object {{video_id: [caption, ...]}}.")
    owner: dict[str, str] = {}
    for split in splits:
        list_path = found[split]
        for video in read_id_list(list_path):
            if video in owner:
                raise CorpusError(
                    f"{list_path}: video {video!r} is also on the {owner[video]} list; splits must be disjoint."
                )
            owner[video] = split
            texts = captions.get(video)
            if not isinstance(texts, list):
                raise CorpusError(
                    f"{captions_path}: no caption list for video {video!r} of {list_path}; use the captions file "
                    "that belongs to these lists."
                )
            builder.add_item(video)
            for text in texts:
                builder.add_caption(video, text, split, captions_path)
    if set(splits) == set(SPLITS):
        unlisted = len(set(captions) - set(owner))
        if unlisted:
            builder.note(f"{captions_path}: {unlisted} video(s) are on no split list and were left out.")
    return builder.build()


def msvd_feature_key(raw_id: str) -> str:
    """``"YouTubeClips/-4wsuPCjDBc_5_15.avi"`` -> ``"-4wsuPCjDBc_5_15"``."""
    return media_stem(raw_id)


READER = DatasetReader(
    name="msvd",
    modality="video",
    read=read_msvd,
    feature_key=msvd_feature_key,
    files=f"{CAPTIONS_FILE}, {', '.join(LIST_FILES.values())}",
    id_format="<video_id> as on the split lists, e.g. -4wsuPCjDBc_5_15 (also YouTubeClips/-4wsuPCjDBc_5_15.avi)",
)
