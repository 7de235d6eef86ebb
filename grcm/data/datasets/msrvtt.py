"""MSR-VTT text-to-video retrieval: the 9k-train / 1k-A-test protocol (JSFusion split).

Annotation files (CLIP4Clip / X-Pool layout) in ``annotation_dir``:

- ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,sentence``): the 1,000 1k-A test
  videos, one test query each.
- ``MSRVTT_train.9k.csv`` (``video_id``): the 9,000 training videos (``MSRVTT_train.7k.csv``
  for the 7k protocol), disjoint from the test videos.
- ``MSRVTT_data.json`` (official annotations, user supplied): the 20 captions of every
  video; without it the training videos have no captions.
- ``msrvtt_ret_train_addition.json`` (optional, from GRDR): the 20 captions of each test
  video, used only with ``transductive=True``.

Item ids are ``video<N>``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Literal

from grcm.data.corpus import SPLITS, CorpusError
from grcm.data.datasets.captions import CaptionSet, CaptionSetBuilder, DatasetReader, check_splits
from grcm.data.datasets.files import (
    annotation_root,
    find_file,
    find_optional_file,
    media_stem,
    read_csv_rows,
    read_json,
)

TEST_FILE = "MSRVTT_JSFUSION_test.csv"
TRAIN_FILES = {"9k": "MSRVTT_train.9k.csv", "7k": "MSRVTT_train.7k.csv"}
DATA_JSON = "MSRVTT_data.json"
TEST_VIDEO_CAPTIONS = "msrvtt_ret_train_addition.json"
OFFICIAL_VAL_VIDEOS = frozenset(f"video{n}" for n in range(6513, 7010))
HINT = "MSR-VTT split files come with CLIP4Clip's msrvtt_data.zip (also in the X-Pool repository)."


def _query_form(text: str) -> str:
    """Lower-case, punctuation -> space, single spaces: the form in which JSFusion sentences equal captions."""
    return " ".join(re.sub(r"[^a-z0-9]", " ", text.lower()).split())


def _captions_from_data_json(path: Path) -> dict[str, list[str]]:
    data = read_json(path)
    sentences = data.get("sentences") if isinstance(data, dict) else None
    if not isinstance(sentences, list):
        raise CorpusError(f"{path}: no 'sentences' list; expected the official MSRVTT_data.json.")
    captions: dict[str, list[str]] = defaultdict(list)
    for number, sentence in enumerate(sentences):
        try:
            captions[sentence["video_id"]].append(sentence["caption"])
        except (KeyError, TypeError) as error:
            raise CorpusError(f"{path}: sentence {number} lacks field {error}.") from error
    return captions


def _captions_from_addition_json(path: Path) -> dict[str, list[str]]:
    entries = read_json(path)
    if not isinstance(entries, list):
        raise CorpusError(f"{path}: expected a list of {{'video', 'caption'}} entries.")
    captions: dict[str, list[str]] = defaultdict(list)
    for number, entry in enumerate(entries):
        try:
            captions[media_stem(entry["video"])].append(entry["caption"])
        except (KeyError, TypeError) as error:
            raise CorpusError(f"{path}: entry {number} lacks field {error}.") from error
    return captions


def read_msrvtt(
    annotation_dir: str | Path,
    *,
    msrvtt_data_json: str | Path | None = None,
    train_list: Literal["9k", "7k"] = "9k",
    validation: Literal["test", "official", "none"] = "test",
    transductive: bool = False,
    splits: tuple[str, ...] = SPLITS,
) -> CaptionSet:
    """Read MSR-VTT captions with the 1k-A test split.

    Args:
        annotation_dir: folder with the files listed in the module docstring.
        msrvtt_data_json: the official ``MSRVTT_data.json`` (default: looked for in
            ``annotation_dir``); the only source of training captions.
        train_list: ``"9k"`` (standard) or ``"7k"`` training videos.
        validation: ``"test"`` validates on the 1k-A test queries (what CLIP4Clip and X-Pool do;
            1k-A has no validation split), ``"official"`` holds the official validation videos
            (video6513-video7009) out of training and validates on their captions, ``"none"``.
        transductive: also train on the other captions of the test videos (GRDR's setting; the
            captions equal to a test query after punctuation normalisation are dropped).
        splits: splits to read.

    Returns:
        Items = training videos then test videos; test = one JSFusion sentence per test video.
    """
    root = annotation_root(annotation_dir)
    splits = check_splits(splits)
    if validation not in ("test", "official", "none"):
        raise CorpusError(f"validation={validation!r}: use 'test', 'official' or 'none'.")
    if train_list not in TRAIN_FILES:
        raise CorpusError(f"train_list={train_list!r}: use one of {sorted(TRAIN_FILES)}.")
    builder = CaptionSetBuilder("msrvtt", "video", root)

    test_path = find_file(root, [TEST_FILE], HINT)
    test_rows = read_csv_rows(test_path, ("video_id", "sentence"))
    test_query = {row["video_id"]: row["sentence"] for row in test_rows}
    if len(test_query) != len(test_rows):
        raise CorpusError(f"{test_path}: a video occurs in more than one row; expected one query per video.")
    train_path = find_file(root, [TRAIN_FILES[train_list]], HINT)
    train_videos = [row["video_id"] for row in read_csv_rows(train_path, ("video_id",))]
    overlap = set(train_videos) & set(test_query)
    if overlap:
        raise CorpusError(
            f"{train_path} and {test_path} share {len(overlap)} video(s), e.g. {sorted(overlap)[:3]}; "
            "train and test videos must be disjoint."
        )

    data_json = Path(msrvtt_data_json) if msrvtt_data_json else find_optional_file(root, [DATA_JSON])
    if msrvtt_data_json and not data_json.is_file():
        raise CorpusError(f"{data_json}: MSRVTT_data.json not found; {HINT}")
    all_captions = _captions_from_data_json(data_json) if data_json else {}

    held_out = OFFICIAL_VAL_VIDEOS if validation == "official" else frozenset()
    wants_train_videos = "train" in splits or ("val" in splits and validation == "official")
    for video in train_videos if wants_train_videos else []:
        split = "val" if video in held_out else "train"
        if split not in splits:
            continue
        builder.add_item(video)
        for caption in all_captions.get(video, []):
            builder.add_caption(video, caption, split, data_json)
    if wants_train_videos and not data_json:
        builder.note(
            f"{DATA_JSON} not found in {root} (pass msrvtt_data_json=...): the {len(train_videos)} training "
            f"videos have no captions. The other MSR-VTT captions at hand ({TEST_VIDEO_CAPTIONS}) describe the "
            "test videos; transductive=True trains on them (GRDR's setting)."
        )
    elif wants_train_videos:
        uncaptioned = sum(1 for video in train_videos if video not in all_captions)
        if uncaptioned:
            builder.note(f"{data_json}: {uncaptioned} training video(s) have no captions.")

    if "test" in splits or ("val" in splits and validation == "test"):
        for video, sentence in test_query.items():
            builder.add_item(video)
            if "test" in splits:
                builder.add_caption(video, sentence, "test", test_path)
            if "val" in splits and validation == "test":
                builder.add_caption(video, sentence, "val", test_path)
        if "val" in splits and validation == "test":
            builder.note(
                "val = a copy of the 1k-A test queries (1k-A has no validation split); model selection "
                "on it is selection on test, as in CLIP4Clip/X-Pool. validation='official' avoids it."
            )

    if transductive and "train" in splits:
        source = data_json or find_file(
            root, [TEST_VIDEO_CAPTIONS], f"transductive=True needs {DATA_JSON} or {TEST_VIDEO_CAPTIONS}."
        )
        extra = all_captions if data_json else _captions_from_addition_json(source)
        dropped = added = 0
        for video, sentence in test_query.items():
            query = _query_form(sentence)
            for caption in extra.get(video, []):
                if _query_form(caption) == query:
                    dropped += 1
                    continue
                builder.add_caption(video, caption, "train", source)
                added += 1
        builder.note(
            f"transductive: {added} caption(s) of the test videos from {source} added to train; {dropped} equal to "
            "a test query were left out. Not the standard inductive protocol."
        )
    return builder.build()


def msrvtt_feature_key(raw_id: str) -> str:
    """``"all/video7.mp4"`` -> ``"video7"``."""
    return media_stem(raw_id)


READER = DatasetReader(
    name="msrvtt",
    modality="video",
    read=read_msrvtt,
    feature_key=msrvtt_feature_key,
    files=f"{TEST_FILE}, {TRAIN_FILES['9k']}, optional {DATA_JSON} (training captions)",
)
