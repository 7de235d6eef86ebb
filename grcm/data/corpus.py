"""The corpus schema every dataset maps onto, its on-disk layout and its validation.

A corpus is a set of items (images, videos, audio clips) with one precomputed
feature vector each, plus captions that serve as queries. On disk::

    <root>/
      corpus.json          {"format_version": 1, "name": ..., "modality": ...,
                            "features": "features.npy"}
      item_ids.txt         one item id per line; line i <-> feature row i
      features.npy         (N, D) float16/float32 (memory-mapped on load),
                           or features.safetensors with a tensor named "features"
      captions.csv         header item_id,text,split   (split in train/val/test)
      extra_queries.csv    optional, header item_id,text[,source] (extra training queries;
                           source says where each came from, e.g. "synthetic" or a model name)
      token_features.npy   optional, (N, T, D) float16/float32 multi-token item features
                           (frames, patches or audio segments; memory-mapped on load)
      token_lengths.npy    optional, (N,) integer: item i's valid tokens are rows 0..len-1 of
                           token_features[i]; the rest is padding (finite, zeros recommended)

Token features are named in ``corpus.json`` by ``"token_features"`` (and
``"token_lengths"``; without it every item has all ``T`` tokens). ``D`` equals the
pooled feature dimension; the pooled row is normally the mean of the item's valid tokens.

Every check on load names the file, the offending id or row, and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grcm.errors import GrcmError
from grcm.io import atomic_path, write_json_atomic

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
TOKEN_FEATURES_FILE = "token_features.npy"
TOKEN_LENGTHS_FILE = "token_lengths.npy"


class CorpusError(GrcmError, ValueError):
    """A corpus on disk or in memory breaks the schema; the message says where and how to fix it."""


@dataclass
class Corpus:
    """Items with features, and captions that point at items.

    Attributes:
        name: corpus name (e.g. ``"synthetic"``, ``"msrvtt"``).
        modality: ``"image"``, ``"video"`` or ``"audio"``.
        item_ids: ``N`` unique string ids.
        features: ``(N, D)`` float16/float32 array, row ``i`` belongs to ``item_ids[i]``;
            may be a read-only memmap.
        caption_item: ``(C,)`` int64 index of each caption's item.
        caption_text: ``C`` caption strings.
        caption_split: ``(C,)`` array of ``"train"``/``"val"``/``"test"``.
        extra_item: ``(E,)`` int64 item index of each extra training query.
        extra_text: ``E`` extra training queries (generated/pseudo queries).
        extra_source: ``E`` provenance strings of the extra queries (empty list: unknown).
        token_features: optional ``(N, T, D)`` float16/float32 per-item tokens (frames, patches,
            audio segments), same ``D`` as ``features``; may be a read-only memmap.
        token_lengths: optional ``(N,)`` int64 number of valid tokens of each item (1..T); positions
            ``>= token_lengths[i]`` are padding. ``None`` with token features means all ``T`` are valid.
    """

    name: str
    modality: str
    item_ids: list[str]
    features: np.ndarray
    caption_item: np.ndarray
    caption_text: list[str]
    caption_split: np.ndarray
    extra_item: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    extra_text: list[str] = field(default_factory=list)
    extra_source: list[str] = field(default_factory=list)
    token_features: np.ndarray | None = None
    token_lengths: np.ndarray | None = None

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def has_token_features(self) -> bool:
        return self.token_features is not None

    @property
    def max_tokens(self) -> int:
        """``T``, the padded number of tokens per item (0 without token features)."""
        return 0 if self.token_features is None else int(self.token_features.shape[1])

    def item_token_lengths(self) -> np.ndarray:
        """``(N,)`` int64 valid-token count per item (all ``T`` when no lengths are stored)."""
        if self.token_features is None:
            raise CorpusError(f"corpus {self.name!r} has no token features.")
        if self.token_lengths is None:
            return np.full(self.num_items, self.max_tokens, dtype=np.int64)
        return np.asarray(self.token_lengths, dtype=np.int64)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def captions_of_split(self, split: str) -> np.ndarray:
        """Indices ``(C_split,)`` of the captions in ``split``."""
        if split not in SPLITS:
            raise CorpusError(f"unknown split {split!r}; use one of {SPLITS}")
        return np.flatnonzero(self.caption_split == split)

    def validate(self, source: str = "<memory>") -> Corpus:
        """Check the schema; raise :class:`CorpusError` naming ``source``, the id and the fix."""
        n = len(self.item_ids)
        if len(set(self.item_ids)) != n:
            seen: set[str] = set()
            dup = next(i for i in self.item_ids if i in seen or seen.add(i))
            raise CorpusError(f"{source}: item id {dup!r} occurs more than once; item ids must be unique.")
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise CorpusError(
                f"{source}: features have shape {tuple(self.features.shape)} but there are {n} item ids; "
                "expected (num_items, feature_dim) with row i belonging to item id i."
            )
        if self.features.dtype not in (np.float16, np.float32):
            raise CorpusError(f"{source}: features dtype is {self.features.dtype}; store float16 or float32.")
        bad_rows = _non_finite_rows(self.features)
        if bad_rows.size:
            ids = ", ".join(repr(self.item_ids[i]) for i in bad_rows[:5])
            raise CorpusError(
                f"{source}: feature rows of item(s) {ids} contain NaN or inf ({bad_rows.size} row(s) in all); "
                "re-extract those items' features or drop the items and their captions."
            )
        if len(self.caption_text) != len(self.caption_item) or len(self.caption_split) != len(self.caption_item):
            raise CorpusError(f"{source}: caption_item, caption_text and caption_split differ in length.")
        if self.caption_item.size and (self.caption_item.min() < 0 or self.caption_item.max() >= n):
            raise CorpusError(f"{source}: a caption points at an item index outside [0, {n}).")
        bad_split = set(np.unique(self.caption_split).tolist()) - set(SPLITS)
        if bad_split:
            raise CorpusError(f"{source}: unknown split(s) {sorted(bad_split)}; use train, val or test.")
        if len(self.extra_text) != len(self.extra_item):
            raise CorpusError(f"{source}: extra_item and extra_text differ in length.")
        if self.extra_source and len(self.extra_source) != len(self.extra_text):
            raise CorpusError(f"{source}: extra_source must be empty or give one source per extra query.")
        if self.extra_item.size and (self.extra_item.min() < 0 or self.extra_item.max() >= n):
            raise CorpusError(f"{source}: an extra query points at an item index outside [0, {n}).")
        if self.token_features is not None or self.token_lengths is not None:
            self._validate_tokens(source)
        return self

    def _validate_tokens(self, source: str) -> None:
        """Check ``token_features`` / ``token_lengths`` against the items and the pooled features."""
        n, tokens, lengths = len(self.item_ids), self.token_features, self.token_lengths
        where = f"{source}: token_features"
        if tokens is None:
            raise CorpusError(f"{source}: token_lengths given without token_features; add token_features.npy "
                              "(N, T, D) or drop token_lengths.")
        if tokens.ndim != 3 or tokens.shape[0] != n or tokens.shape[2] != self.features.shape[1] or not tokens.shape[1]:
            raise CorpusError(
                f"{where} have shape {tuple(tokens.shape)} but there are {n} items with "
                f"{self.features.shape[1]}-d pooled features; expected (num_items, num_tokens >= 1, "
                f"{self.features.shape[1]}) with token_features[i] belonging to item id i."
            )
        if tokens.dtype not in (np.float16, np.float32):
            raise CorpusError(f"{where} dtype is {tokens.dtype}; store float16 or float32.")
        if lengths is not None:
            where_len = f"{source}: token_lengths"
            if lengths.shape != (n,) or not np.issubdtype(lengths.dtype, np.integer):
                raise CorpusError(
                    f"{where_len} have shape {tuple(lengths.shape)} and dtype {lengths.dtype}; expected ({n},) "
                    "integers, the number of valid tokens of each item."
                )
            bad = np.flatnonzero((lengths < 1) | (lengths > tokens.shape[1]))
            if bad.size:
                ids = ", ".join(f"{self.item_ids[i]!r} ({int(lengths[i])})" for i in bad[:5])
                raise CorpusError(
                    f"{where_len}: item(s) {ids} have a length outside [1, {tokens.shape[1]}] "
                    f"({bad.size} item(s) in all); every item needs 1..T valid tokens, padding after them."
                )
        flat = tokens.reshape(n, -1)  # a view, also of a memmap
        bad_rows = _non_finite_rows(flat, chunk=max(1, (1 << 24) // max(flat.shape[1], 1)))
        if bad_rows.size:
            ids = ", ".join(repr(self.item_ids[i]) for i in bad_rows[:5])
            raise CorpusError(
                f"{where} of item(s) {ids} contain NaN or inf ({bad_rows.size} item(s) in all); re-extract "
                "those items' tokens (padding positions must be finite too: write zeros)."
            )

    def feature_checksum(self) -> str:
        """SHA-256 over the item ids and the raw feature bytes (identifies what a SID bundle was built from)."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.item_ids).encode())
        digest.update(str(self.features.dtype).encode() + str(self.features.shape).encode())
        for start in range(0, self.num_items, 65536):
            digest.update(np.ascontiguousarray(self.features[start : start + 65536]).tobytes())
        return digest.hexdigest()


def _non_finite_rows(features: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Row indices ``(R,)`` whose features hold NaN or inf, scanned in chunks (memmap friendly)."""
    bad = [
        start + np.flatnonzero(~np.isfinite(features[start : start + chunk]).all(axis=1))
        for start in range(0, features.shape[0], chunk)
    ]
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def save_corpus(corpus: Corpus, root: str | Path, feature_format: str = "npy") -> Path:
    """Write ``corpus`` to ``root`` in the on-disk layout above, each file atomically.

    Token features (when present) are always written as ``token_features.npy`` and
    ``token_lengths.npy`` (int64), so they memory-map on load.
    """
    corpus.validate()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    feature_file = {"npy": "features.npy", "safetensors": "features.safetensors"}[feature_format]
    with atomic_path(root / feature_file) as tmp:
        if feature_format == "npy":
            with open(tmp, "wb") as handle:
                np.save(handle, np.asarray(corpus.features))
        else:
            from safetensors.numpy import save_file

            save_file({"features": np.ascontiguousarray(corpus.features)}, str(tmp))
    with atomic_path(root / "item_ids.txt") as tmp:
        tmp.write_text("".join(f"{item_id}\n" for item_id in corpus.item_ids))
    _write_csv(
        root / "captions.csv",
        ("item_id", "text", "split"),
        (
            (corpus.item_ids[i], text, split)
            for i, text, split in zip(corpus.caption_item.tolist(), corpus.caption_text, corpus.caption_split)
        ),
    )
    if len(corpus.extra_text):
        sources = corpus.extra_source or ["unknown"] * len(corpus.extra_text)
        _write_csv(
            root / "extra_queries.csv",
            ("item_id", "text", "source"),
            (
                (corpus.item_ids[i], text, source)
                for i, text, source in zip(corpus.extra_item.tolist(), corpus.extra_text, sources)
            ),
        )
    header = {"format_version": FORMAT_VERSION, "name": corpus.name, "modality": corpus.modality,
              "features": feature_file}
    if corpus.token_features is not None:
        _save_npy(root / TOKEN_FEATURES_FILE, corpus.token_features)
        _save_npy(root / TOKEN_LENGTHS_FILE, corpus.item_token_lengths())
        header.update(token_features=TOKEN_FEATURES_FILE, token_lengths=TOKEN_LENGTHS_FILE)
    write_json_atomic(root / "corpus.json", header)
    return root


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.asarray(array))


def _write_csv(path: Path, header: Sequence[str], rows) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def read_corpus_header(root: str | Path) -> dict:
    """Read ``corpus.json`` and check its version; cheap (used in DataModule ``__init__``)."""
    path = Path(root) / "corpus.json"
    if not path.is_file():
        raise CorpusError(f"{path}: not found; a corpus directory needs corpus.json: run grcm prepare <dataset> "
                          "... --out <dir> (docs/data.md) and set data.init_args.corpus_dir=<dir>.")
    header = json.loads(path.read_text())
    if header.get("format_version") != FORMAT_VERSION:
        version = header.get("format_version")
        raise CorpusError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION}).")
    return header


def load_features(
    path: Path,
    missing_hint: str = "write features.npy (N, D) beside corpus.json",
    single_tensor_ok: bool = False,
) -> np.ndarray:
    """Load a ``(N, D)`` feature matrix: ``.npy`` memory-mapped, ``.safetensors`` tensor ``features``.

    Args:
        path: the feature file.
        missing_hint: the fix named when the file does not exist.
        single_tensor_ok: also accept a ``.safetensors`` file holding exactly one tensor of another name.
    """
    if not path.is_file():
        raise CorpusError(f"{path}: feature file not found; {missing_hint}.")
    if path.suffix not in (".npy", ".safetensors"):
        raise CorpusError(f"{path}: unsupported feature format {path.suffix!r}; use .npy or .safetensors.")
    try:
        if path.suffix == ".npy":
            features = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if "features" in tensors:
                features = tensors["features"]
            elif single_tensor_ok and len(tensors) == 1:
                features = next(iter(tensors.values()))
            else:
                raise CorpusError(f"{path}: holds tensors {sorted(tensors)}; name the (N, D) matrix 'features'.")
    except CorpusError:
        raise
    except Exception as error:  # noqa: BLE001 -- truncated or garbage files fail in many ways inside numpy
        raise unreadable_features(path, error) from error
    if not isinstance(features, np.ndarray) or features.ndim != 2:
        shape = getattr(features, "shape", None)
        raise CorpusError(f"{path}: features have shape {shape}; expected a 2-d (num_items, feature_dim) matrix.")
    return features


def unreadable_features(path: Path, error: Exception) -> CorpusError:
    """The error for a feature file numpy/safetensors cannot read (truncated, garbage, wrong format)."""
    reason = " ".join(str(error).split())[:160]
    return CorpusError(
        f"{path}: cannot be read as a feature matrix ({type(error).__name__}: {reason}); the file is truncated or "
        "not a .npy/.safetensors array: write it again with numpy.save(path, features) (an (N, D) float array)."
    )


def load_token_features(root: str | Path, header: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The ``(N, T, D)`` token features (memory-mapped) and ``(N,)`` lengths a header names, or ``(None, None)``."""
    root = Path(root)
    if "token_features" not in header:
        if "token_lengths" in header:
            raise CorpusError(f"{root / 'corpus.json'}: 'token_lengths' is set but 'token_features' is not; "
                              f"name the (N, T, D) file as \"token_features\": \"{TOKEN_FEATURES_FILE}\".")
        return None, None
    arrays = []
    for key, shape in (("token_features", "(N, T, D) float"), ("token_lengths", "(N,) int")):
        if key not in header:
            arrays.append(None)
            continue
        path = root / str(header[key])
        if not path.is_file() or path.suffix != ".npy":
            raise CorpusError(f"{path}: corpus.json field {key!r} names a missing or non-.npy file; write the "
                              f"{shape} array with numpy.save beside corpus.json or drop the field.")
        try:
            arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
        except ValueError as error:
            raise CorpusError(f"{path}: cannot read corpus.json field {key!r} ({error}); rewrite it with "
                              "numpy.save.") from error
    return arrays[0], arrays[1]


def load_corpus(root: str | Path) -> Corpus:
    """Load and validate a corpus directory; every error names the file, the id and the fix."""
    root = Path(root)
    header = read_corpus_header(root)
    features = load_features(root / header.get("features", "features.npy"))
    ids_path = root / "item_ids.txt"
    if not ids_path.is_file():
        raise CorpusError(f"{ids_path}: not found; list one item id per feature row.")
    try:
        item_ids = ids_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise not_utf8(ids_path, error) from error
    if len(item_ids) != features.shape[0]:
        raise CorpusError(
            f"{ids_path}: {len(item_ids)} ids but the feature file has {features.shape[0]} rows; "
            "line i of item_ids.txt must name feature row i."
        )
    index: dict[str, int] = {}
    for line, item_id in enumerate(item_ids, start=1):
        if item_id in index:
            raise CorpusError(
                f"{ids_path}: item id {item_id!r} occurs on lines {index[item_id] + 1} and {line}; item ids must be "
                "unique (line i names feature row i): fix the duplicated line."
            )
        index[item_id] = line - 1
    caption_item, caption_text, caption_split = [], [], []
    captions_path = root / "captions.csv"
    for row_number, row in _read_csv(captions_path, ("item_id", "text", "split")):
        item = index.get(row["item_id"])
        if item is None:
            raise CorpusError(
                f"{captions_path}: row {row_number} refers to item id {row['item_id']!r}, which has no features "
                f"in {ids_path.name}; add its features or drop its captions."
            )
        if row["split"] not in SPLITS:
            raise CorpusError(
                f"{captions_path}: row {row_number} has split {row['split']!r}; use one of {', '.join(SPLITS)}."
            )
        caption_item.append(item)
        caption_text.append(row["text"])
        caption_split.append(row["split"])
    extra_item, extra_text, extra_source = [], [], []
    extra_path = root / "extra_queries.csv"
    if extra_path.is_file():
        for row_number, row in _read_csv(extra_path, ("item_id", "text")):
            item = index.get(row["item_id"])
            if item is None:
                raise CorpusError(
                    f"{extra_path}: row {row_number} refers to item id {row['item_id']!r}, which has no features."
                )
            extra_item.append(item)
            extra_text.append(row["text"])
            extra_source.append(row.get("source") or "unknown")
    token_features, token_lengths = load_token_features(root, header)
    corpus = Corpus(
        name=str(header.get("name", root.name)),
        modality=str(header.get("modality", "unknown")),
        item_ids=item_ids,
        features=features,
        caption_item=np.asarray(caption_item, dtype=np.int64),
        caption_text=caption_text,
        caption_split=np.asarray(caption_split, dtype="<U5"),
        extra_item=np.asarray(extra_item, dtype=np.int64),
        extra_text=extra_text,
        extra_source=extra_source,
        token_features=token_features,
        token_lengths=token_lengths,
    )
    return corpus.validate(source=str(root))


def _read_csv(path: Path, required: Sequence[str]):
    """Yield ``(row_number, row_dict)``; accepts LF and CRLF line ends."""
    if not path.is_file():
        raise CorpusError(f"{path}: not found.")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in required if column not in (reader.fieldnames or [])]
            if missing:
                raise CorpusError(f"{path}: missing column(s) {missing}; the header must be {','.join(required)}.")
            rows = list(enumerate(reader, start=2))
    except UnicodeDecodeError as error:
        raise not_utf8(path, error) from error
    yield from rows


def not_utf8(path: Path, error: UnicodeDecodeError) -> CorpusError:
    """The error for a text file that is not UTF-8, with the byte offset and the fix."""
    return CorpusError(
        f"{path}: not UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start}); re-save the file "
        "as UTF-8, e.g. iconv -f latin1 -t utf-8 in.csv > out.csv."
    )
