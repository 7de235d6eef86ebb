"""Karpathy split files (``dataset_coco.json``, ``dataset_flickr30k.json``) from the NeuralTalk release.

Layout: ``{"images": [{"filename", "split", "sentences": [{"raw", ...}], "cocoid"?, ...}], "dataset"}``
with splits ``train``, ``restval`` (COCO; trained on, like every retrieval paper), ``val``, ``test``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from grcm.data.corpus import CorpusError
from grcm.data.datasets.captions import CaptionSetBuilder
from grcm.data.datasets.files import read_json

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def add_karpathy_captions(
    path: Path,
    builder: CaptionSetBuilder,
    item_id: Callable[[dict], str],
    splits: Sequence[str],
    captions_per_image: int | None = 5,
) -> None:
    """Add the captions of a Karpathy split file to ``builder``, keeping its image order.

    Args:
        path: the ``dataset_*.json`` file.
        builder: receives items and captions.
        item_id: image record -> item id (e.g. its ``filename`` or ``cocoid``).
        splits: grcm splits to keep (``restval`` counts as ``train``).
        captions_per_image: keep the first this many sentences of each image (None = all);
            the retrieval protocols use 5 (a few COCO images have 6 or 7).
    """
    data = read_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise CorpusError(f"{path}: no 'images' list; expected a Karpathy split file (dataset_*.json).")
    trimmed = 0
    for number, image in enumerate(images):
        try:
            split = KARPATHY_SPLITS[image["split"]]
            sentences = [sentence["raw"] for sentence in image["sentences"]]
            identifier = item_id(image)
        except (KeyError, TypeError) as error:
            raise CorpusError(
                f"{path}: image record {number} lacks field {error}; expected split, sentences[].raw and ids."
            ) from error
        if split not in splits:
            continue
        if captions_per_image is not None and len(sentences) > captions_per_image:
            trimmed += 1
            sentences = sentences[:captions_per_image]
        builder.add_item(identifier)
        for sentence in sentences:
            builder.add_caption(identifier, sentence, split, path)
    if trimmed:
        builder.note(
            f"{path}: kept the first {captions_per_image} captions of {trimmed} image(s) that have more."
        )
