"""Karpathy-split image lists: one image per line, the split given by the file.

Layouts: Up-Down's ``karpathy_{train,val,test}_images.txt`` (``val2014/COCO_val2014_000000253964.jpg
253964``: a path, then the COCO image id) and Multi30K's ``image_splits/<split>_images.txt``
(``1000092795.jpg``). Captions come from separate caption files (see the COCO and Flickr30K readers).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from grcm.data.corpus import CorpusError
from grcm.data.datasets.files import read_id_list


def read_image_list(path: Path, item_id: Callable[[list[str]], str]) -> list[str]:
    """Item ids of an image list in file order.

    Args:
        path: the list; blank lines are an error (they shift line-aligned caption files).
        item_id: a line split on whitespace (path first, then an optional id) -> the item id.
    """
    images = []
    seen: dict[str, int] = {}
    for number, line in enumerate(read_id_list(path), start=1):
        image = item_id(line.split())
        if image in seen:
            raise CorpusError(
                f"{path}: line {number} repeats image {image!r} of line {seen[image]}; list each image once."
            )
        seen[image] = number
        images.append(image)
    return images
