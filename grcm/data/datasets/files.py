"""Locating and reading annotation files, with errors that name the file and the fix.

Every reader accepts LF and CRLF line ends, a UTF-8 byte-order mark, and gzip
files (``.gz``) wherever a plain text file is expected.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grcm.data.corpus import CorpusError

MEDIA_SUFFIXES = frozenset(
    {".mp4", ".avi", ".mkv", ".webm", ".mov", ".jpg", ".jpeg", ".png", ".wav", ".flac", ".mp3", ".ogg"}
    | {".npy", ".npz", ".pt", ".pth", ".pkl", ".h5", ".safetensors"}
)


def annotation_root(annotation_dir: str | Path) -> Path:
    """``annotation_dir`` as a Path; it must be an existing directory."""
    root = Path(annotation_dir).expanduser()
    if not root.is_dir():
        raise CorpusError(
            f"{root}: annotation directory not found; pass the folder holding the annotation files."
        )
    return root


def find_file(root: Path, candidates: Sequence[str], hint: str) -> Path:
    """The first of ``root / candidate`` that exists; otherwise a :class:`CorpusError` listing them and ``hint``."""
    path = find_optional_file(root, candidates)
    if path is None:
        tried = ", ".join(str(root / candidate) for candidate in candidates)
        raise CorpusError(f"annotation file not found (tried {tried}); {hint}")
    return path


def find_optional_file(root: Path, candidates: Sequence[str]) -> Path | None:
    """The first of ``root / candidate`` that exists, or None."""
    return next((root / c for c in candidates if (root / c).is_file()), None)


def read_text(path: Path) -> str:
    """Whole file as text (UTF-8, BOM dropped); ``.gz`` files are decompressed."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise CorpusError(f"{path}: cannot be read as UTF-8 text ({error}); re-download the file.") from error


def read_lines(path: Path) -> list[str]:
    """Lines of a text file without line ends (LF or CRLF); one final empty line is dropped."""
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_id_list(path: Path) -> list[str]:
    """One id per line; blank lines are an error (they would shift every following line)."""
    ids = read_lines(path)
    for number, line in enumerate(ids, start=1):
        if not line.strip():
            raise CorpusError(f"{path}: line {number} is blank; the file must hold one id per line.")
    return ids


def read_csv_rows(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file with a header; quoted fields may hold commas; LF or CRLF."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in required if column not in (reader.fieldnames or [])]
            if missing:
                raise CorpusError(
                    f"{path}: missing column(s) {missing} (header is {reader.fieldnames}); expected "
                    f"{','.join(required)}."
                )
            rows = list(reader)
    except UnicodeDecodeError as error:
        from grcm.data.corpus import not_utf8

        raise not_utf8(path, error) from error
    for number, row in enumerate(rows, start=2):
        if any(row.get(column) is None for column in required):
            raise CorpusError(f"{path}: data row {number} has fewer fields than the header; repair the file.")
    return rows


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise CorpusError(f"{path}: not valid JSON ({error}); re-download the file.") from error


def media_stem(raw_id: str) -> str:
    """Base name of a path-like id without a known media/feature suffix, outer whitespace stripped.

    ``"videos/all/video7.mp4"`` -> ``"video7"``; ``" Ambience Birds.wav"`` -> ``"Ambience Birds"``;
    ``"Foo 1.2"`` keeps its dot (``.2`` is not a media suffix).
    """
    name = re.split(r"[\\/]", raw_id.strip())[-1].strip()
    stem, dot, suffix = name.rpartition(".")
    if dot and stem and f".{suffix.lower()}" in MEDIA_SUFFIXES:
        name = stem
    return name.strip()
