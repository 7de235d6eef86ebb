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

Or the JSON layout of several video-retrieval codebases, detected by content (any file name):
lists of ``{"video": "video7960.mp4", "caption": ...}`` records, as a JSON array or JSON Lines
(:mod:`grcm.data.datasets.caption_records`). A record file whose name contains ``test`` gives
the test videos and queries (when there is no JSFusion CSV); one whose name contains ``train``
gives the training videos and captions (``9k``/``7k`` in the name picks one for ``train_list``).
A "train" file that holds only test videos (GRDR's addition file) is the transductive source.

Item ids are ``video<N>``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Literal

from grcm.data.corpus import SPLITS, CorpusError
from grcm.data.datasets.caption_records import record_files
from grcm.data.datasets.captions import (
    ABSENT_SPLIT,
    CaptionSet,
    CaptionSetBuilder,
    DatasetReader,
    check_splits,
)
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
HINT = (
    "MSR-VTT split files come with CLIP4Clip's msrvtt_data.zip (also in the X-Pool repository); JSON lists of "
    '{"video", "caption"} records named *train*.json / *test*.json(l) work too.'
)


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


def _by_video(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Record pairs grouped by canonical video id (``video7960.mp4`` -> ``video7960``), file order kept."""
    captions: dict[str, list[str]] = defaultdict(list)
    for video, caption in pairs:
        captions[media_stem(video)].append(caption)
    return captions


def _split_word(path: Path) -> str | None:
    name = path.name.lower()
    return next((split for split in ("test", "train", "val") if split in name), None)


def _pick(paths: list[Path], train_list: str, role: str) -> Path:
    if len(paths) == 1:
        return paths[0]
    preferred = [path for path in paths if train_list in path.name.lower()]
    if len(preferred) == 1:
        return preferred[0]
    raise CorpusError(
        f"{paths[0].parent}: several {role} record files ({[p.name for p in paths]}); keep one, or name the "
        f"{train_list} one with '{train_list}' in its file name."
    )


def _test_queries(root: Path, records: dict, builder: CaptionSetBuilder) -> tuple[Path, dict[str, list[str]]]:
    """The test source and its queries per video: the JSFusion CSV, else a *test* record file."""
    test_csv = find_optional_file(root, [TEST_FILE])
    test_records = [path for path in records if _split_word(path) == "test"]
    if test_csv is not None:
        rows = read_csv_rows(test_csv, ("video_id", "sentence"))
        queries = {row["video_id"]: [row["sentence"]] for row in rows}
        if len(queries) != len(rows):
            raise CorpusError(f"{test_csv}: a video occurs in more than one row; expected one query per video.")
        if test_records:
            builder.note(f"test queries from {TEST_FILE}; {[p.name for p in test_records]} not used for test.")
        return test_csv, queries
    if not test_records:
        unnamed = [path.name for path in records if _split_word(path) is None]
        rename = f" ({unnamed} hold {{video, caption}} records: put 'test' in the test file's name)" if unnamed else ""
        raise CorpusError(
            f"annotation file not found (tried {root / TEST_FILE} and JSON record files named *test*){rename}; {HINT}"
        )
    path = _pick(test_records, "1k", "test")
    return path, _by_video(records[path])


def read_msrvtt(
    annotation_dir: str | Path,
    *,
    msrvtt_data_json: str | Path | None = None,
    train_list: Literal["9k", "7k"] = "9k",
    validation: Literal["test", "official", "none"] = "test",
    transductive: bool = False,
    splits: tuple[str, ...] | None = None,
) -> CaptionSet:
    """Read MSR-VTT captions with the 1k-A test split.

    Args:
        annotation_dir: folder with the files listed in the module docstring.
        msrvtt_data_json: the official ``MSRVTT_data.json`` (default: looked for in
            ``annotation_dir``); with the CSVs, the only source of training captions.
        train_list: ``"9k"`` (standard) or ``"7k"`` training videos.
        validation: ``"test"`` validates on the 1k-A test queries (what CLIP4Clip and X-Pool do;
            1k-A has no validation split), ``"official"`` holds the official validation videos
            (video6513-video7009) out of training and validates on their captions, ``"none"``.
        transductive: also train on the other captions of the test videos (GRDR's setting; the
            captions equal to a test query after punctuation normalisation are dropped).
        splits: splits to read; None reads train when a training list exists (a note otherwise).

    Returns:
        Items = training videos then test videos; test = the test queries of each test video.
    """
    root = annotation_root(annotation_dir)
    if validation not in ("test", "official", "none"):
        raise CorpusError(f"validation={validation!r}: use 'test', 'official' or 'none'.")
    if train_list not in TRAIN_FILES:
        raise CorpusError(f"train_list={train_list!r}: use one of {sorted(TRAIN_FILES)}.")
    builder = CaptionSetBuilder("msrvtt", "video", root)
    records = record_files(root, exclude=(DATA_JSON,))
    test_path, test_queries = _test_queries(root, records, builder)

    # training records: *train* files that hold training videos (a file of test videos only is a transductive source)
    test_videos = set(test_queries)
    train_named = [path for path in records if _split_word(path) == "train"]
    addition = [path for path in train_named if {media_stem(v) for v, _ in records[path]} <= test_videos]
    train_records = [path for path in train_named if path not in addition]
    for path in records:
        if _split_word(path) not in ("train", "test"):
            builder.note(f"{path.name}: a {{video, caption}} record file whose name says neither train nor test; "
                         "not read.")
    train_csv = find_optional_file(root, [TRAIN_FILES[train_list]])
    train_json = _pick(train_records, train_list, "train") if train_records else None
    has_train = train_csv is not None or train_json is not None
    if splits is None:
        splits = tuple(s for s in SPLITS if s != "train" or has_train)
        if not has_train:
            builder.note(f"no {TRAIN_FILES[train_list]} or *train* record file in {root}: {ABSENT_SPLIT['train']}.")
    splits = check_splits(splits)
    if validation == "none":
        splits = tuple(s for s in splits if s != "val")
    builder.splits = splits
    wants_train_videos = "train" in splits or ("val" in splits and validation == "official")
    if wants_train_videos and not has_train:
        find_file(root, [TRAIN_FILES[train_list]], HINT)  # the error naming the missing list

    train_path = train_csv or train_json
    if train_csv is not None:
        train_videos = [row["video_id"] for row in read_csv_rows(train_csv, ("video_id",))]
    elif train_json is not None:
        train_videos = list(_by_video(records[train_json]))
    else:
        train_videos = []
    overlap = set(train_videos) & test_videos
    if overlap:
        raise CorpusError(
            f"{train_path} and {test_path} share {len(overlap)} video(s), e.g. {sorted(overlap)[:3]}; "
            "train and test videos must be disjoint."
        )

    data_json = Path(msrvtt_data_json) if msrvtt_data_json else find_optional_file(root, [DATA_JSON])
    if msrvtt_data_json and not data_json.is_file():
        raise CorpusError(f"{data_json}: MSRVTT_data.json not found; {HINT}")
    caption_source = data_json or train_json
    all_captions = (
        _captions_from_data_json(data_json) if data_json else _by_video(records[train_json]) if train_json else {}
    )

    held_out = OFFICIAL_VAL_VIDEOS if validation == "official" else frozenset()
    for video in train_videos if wants_train_videos else []:
        split = "val" if video in held_out else "train"
        if split not in splits:
            continue
        builder.add_item(video)
        for caption in all_captions.get(video, []):
            builder.add_caption(video, caption, split, caption_source)
    if wants_train_videos and not caption_source:
        others = f" ({addition[0].name})" if addition else ""
        builder.note(
            f"{DATA_JSON} not found in {root} (pass msrvtt_data_json=...): the {len(train_videos)} training "
            f"videos have no captions. The other MSR-VTT captions at hand{others} describe the "
            "test videos; transductive=True trains on them (GRDR's setting)."
        )
    elif wants_train_videos:
        uncaptioned = sum(1 for video in train_videos if video not in all_captions)
        if uncaptioned:
            builder.note(f"{caption_source}: {uncaptioned} training video(s) have no captions.")

    if "test" in splits or ("val" in splits and validation == "test"):
        for video, queries in test_queries.items():
            builder.add_item(video)
            for query in queries:
                if "test" in splits:
                    builder.add_caption(video, query, "test", test_path)
                if "val" in splits and validation == "test":
                    builder.add_caption(video, query, "val", test_path)
        if "val" in splits and validation == "test":
            builder.note(
                "val = a copy of the 1k-A test queries (1k-A has no validation split); model selection "
                "on it is selection on test, as in CLIP4Clip/X-Pool. validation='official' avoids it."
            )

    if transductive and "train" in splits:
        named = [path for path in addition if path.name == TEST_VIDEO_CAPTIONS] or addition
        if data_json:
            source, extra = data_json, all_captions
        elif named:
            source, extra = named[0], _by_video(records[named[0]])
        else:
            raise CorpusError(
                f"annotation file not found (tried {root / DATA_JSON}, {root / TEST_VIDEO_CAPTIONS}); "
                f"transductive=True needs {DATA_JSON} or {TEST_VIDEO_CAPTIONS}."
            )
        dropped = added = 0
        for video, queries in test_queries.items():
            forms = {_query_form(query) for query in queries}
            for caption in extra.get(video, []):
                if _query_form(caption) in forms:
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
    files=f"{TEST_FILE}, {TRAIN_FILES['9k']}, optional {DATA_JSON} (training captions); or *train*/*test* JSON "
    "lists of {video, caption} records",
    id_format="video<N>, e.g. video7960 (also video7960.mp4 or videos/all/video7960.mp4)",
)
