"""Caption files written as lists of ``{"video": ..., "caption": ...}`` records, detected by content.

Several video-retrieval codebases ship MSR-VTT's train and test captions this way
(``msrvtt_ret_train9k.json``, ``msrvtt_test1k.json``, GRDR's ``msrvtt_ret_train_addition.json``):

- a JSON array ``[{"video": "video7960.mp4", "caption": "a man is singing"}, ...]``, or
- JSON Lines, one such record per line.

``caption`` is one string or a list of strings; other fields are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

from grcm.data.corpus import CorpusError
from grcm.data.datasets.files import read_text

RECORD_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def _is_record(value) -> bool:
    return isinstance(value, dict) and "video" in value and "caption" in value


def load_caption_records(path: Path) -> list[tuple[str, str]] | None:
    """``(video, caption)`` pairs of ``path`` in file order, or None when it is not a record list.

    A file is a record list when it is a JSON array whose first element is a record, or when its first
    line is one JSON record (JSON Lines). Every later record must have both fields (an error names
    the file, the record and the fix).
    """
    text = read_text(path).strip()
    if text.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not data or not _is_record(data[0]):
            return None
        entries = list(enumerate(data, start=1))
        where = "record"
    elif text.startswith("{"):
        lines = text.split("\n")
        try:
            first = json.loads(lines[0])
        except json.JSONDecodeError:
            return None
        if not _is_record(first):
            return None
        entries = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entries.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise CorpusError(
                    f"{path}: line {number} is not JSON ({error}); JSON Lines hold one "
                    '{"video": ..., "caption": ...} record per line.'
                ) from error
        where = "line"
    else:
        return None
    pairs: list[tuple[str, str]] = []
    for number, record in entries:
        captions = record.get("caption") if isinstance(record, dict) else None
        captions = [captions] if isinstance(captions, str) else captions
        video = record.get("video") if isinstance(record, dict) else None
        if not isinstance(video, str) or not isinstance(captions, list) or not all(
            isinstance(c, str) for c in captions
        ):
            raise CorpusError(
                f"{path}: {where} {number} is not a {{\"video\": <file name>, \"caption\": <text or list of texts>}} "
                f"record ({str(record)[:80]}); repair or remove it."
            )
        pairs.extend((video, caption) for caption in captions)
    return pairs


def record_files(root: Path, exclude: tuple[str, ...] = ()) -> dict[Path, list[tuple[str, str]]]:
    """Every ``{video, caption}`` record file directly in ``root`` (by content), with its pairs; name order."""
    found = {}
    for path in sorted(root.iterdir()):
        if path.name in exclude or not path.is_file() or not path.name.lower().endswith(RECORD_SUFFIXES):
            continue
        pairs = load_caption_records(path)
        if pairs is not None:
            found[path] = pairs
    return found
