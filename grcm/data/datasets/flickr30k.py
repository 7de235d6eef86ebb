"""Flickr30K text-to-image retrieval: the Karpathy split, 29,000 / 1,014 / 1,000 images x 5 captions.

Two sources, either in ``annotation_dir``:

- Karpathy image lists as Multi30K task 2 ships them (``multi30k_task2/`` or ``data/task2/`` of the
  multi30k/dataset repository, or the folder itself): ``image_splits/{train,val,test_2016}_images.txt``
  (one file name per line; every split with a list is read). Captions from, in this order:
  ``raw/<split>.<k>.en.gz`` (k = 1..5, line i = caption k of image i), the Flickr30K release's
  ``results_20130124.token`` (``<file>#<k>\t<caption>``), or ``dataset_flickr30k.json``. Its
  train/val/test are the Karpathy splits. Captions keep the HTML entities of the Flickr30K
  release; they are decoded.
- The Karpathy split file ``dataset_flickr30k.json`` (``karpathy_json=``, or found in the folder
  when there is no image list).

Item ids are image file names (``1000092795.jpg``).
"""

from __future__ import annotations

from pathlib import Path

from grcm.data.corpus import SPLITS, CorpusError
from grcm.data.datasets.captions import (
    CaptionSet,
    CaptionSetBuilder,
    DatasetReader,
    check_splits,
    detect_splits,
)
from grcm.data.datasets.files import (
    annotation_root,
    find_optional_file,
    media_stem,
    read_json,
    read_lines,
)
from grcm.data.datasets.image_lists import read_image_list
from grcm.data.datasets.karpathy import add_karpathy_captions

MULTI30K_DIRS = ("multi30k_task2", "data/task2", ".")
MULTI30K_PREFIX = {"train": "train", "val": "val", "test": "test_2016"}
CAPTIONS_PER_IMAGE = 5
KARPATHY_JSON = "dataset_flickr30k.json"
TOKEN_FILES = ("results_20130124.token", "results.token")
HINT = (
    "clone multi30k/dataset and pass its data/task2 folder, or pass karpathy_json=<dataset_flickr30k.json> "
    "(Karpathy's split file)."
)


def _list_name(prefix: str) -> str:
    return f"image_splits/{prefix}_images.txt"


def _multi30k_root(root: Path) -> Path | None:
    """The folder holding ``image_splits/`` (any split's list), or None."""
    lists = [_list_name(prefix) for prefix in MULTI30K_PREFIX.values()]
    return next((root / d for d in MULTI30K_DIRS if any((root / d / name).is_file() for name in lists)), None)


def _captions_by_file(task2: Path, root: Path) -> tuple[Path | None, dict[str, list[str]]]:
    """Captions per image file name from the Flickr30K token file or the Karpathy json (first found)."""
    folders = [task2, root] if task2 != root else [root]
    token = next((f / n for f in folders for n in TOKEN_FILES if (f / n).is_file()), None)
    if token is not None:
        captions: dict[str, list[str]] = {}
        for number, line in enumerate(read_lines(token), start=1):
            if not line.strip():
                continue
            key, tab, text = line.partition("\t")
            if not tab or "#" not in key:
                raise CorpusError(f"{token}: line {number} is not '<file>#<k><TAB><caption>'; use the Flickr30K "
                                  "release's results_20130124.token.")
            captions.setdefault(key.rsplit("#", 1)[0], []).append(text)
        return token, captions
    karpathy = next((f / KARPATHY_JSON for f in folders if (f / KARPATHY_JSON).is_file()), None)
    if karpathy is not None:
        data = read_json(karpathy)
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise CorpusError(f"{karpathy}: no 'images' list; expected a Karpathy split file (dataset_*.json).")
        return karpathy, {
            image["filename"]: [sentence["raw"] for sentence in image.get("sentences", [])]
            for image in images if isinstance(image, dict) and "filename" in image
        }
    return None, {}


def _raw_columns(
    task2: Path, prefix: str, images: list[str], images_path: Path
) -> list[tuple[Path, list[str]]] | None:
    """Multi30K's ``raw/<prefix>.<k>.en(.gz)`` caption columns, line-aligned with the list; None if absent."""
    paths = [find_optional_file(task2, [f"raw/{prefix}.{k}.en.gz", f"raw/{prefix}.{k}.en"])
             for k in range(1, CAPTIONS_PER_IMAGE + 1)]
    if not any(paths):
        return None
    columns = []
    for k, caption_path in enumerate(paths, start=1):
        if caption_path is None:
            raise CorpusError(
                f"{task2 / 'raw'}: {prefix}.{k}.en.gz not found beside the other caption files; {HINT}"
            )
        lines = read_lines(caption_path)
        if len(lines) != len(images):
            raise CorpusError(
                f"{caption_path}: {len(lines)} lines but {images_path} lists {len(images)} images; line i must "
                "be a caption of image i (use the files of one Multi30K release)."
            )
        columns.append((caption_path, lines))
    return columns


def _add_image_lists(
    task2: Path, root: Path, builder: CaptionSetBuilder, splits: tuple[str, ...] | None
) -> None:
    """Every split with an image list (or those asked for), captions from the first caption source found."""
    lists = {split: find_optional_file(task2, [_list_name(prefix)]) for split, prefix in MULTI30K_PREFIX.items()}
    names = {split: _list_name(prefix) for split, prefix in MULTI30K_PREFIX.items()}
    by_file: tuple[Path | None, dict[str, list[str]]] | None = None
    for split in detect_splits(builder, splits, lists, names, HINT):
        images_path = lists[split]
        images = read_image_list(images_path, lambda columns: columns[0])
        columns = _raw_columns(task2, MULTI30K_PREFIX[split], images, images_path)
        if columns is not None:
            for i, image in enumerate(images):
                builder.add_item(image)
                for caption_path, lines in columns:
                    builder.add_caption(image, lines[i], split, caption_path)
            continue
        by_file = by_file or _captions_by_file(task2, root)
        source, captions = by_file
        for image in images:
            builder.add_item(image)
            for text in captions.get(image, [])[:CAPTIONS_PER_IMAGE]:
                builder.add_caption(image, text, split, source)
        if source is None:
            builder.note(f"{images_path}: no caption file for its {len(images)} images; add Multi30K's "
                         f"raw/{MULTI30K_PREFIX[split]}.<k>.en.gz, {TOKEN_FILES[0]} or {KARPATHY_JSON}.")


def read_flickr30k(
    annotation_dir: str | Path,
    *,
    karpathy_json: str | Path | None = None,
    splits: tuple[str, ...] | None = None,
) -> CaptionSet:
    """Read Flickr30K captions (Karpathy split, 5 per image, HTML entities decoded).

    Args:
        annotation_dir: folder with the Multi30K task-2 files (or a Karpathy split file).
        karpathy_json: read ``dataset_flickr30k.json`` instead of the image lists.
        splits: splits to read; None reads every split with an image list (a note for the others).
    """
    root = annotation_root(annotation_dir)
    builder = CaptionSetBuilder("flickr30k", "image", root, unescape_html=True)
    task2 = None if karpathy_json else _multi30k_root(root)
    if task2 is not None:
        _add_image_lists(task2, root, builder, splits)
    else:
        builder.splits = splits = SPLITS if splits is None else check_splits(splits)
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
    files="Multi30K task2 image_splits/*.txt + raw/*.en.gz (or results_20130124.token), or dataset_flickr30k.json",
    id_format="the image file name, e.g. 1000092795.jpg (also flickr30k-images/1000092795.jpg or 1000092795)",
)
