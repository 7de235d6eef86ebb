"""Flickr30K text-to-image retrieval: the Karpathy split, 29,000 / 1,014 / 1,000 images x 5 captions.

Two sources, either in ``annotation_dir``:

- Multi30K task 2 (``multi30k_task2/`` or ``data/task2/`` of the multi30k/dataset repository, or the
  folder itself): ``image_splits/{train,val,test_2016}_images.txt`` (one file name per line) and
  ``raw/<split>.<k>.en.gz`` (k = 1..5, line i = caption k of image i). Its train/val/test are the
  Karpathy splits. Captions keep the HTML entities of the Flickr30K release; they are decoded.
- The Karpathy split file ``dataset_flickr30k.json`` (``karpathy_json=``, or found in the folder
  when there is no Multi30K layout).

Item ids are image file names (``1000092795.jpg``).
"""

from __future__ import annotations

from pathlib import Path

from grcm.data.corpus import SPLITS, CorpusError
from grcm.data.datasets.captions import CaptionSet, CaptionSetBuilder, DatasetReader, check_splits
from grcm.data.datasets.files import (
    annotation_root,
    find_file,
    find_optional_file,
    media_stem,
    read_id_list,
    read_lines,
)
from grcm.data.datasets.karpathy import add_karpathy_captions

MULTI30K_DIRS = ("multi30k_task2", "data/task2", ".")
MULTI30K_PREFIX = {"train": "train", "val": "val", "test": "test_2016"}
CAPTIONS_PER_IMAGE = 5
KARPATHY_JSON = "dataset_flickr30k.json"
HINT = (
    "clone multi30k/dataset and pass its data/task2 folder, or pass karpathy_json=<dataset_flickr30k.json> "
    "(Karpathy's split file)."
)


def _multi30k_root(root: Path) -> Path | None:
    marker = f"image_splits/{MULTI30K_PREFIX['test']}_images.txt"
    return next((root / d for d in MULTI30K_DIRS if (root / d / marker).is_file()), None)


def _add_multi30k(task2: Path, builder: CaptionSetBuilder, splits: tuple[str, ...]) -> None:
    for split in splits:
        prefix = MULTI30K_PREFIX[split]
        images_path = find_file(task2, [f"image_splits/{prefix}_images.txt"], HINT)
        images = read_id_list(images_path)
        columns = []
        for k in range(1, CAPTIONS_PER_IMAGE + 1):
            caption_path = find_file(task2, [f"raw/{prefix}.{k}.en.gz", f"raw/{prefix}.{k}.en"], HINT)
            lines = read_lines(caption_path)
            if len(lines) != len(images):
                raise CorpusError(
                    f"{caption_path}: {len(lines)} lines but {images_path} lists {len(images)} images; line i must "
                    "be a caption of image i (use the files of one Multi30K release)."
                )
            columns.append((caption_path, lines))
        for i, image in enumerate(images):
            builder.add_item(image)
            for caption_path, lines in columns:
                builder.add_caption(image, lines[i], split, caption_path)


def read_flickr30k(
    annotation_dir: str | Path,
    *,
    karpathy_json: str | Path | None = None,
    splits: tuple[str, ...] = SPLITS,
) -> CaptionSet:
    """Read Flickr30K captions (Karpathy split, 5 per image, HTML entities decoded).

    Args:
        annotation_dir: folder with the Multi30K task-2 files (or a Karpathy split file).
        karpathy_json: read ``dataset_flickr30k.json`` instead of Multi30K.
        splits: splits to read.
    """
    root = annotation_root(annotation_dir)
    splits = check_splits(splits)
    builder = CaptionSetBuilder("flickr30k", "image", root, unescape_html=True)
    task2 = None if karpathy_json else _multi30k_root(root)
    if task2 is not None:
        _add_multi30k(task2, builder, splits)
    else:
        path = Path(karpathy_json) if karpathy_json else find_optional_file(root, [KARPATHY_JSON])
        if path is None or not path.is_file():
            raise CorpusError(f"{path or root}: no Flickr30K annotations found; {HINT}")
        add_karpathy_captions(path, builder, lambda image: image["filename"], splits, CAPTIONS_PER_IMAGE)
    return builder.build()


def flickr30k_feature_key(raw_id: str) -> str:
    """``"flickr30k-images/1000092795.jpg"`` -> ``"1000092795"``."""
    return media_stem(raw_id)


READER = DatasetReader(
    name="flickr30k",
    modality="image",
    read=read_flickr30k,
    feature_key=flickr30k_feature_key,
    files="Multi30K task2 image_splits/*.txt + raw/*.en.gz, or dataset_flickr30k.json",
)
