"""MS-COCO text-to-image retrieval: the Karpathy split (5k test images x 5 captions).

Sources in ``annotation_dir``:

- ``dataset_coco.json`` (Karpathy's split file, user supplied; ``karpathy_json=``): every split,
  ``restval`` joins ``train`` (113,287 / 5,000 / 5,000 images), first 5 captions per image.
- Karpathy image lists (Up-Down's ``karpathy_{train,val,test}_images.txt``, in the folder or its
  ``coco_splits/``; lines ``val2014/COCO_val2014_000000253964.jpg 253964``): every split with a
  list, captions from COCO's ``captions_{train,val}2014.json`` (in the folder or ``annotations/``;
  first 5 per image, file order). Without a caption file, test captions come from the public files below.
- Public files for the 5k test split: ``coco_precomp/testall_caps.txt`` (SCAN,
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
from grcm.data.datasets.captions import (
    ABSENT_SPLIT,
    CaptionSet,
    CaptionSetBuilder,
    DatasetReader,
    check_splits,
    detect_splits,
)
from grcm.data.datasets.files import (
    annotation_root,
    find_file,
    find_optional_file,
    media_stem,
    read_json,
    read_lines,
)
from grcm.data.datasets.image_lists import read_image_list
from grcm.data.datasets.karpathy import add_karpathy_captions

KARPATHY_JSON = "dataset_coco.json"
TEST_CAPTIONS = ("coco_precomp/testall_caps.txt", "testall_caps.txt")
TEST_CAPTION_IDS = "coco_test_ids.npy"
CAPTION_TO_IMAGE = "original_caption_to_image.json"
IMAGE_LISTS = {split: f"karpathy_{split}_images.txt" for split in SPLITS}
CAPTION_FILES = [f"{folder}captions_{part}2014.json" for part in ("train", "val") for folder in ("", "annotations/")]
HINT = (
    "pass karpathy_json=<dataset_coco.json> (Karpathy's split file), or provide SCAN's testall_caps.txt with "
    "ECCV-Caption's coco_test_ids.npy and original_caption_to_image.json (naver-ai/eccv-caption) for the test split."
)


def _add_test_from_public_files(root: Path, builder: CaptionSetBuilder) -> None:
    """The 5k test captions of SCAN's ``testall_caps.txt``, joined to images through ECCV-Caption's ids."""
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


def _list_item_id(columns: list[str]) -> str:
    """``["val2014/COCO_val2014_000000253964.jpg", "253964"]`` (or the path alone) -> ``"253964"``."""
    return columns[1] if len(columns) > 1 and columns[1].isdigit() else coco_feature_key(columns[0])


def _caption_json_captions(paths: list[Path]) -> dict[str, list[str]]:
    """COCO ``captions_*2014.json`` files: image id -> captions in file order."""
    captions: dict[str, list[str]] = {}
    for path in paths:
        data = read_json(path)
        annotations = data.get("annotations") if isinstance(data, dict) else None
        if not isinstance(annotations, list):
            raise CorpusError(f"{path}: no 'annotations' list; expected COCO's captions_<split>2014.json.")
        for number, annotation in enumerate(annotations):
            try:
                captions.setdefault(str(int(annotation["image_id"])), []).append(annotation["caption"])
            except (KeyError, TypeError, ValueError) as error:
                raise CorpusError(
                    f"{path}: annotation {number} lacks image_id/caption ({error}); use COCO's caption files."
                ) from error
    return captions


def _add_image_lists(
    root: Path, builder: CaptionSetBuilder, lists: dict[str, Path | None], splits, captions_per_image: int
) -> None:
    """Every split with a Karpathy image list; captions from COCO's caption files, else (test) the public files."""
    caption_paths = [path for name in CAPTION_FILES if (path := root / name).is_file()]
    captions = _caption_json_captions(caption_paths)
    source = ", ".join(str(path) for path in caption_paths)
    for split in splits:
        images = read_image_list(lists[split], _list_item_id)
        if split == "test" and not captions and find_optional_file(root, TEST_CAPTIONS) is not None:
            _add_test_from_public_files(root, builder)
            builder.note("test captions are SCAN-tokenised (spaces before punctuation).")
            missing = set(images) - builder.captioned_items()
            if missing:
                builder.note(f"{lists[split]}: {len(missing)} image(s) have no SCAN test caption, e.g. "
                             f"{sorted(missing)[:3]}.")
            for image in images:
                builder.add_item(image)
            continue
        uncaptioned = 0
        for image in images:
            builder.add_item(image)
            texts = captions.get(image, [])[:captions_per_image]
            uncaptioned += not texts
            for text in texts:
                builder.add_caption(image, text, split, source)
        if not caption_paths:
            builder.note(
                f"{lists[split]}: no caption file for its {len(images)} images; add COCO's "
                f"captions_{{train,val}}2014.json (annotations_trainval2014.zip) to {root} or {root / 'annotations'}"
                + (f", or {TEST_CAPTIONS[0]} + {TEST_CAPTION_IDS} + {CAPTION_TO_IMAGE} for test" if split == "test"
                   else "")
                + "."
            )
        elif uncaptioned:
            builder.note(f"{lists[split]}: {uncaptioned} of {len(images)} image(s) have no caption in {source}.")


def read_coco(
    annotation_dir: str | Path,
    *,
    karpathy_json: str | Path | None = None,
    captions_per_image: int = 5,
    splits: tuple[str, ...] | None = None,
) -> CaptionSet:
    """Read COCO captions on the Karpathy split.

    Args:
        annotation_dir: folder with ``dataset_coco.json``, Karpathy image lists and/or the public test files.
        karpathy_json: Karpathy's ``dataset_coco.json`` (default: looked for in ``annotation_dir``).
        captions_per_image: captions kept per image.
        splits: splits to read; None reads every split the files define (a note for the others).
    """
    root = annotation_root(annotation_dir)
    builder = CaptionSetBuilder("coco", "image", root)
    path = Path(karpathy_json) if karpathy_json else find_optional_file(root, [KARPATHY_JSON])
    if karpathy_json and not path.is_file():
        raise CorpusError(f"{path}: Karpathy split file not found; {HINT}")
    if path is not None:
        builder.splits = splits = SPLITS if splits is None else check_splits(splits)
        add_karpathy_captions(
            path, builder, lambda image: str(int(image["cocoid"])), splits, captions_per_image
        )
        return builder.build()
    lists = {split: find_optional_file(root, [name, f"coco_splits/{name}"]) for split, name in IMAGE_LISTS.items()}
    if any(lists.values()):
        expected = {split: f"{name} (or {KARPATHY_JSON})" for split, name in IMAGE_LISTS.items()}
        splits = detect_splits(builder, splits, lists, expected, HINT)
        _add_image_lists(root, builder, lists, splits, captions_per_image)
        return builder.build()
    if splits is None:
        builder.splits = splits = ("test",)
        builder.note(f"{KARPATHY_JSON} or Karpathy image lists not found in {root} (pass karpathy_json=...): "
                     f"the corpus holds the Karpathy 5k test split only; {ABSENT_SPLIT['train']}.")
    builder.splits = splits = check_splits(splits)
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
    files=f"{KARPATHY_JSON}, or karpathy_<split>_images.txt + captions_<split>2014.json, or {TEST_CAPTIONS[0]} + "
    f"{TEST_CAPTION_IDS} + {CAPTION_TO_IMAGE} (test only)",
    id_format="the COCO image id, e.g. 391895 (also val2014/COCO_val2014_000000391895.jpg or 000000391895.jpg)",
)
