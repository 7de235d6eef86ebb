"""SID bundle: the artifact a tokenizer run hands to the retriever.

One directory per run::

    meta.json              format name + version, vocab sizes, config, health, checksums
    item_ids.json          the N item ids, row order of the code matrix
    codes.safetensors      "codes": int64 (N, L)
    codebooks.safetensors  named float tensors (coarse centroids, RQ codebooks, ...)

It is written atomically (a crash leaves the previous bundle in place) and
loaded with a format-version check and integrity checks that name the file
and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from grcm.errors import GrcmError
from grcm.io import atomic_directory

BUNDLE_FORMAT = "grcm-sid-bundle"
BUNDLE_FORMAT_VERSION = 1
META_FILE = "meta.json"
ITEM_IDS_FILE = "item_ids.json"
CODES_FILE = "codes.safetensors"
CODEBOOKS_FILE = "codebooks.safetensors"


class BundleError(GrcmError, ValueError):
    """A SID bundle is missing, corrupt, of another format version, or does not match its features."""


def feature_checksum(item_ids: Sequence[str], features: np.ndarray | torch.Tensor) -> str:
    """Checksum of item ids + features (N, D), identical to ``Corpus.feature_checksum()``."""
    from grcm.data.corpus import Corpus  # imported here: grcm.data pulls in the DataModules

    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    empty = np.zeros(0, dtype=np.int64)
    corpus = Corpus("", "", list(item_ids), features, empty, [], np.zeros(0, dtype="<U5"))
    return corpus.feature_checksum()


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return "sha256:" + hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def _jsonable(value: Any) -> Any:
    """Convert tuples, numpy and torch scalars inside config/health dicts to plain JSON types."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; e.g. a similarity over no pairs
    return value


@dataclass
class SIDBundle:
    """Item ids, their semantic IDs and everything needed to interpret them.

    Attributes:
        item_ids: N item ids, unique, in the row order of ``codes``.
        codes: (N, L) int64; level l holds values in [0, vocab_sizes[l]). Rows may repeat
            when the unique token is disabled (several items share a SID).
        vocab_sizes: L vocabulary sizes, one per level.
        codebooks: named float tensors the codes index (e.g. "coarse" (K, D), "fine_0" (C, d)).
        config: tokenizer settings; ``config["level_names"]`` names each level when known.
        feature_checksum: ``Corpus.feature_checksum()`` of the corpus the codes were built from.
        health: SID health metrics (utilisation, collisions, Gini, ...).
    """

    item_ids: list[str]
    codes: torch.Tensor
    vocab_sizes: list[int]
    codebooks: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    feature_checksum: str = ""
    health: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.codes = torch.as_tensor(self.codes).to(torch.long).cpu().contiguous()
        self.item_ids = [str(item) for item in self.item_ids]
        self.vocab_sizes = [int(size) for size in self.vocab_sizes]
        self.validate()

    @property
    def num_items(self) -> int:
        return self.codes.shape[0]

    @property
    def num_levels(self) -> int:
        return self.codes.shape[1]

    def validate(self, source: str = "SIDBundle") -> None:
        """Raise BundleError when ids, codes and vocabulary sizes disagree."""
        if self.codes.ndim != 2:
            raise BundleError(f"{source}: codes must be a (N, L) matrix; got shape {tuple(self.codes.shape)}")
        n, levels = self.codes.shape
        if len(self.item_ids) != n:
            raise BundleError(f"{source}: {len(self.item_ids)} item ids but {n} code rows; they must match")
        if len(set(self.item_ids)) != n:
            raise BundleError(f"{source}: item ids are not unique")
        if len(self.vocab_sizes) != levels:
            raise BundleError(f"{source}: {len(self.vocab_sizes)} vocab sizes for {levels} code levels")
        if n and (self.codes.min() < 0 or (self.codes >= torch.tensor(self.vocab_sizes)).any()):
            bad = (
                ((self.codes < 0) | (self.codes >= torch.tensor(self.vocab_sizes))).any(0).nonzero().flatten()
            )
            raise BundleError(
                f"{source}: codes at level(s) {bad.tolist()} fall outside [0, vocab_size) "
                f"with vocab_sizes={self.vocab_sizes}"
            )

    def check_features(self, features: np.ndarray | torch.Tensor) -> None:
        """Raise BundleError unless ``features`` (N, D), rows in ``item_ids`` order, built this bundle."""
        if features.shape[0] != self.num_items:
            raise BundleError(
                f"the SID bundle covers {self.num_items} items but {features.shape[0]} feature rows were given; "
                "use the features of the corpus the bundle was built from, or rebuild the bundle"
            )
        actual = feature_checksum(self.item_ids, features)
        if self.feature_checksum and actual != self.feature_checksum:
            raise BundleError(
                f"the features do not match the SID bundle (bundle checksum {self.feature_checksum[:12]}..., "
                f"features {actual[:12]}...); rebuild the bundle from these features"
            )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bundle to ``directory`` atomically (replacing an existing bundle); returns the path."""
        self.validate()
        meta = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "num_items": self.num_items,
            "num_levels": self.num_levels,
            "vocab_sizes": self.vocab_sizes,
            "feature_checksum": self.feature_checksum,
            "codes_sha256": _tensor_sha256(self.codes),
            "codebook_names": sorted(self.codebooks),
            "config": _jsonable(self.config),
            "health": _jsonable(self.health),
        }
        with atomic_directory(directory) as tmp:
            save_file({"codes": self.codes}, str(tmp / CODES_FILE))
            codebooks = {name: t.detach().cpu().contiguous() for name, t in self.codebooks.items()}
            save_file(codebooks, str(tmp / CODEBOOKS_FILE))
            (tmp / ITEM_IDS_FILE).write_text(json.dumps(self.item_ids))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SIDBundle:
        """Read a bundle written by ``save``; raises BundleError naming the bad file and the fix."""
        root = Path(directory)
        if not root.is_dir():
            raise BundleError(
                f"no SID bundle directory at {root}; build one with the tokenizer (grcm fit ...)"
            )
        for name in (META_FILE, ITEM_IDS_FILE, CODES_FILE, CODEBOOKS_FILE):
            if not (root / name).is_file():
                raise BundleError(f"{root / name} is missing; the bundle is incomplete, rebuild it")
        try:
            meta = json.loads((root / META_FILE).read_text())
        except json.JSONDecodeError as error:
            raise BundleError(
                f"{root / META_FILE} is not valid JSON ({error}); rebuild the bundle"
            ) from error
        if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{root / META_FILE} is not a {BUNDLE_FORMAT} file (field 'format')")
        version = meta.get("format_version")
        if version != BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"{root / META_FILE}: format_version {version} is not supported (this grcm reads "
                f"version {BUNDLE_FORMAT_VERSION}); rebuild the bundle with this grcm version"
            )
        try:
            codes = load_file(str(root / CODES_FILE))["codes"]
            codebooks = load_file(str(root / CODEBOOKS_FILE))
        except (SafetensorError, KeyError, OSError) as error:
            raise BundleError(
                f"cannot read tensors in {root} ({error}); the bundle is corrupt, rebuild it"
            ) from error
        if _tensor_sha256(codes) != meta.get("codes_sha256"):
            raise BundleError(
                f"{root / CODES_FILE} does not match its checksum in meta.json; rebuild the bundle"
            )
        try:
            item_ids = json.loads((root / ITEM_IDS_FILE).read_text())
        except json.JSONDecodeError as error:
            raise BundleError(
                f"{root / ITEM_IDS_FILE} is not valid JSON ({error}); rebuild the bundle"
            ) from error
        missing = [key for key in ("vocab_sizes", "feature_checksum", "config", "health") if key not in meta]
        if missing:
            raise BundleError(f"{root / META_FILE} lacks field(s) {missing}; rebuild the bundle")
        try:
            bundle = cls(
                item_ids=item_ids,
                codes=codes,
                vocab_sizes=meta["vocab_sizes"],
                codebooks=codebooks,
                config=meta["config"],
                feature_checksum=meta["feature_checksum"],
                health=meta["health"],
            )
        except BundleError as error:
            raise BundleError(f"SID bundle at {root} is inconsistent: {error}") from error
        return bundle
