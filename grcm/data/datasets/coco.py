"""MS-COCO text-to-image retrieval: the Karpathy split (5k test images x 5 captions).

Sources in ``annotation_dir``:

- ``dataset_coco.json`` (Karpathy's split file, user supplied; ``karpathy_json=``): every split,
  ``restval`` joins ``train`` (113,287 / 5,000 / 5,000 images), first 5 captions per image.
- Without it, the 5k test split only, from public files: ``coco_precomp/testall_caps.txt`` (SCAN,
  25,000 captions in Karpathy order, tokenised with spaces before punctuation),
  ``coco_test_ids.npy`` (ECCV-Caption: the COCO caption id of each line) and
  ``original_caption_to_image.json`` (ECCV-Caption: caption id -> [image id]).

Item ids are COCO image ids (``"391895"``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from grcm.data.corpus import SPLITS, CorpusError
from grcm.data.datasets.captions import CaptionSet, CaptionSetBuilder, DatasetReader, check_splits
from grcm.data.datasets.files import (
    annotation_root,
    find_file,
    find_optional_file,
    media_stem,
    read_json,
    read_lines,
)
from grcm.data.datasets.karpathy import add_karpathy_captions

KARPATHY_JSON = "dataset_coco.json"
TEST_CAPTIONS = ("coco_precomp/testall_caps.txt", "testall_caps.txt")
TEST_CAPTION_IDS = "coco_test_ids.npy"
CAPTION_TO_IMAGE = "original_caption_to_image.json"
HINT = (
    "pass karpathy_json=<dataset_coco.json> (Karpathy's split file), or provide SCAN's testall_caps.txt with "
    "ECCV-Caption's coco_test_ids.npy and original_caption_to_image.json (naver-ai/eccv-caption) for the test split."
)


def _add_test_from_public_files(root: Path, builder: CaptionSetBuilder) -> None:
    captions_path = find_file(root, TEST_CAPTIONS, HINT)
    ids_path = find_file(root, [TEST_CAPTION_IDS], HINT)
    mapping_path = find_file(root, [CAPTION_TO_IMAGE], HINT)
    lines = read_lines(captions_path)
    caption_ids = np.load(ids_path, allow_pickle=False)
    if caption_ids.ndim != 1 or len(caption_ids) != len(lines):
        raise CorpusError(
            f"{ids_path}: {caption_ids.shape} caption ids for {len(lines)} lines of {captions_path}; "
            "line i must be caption id i (both in Karpathy test order)."
        )
    caption_to_image = read_json(mapping_path)
    for line, caption_id in zip(lines, caption_ids.tolist()):
        images = caption_to_image.get(str(caption_id))
        if not images or len(images) != 1:
            raise CorpusError(
                f"{mapping_path}: caption id {caption_id} maps to {images!r}; expected one image id."
            )
        builder.add_caption(str(images[0]), line, "test", captions_path)


def read_coco(
    annotation_dir: str | Path,
    *,
    karpathy_json: str | Path | None = None,
    captions_per_image: int = 5,
    splits: tuple[str, ...] = SPLITS,
) -> CaptionSet:
    """Read COCO captions on the Karpathy split.

    Args:
        annotation_dir: folder with ``dataset_coco.json`` and/or the public test files.
        karpathy_json: Karpathy's ``dataset_coco.json`` (default: looked for in ``annotation_dir``).
        captions_per_image: captions kept per image from the Karpathy file.
        splits: splits to read; train and val need the Karpathy file.
    """
    root = annotation_root(annotation_dir)
    splits = check_splits(splits)
    builder = CaptionSetBuilder("coco", "image", root)
    path = Path(karpathy_json) if karpathy_json else find_optional_file(root, [KARPATHY_JSON])
    if karpathy_json and not path.is_file():
        raise CorpusError(f"{path}: Karpathy split file not found; {HINT}")
    if path is not None:
        add_karpathy_captions(
            path, builder, lambda image: str(int(image["cocoid"])), splits, captions_per_image
        )
        return builder.build()
    if "test" in splits:
        _add_test_from_public_files(root, builder)
        builder.note("test captions are SCAN-tokenised (spaces before punctuation).")
    wanted = [split for split in splits if split != "test"]
    if wanted:
        builder.note(
            f"{KARPATHY_JSON} not found in {root} (pass karpathy_json=...): no {'/'.join(wanted)} captions; "
            "the corpus holds the Karpathy 5k test split only."
        )
    return builder.build()


_COCO_FILE = re.compile(r"^COCO_[a-z]+\d{4}_0*(\d+)$")


def coco_feature_key(raw_id: str) -> str:
    """``"val2014/COCO_val2014_000000391895.jpg"``, ``"000000391895.jpg"``, ``"391895"`` -> ``"391895"``."""
    stem = media_stem(raw_id)
    match = _COCO_FILE.match(stem)
    if match:
        return str(int(match.group(1)))
    return str(int(stem)) if stem.isdigit() else stem


READER = DatasetReader(
    name="coco",
    modality="image",
    read=read_coco,
    feature_key=coco_feature_key,
    files=f"{KARPATHY_JSON}, or {TEST_CAPTIONS[0]} + {TEST_CAPTION_IDS} + {CAPTION_TO_IMAGE} (test only)",
)
