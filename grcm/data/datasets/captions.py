"""The captions of one benchmark before features are attached, and the reader registry entry type.

A reader turns a benchmark's official annotation files into a :class:`CaptionSet`:
item ids, the captions that describe them and the split of every caption.
:func:`grcm.data.datasets.build.build_corpus` then joins it with precomputed
item features into a :class:`~grcm.data.corpus.Corpus`.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grcm.data.corpus import SPLITS, CorpusError


def clean_caption(text: str, unescape_html: bool = False) -> str:
    """Caption text as served: HTML entities decoded (optional), whitespace runs (incl. CR) collapsed."""
    if unescape_html:
        text = html.unescape(text)
    return " ".join(text.split())


def check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    """Validate a reader's ``splits`` argument; returns it as a tuple."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or not splits:
        raise CorpusError(f"splits={list(splits)!r}: choose one or more of {list(SPLITS)}.")
    return splits


#: What happens to a split whose annotation file is absent (printed by ``grcm prepare``).
ABSENT_SPLIT = {
    "train": "no training split; the corpus serves evaluation only (test a model trained on another corpus)",
    "val": "no validation split; fit will hold out part of train for validation (data.init_args.val_from_train)",
    "test": "no test split; grcm test has nothing to evaluate",
}


def detect_splits(
    builder: CaptionSetBuilder,
    splits: Sequence[str] | None,
    found: dict[str, Path | None],
    expected: dict[str, str],
    hint: str,
) -> tuple[str, ...]:
    """The splits a reader reads, recorded in ``builder.splits``.

    Args:
        builder: receives the splits and a note per absent split.
        splits: the splits asked for; each needs its file. None: every split whose file was found,
            with a note naming each missing file and what fit does instead (:data:`ABSENT_SPLIT`).
        found: split -> its annotation file, None where it is absent.
        expected: split -> the file name(s) looked for (for messages).
        hint: where the files come from.
    """
    if splits is not None:
        splits = check_splits(splits)
        for split in splits:
            if found.get(split) is None:
                raise CorpusError(
                    f"{builder.source}: {expected[split]} not found, but split {split!r} was asked for; {hint} "
                    f"Or leave out --splits to read the splits whose files exist."
                )
    else:
        splits = tuple(split for split in SPLITS if found.get(split) is not None)
        if not splits:
            files = ", ".join(expected.values())
            raise CorpusError(f"{builder.source}: none of {files} found; {hint}")
        for split in SPLITS:
            if split not in splits:
                builder.note(f"{expected[split]} not found in {builder.source}: {ABSENT_SPLIT[split]}.")
    builder.splits = splits
    builder.split_files.update({split: str(found[split]) for split in splits})
    return splits


@dataclass
class CaptionSet:
    """Items and their captions as read from annotation files (no features yet).

    Attributes:
        name: benchmark name (``"msrvtt"``, ...).
        modality: ``"image"``, ``"video"`` or ``"audio"``.
        item_ids: ``N`` unique item ids in annotation order; items listed by a split file
            but without captions are included (they count as uncaptioned).
        caption_item: ``(C,)`` int64 index of each caption's item into ``item_ids``.
        caption_text: ``C`` cleaned caption strings.
        caption_split: ``(C,)`` array of ``"train"``/``"val"``/``"test"``.
        notes: what the reader used, skipped or could not find (protocol caveats included).
        source: the annotation directory that was read.
        splits: the splits the reader was asked for or found files for; ``grcm prepare`` fails on
            one of them that ends up without captions (a split outside it is absent on purpose).
        split_files: split -> the annotation file it was read from, where one file defines it.
    """

    name: str
    modality: str
    item_ids: list[str]
    caption_item: np.ndarray
    caption_text: list[str]
    caption_split: np.ndarray
    notes: list[str] = field(default_factory=list)
    source: str = ""
    splits: tuple[str, ...] = SPLITS
    split_files: dict[str, str] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_captions(self) -> int:
        return len(self.caption_text)

    def captioned(self) -> np.ndarray:
        """``(N,)`` bool: whether each item has at least one caption."""
        return np.bincount(self.caption_item, minlength=self.num_items) > 0

    def items_of_split(self, split: str) -> list[str]:
        """Ids of the items that have at least one caption in ``split``, in annotation order."""
        rows = np.unique(self.caption_item[self.caption_split == split])
        return [self.item_ids[i] for i in rows.tolist()]

    def captions_by_item(self, split: str) -> dict[str, list[str]]:
        """``{item id: [caption, ...]}`` of ``split``, items and captions in annotation order."""
        grouped: dict[str, list[str]] = {}
        for item, text, s in zip(self.caption_item.tolist(), self.caption_text, self.caption_split):
            if s == split:
                grouped.setdefault(self.item_ids[item], []).append(text)
        return grouped

    def counts(self) -> dict[str, dict[str, int]]:
        """``{"items": {split: n}, "captions": {split: n}}`` over captioned items."""
        return {
            "items": {
                split: len(np.unique(self.caption_item[self.caption_split == split])) for split in SPLITS
            },
            "captions": {split: int((self.caption_split == split).sum()) for split in SPLITS},
        }

    def subset(self, keep: np.ndarray) -> CaptionSet:
        """The items where ``keep`` ``(N,)`` is True and their captions (item order kept)."""
        keep = np.asarray(keep, dtype=bool)
        new_index = np.cumsum(keep) - 1
        caption_keep = keep[self.caption_item]
        return CaptionSet(
            name=self.name,
            modality=self.modality,
            item_ids=[item_id for item_id, k in zip(self.item_ids, keep.tolist()) if k],
            caption_item=new_index[self.caption_item[caption_keep]].astype(np.int64),
            caption_text=[text for text, k in zip(self.caption_text, caption_keep.tolist()) if k],
            caption_split=self.caption_split[caption_keep],
            notes=list(self.notes),
            source=self.source,
            splits=self.splits,
            split_files=dict(self.split_files),
        )


class CaptionSetBuilder:
    """Collects items and captions in reading order and turns them into a :class:`CaptionSet`.

    Args:
        name: benchmark name.
        modality: ``"image"``, ``"video"`` or ``"audio"``.
        source: annotation directory (recorded in the set).
        unescape_html: decode HTML entities in captions (Flickr30K keeps them from its release).
    """

    def __init__(self, name: str, modality: str, source: str | Path = "", unescape_html: bool = False):
        self.name, self.modality, self.source = name, modality, str(source)
        self.unescape_html = unescape_html
        self._index: dict[str, int] = {}
        self._caption_item: list[int] = []
        self._caption_text: list[str] = []
        self._caption_split: list[str] = []
        self._empty: Counter[str] = Counter()
        self.notes: list[str] = []
        self.splits: tuple[str, ...] = SPLITS
        self.split_files: dict[str, str] = {}

    def add_item(self, item_id: str) -> int:
        """Register ``item_id`` (idempotent); returns its index."""
        index = self._index.get(item_id)
        if index is None:
            index = self._index[item_id] = len(self._index)
        return index

    def has_item(self, item_id: str) -> bool:
        return item_id in self._index

    def captioned_items(self) -> set[str]:
        """Ids of the items that have at least one caption so far."""
        ids = list(self._index)
        return {ids[index] for index in set(self._caption_item)}

    def add_caption(self, item_id: str, text: str, split: str, source: str | Path) -> None:
        """Add one caption of ``item_id`` to ``split``; empty captions are counted per ``source`` and skipped."""
        text = clean_caption(text, self.unescape_html)
        if not text:
            self._empty[str(source)] += 1
            return
        self._caption_item.append(self.add_item(item_id))
        self._caption_text.append(text)
        self._caption_split.append(split)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def build(self) -> CaptionSet:
        if not self._caption_text:
            raise CorpusError(
                f"{self.name}: no captions were read from {self.source or 'the annotation files'}"
                + (f" ({' '.join(self.notes)})" if self.notes else "")
                + "; check the annotation directory and the splits asked for."
            )
        notes = list(self.notes)
        notes += [f"{source}: skipped {n} empty caption(s)." for source, n in sorted(self._empty.items())]
        return CaptionSet(
            name=self.name,
            modality=self.modality,
            item_ids=list(self._index),
            caption_item=np.asarray(self._caption_item, dtype=np.int64),
            caption_text=self._caption_text,
            caption_split=np.asarray(self._caption_split, dtype="<U5"),
            notes=notes,
            source=self.source,
            splits=tuple(split for split in SPLITS if split in self.splits),
            split_files=dict(self.split_files),
        )


@dataclass(frozen=True)
class DatasetReader:
    """A registry entry: how to read one benchmark and how to match its item ids to feature ids.

    Attributes:
        name: registry key (``"msrvtt"``, ...).
        modality: ``"image"``, ``"video"`` or ``"audio"``.
        read: ``read(annotation_dir, **options) -> CaptionSet``.
        feature_key: maps an item id *or* a line of a feature-id file to a canonical key; an item
            and a feature row join when their keys are equal (e.g. ``video7.mp4`` and ``video7``).
        files: the annotation files expected in ``annotation_dir`` (for help texts).
        id_format: what a line of the feature-id file looks like, with an example
            (``"development/<file_name>.wav, e.g. development/Birds.wav"``); shown by id errors.
    """

    name: str
    modality: str
    read: Callable[..., CaptionSet]
    feature_key: Callable[[str], str]
    files: str
    id_format: str = ""

    def __call__(self, annotation_dir: str | Path, **options) -> CaptionSet:
        return self.read(annotation_dir, **options)
