"""How to build a dense index: :class:`DenseIndexConfig`, its defaults and its FAISS factory string.

Six FAISS index families (see :mod:`grcm.rerank.index`): ``flat``, ``ivf_flat``, ``ivf_pq``,
``hnsw``, ``sq8`` and ``pq``; :meth:`DenseIndexConfig.resolve` fills the sizes that depend on the
data (IVF cells, PQ sub-quantisers) and :meth:`DenseIndexConfig.factory_string` names the index
for ``faiss.index_factory``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import faiss

from grcm.rerank.faiss_runtime import gpu_available

__all__ = ["CPU_ONLY_KINDS", "INDEX_KINDS", "METRICS", "PQ_KINDS", "DenseIndexConfig", "auto_nlist", "auto_pq_m"]

INDEX_KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw", "sq8", "pq")
PQ_KINDS = ("ivf_pq", "pq")
CPU_ONLY_KINDS = ("hnsw", "sq8", "pq")
METRICS = ("ip", "l2", "cosine")
MIN_POINTS_PER_CENTROID = 39  # below this FAISS warns that K-Means is under-trained


def auto_nlist(num_train: int) -> int:
    """Number of IVF cells for ``num_train`` training vectors: about 4·sqrt(N), with >= 39 points per cell."""
    return max(1, min(round(4 * math.sqrt(num_train)), num_train // MIN_POINTS_PER_CENTROID))


def auto_pq_m(dim: int) -> int:
    """Number of PQ sub-quantisers for ``dim``-d vectors: the largest divisor of ``dim`` <= min(64, dim // 4)."""
    cap = max(1, min(64, dim // 4))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


@dataclass
class DenseIndexConfig:
    """How to build a :class:`DenseIndex`.

    Args:
        kind: ``"flat"`` (exact), ``"ivf_flat"``, ``"ivf_pq"``, ``"hnsw"``, ``"sq8"`` or ``"pq"``.
        metric: ``"ip"`` (inner product), ``"cosine"`` (inner product of L2-normalised
            vectors) or ``"l2"`` (squared Euclidean distance).
        nlist: IVF cells; ``None`` picks :func:`auto_nlist` of the training-set size.
        nprobe: IVF cells visited per query (clamped to ``nlist``); more is slower and more exact.
        pq_m: PQ sub-quantisers of ``ivf_pq``/``pq`` (must divide the feature dimension); ``None`` picks
            :func:`auto_pq_m`.
        pq_bits: bits per PQ sub-quantiser code (8 is the usual choice and the one GPUs support; 4 keeps
            the codebooks small, ``pq_m * 2**pq_bits * dim / pq_m`` floats, when the corpus is small).
        hnsw_m: HNSW graph degree.
        ef_search: HNSW candidate-list size at search time.
        ef_construction: HNSW candidate-list size at build time.
        use_gpu: ``"auto"`` (GPU when available, never for ``hnsw``/``sq8``/``pq``), ``True`` (fail without
            one) or ``False``.
        gpu_device: CUDA device number for GPU indexes.
        train_size: vectors sampled (without replacement, with ``seed``) to train IVF/PQ/SQ;
            ``None`` samples as many as FAISS' K-Means would use (256 per centroid), and for
            ``sq8`` (whose per-dimension ranges clip every vector outside the sample's) up to 262,144.
        num_threads: OpenMP threads FAISS may use while building and searching; ``None`` keeps FAISS' default.
        seed: seed of the training sample.
    """

    kind: Literal["flat", "ivf_flat", "ivf_pq", "hnsw", "sq8", "pq"] = "flat"
    metric: Literal["ip", "l2", "cosine"] = "ip"
    nlist: int | None = None
    nprobe: int = 16
    pq_m: int | None = None
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_search: int = 64
    ef_construction: int = 80
    use_gpu: bool | Literal["auto"] = "auto"
    gpu_device: int = 0
    train_size: int | None = None
    num_threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"DenseIndexConfig.kind must be one of {INDEX_KINDS}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise ValueError(f"DenseIndexConfig.metric must be one of {METRICS}, got {self.metric!r}")
        if self.use_gpu not in (True, False, "auto"):
            raise ValueError(f"DenseIndexConfig.use_gpu must be true, false or 'auto', got {self.use_gpu!r}")
        positive = {
            "nprobe": self.nprobe,
            "hnsw_m": self.hnsw_m,
            "ef_search": self.ef_search,
            "ef_construction": self.ef_construction,
            "nlist": self.nlist,
            "pq_m": self.pq_m,
            "train_size": self.train_size,
            "num_threads": self.num_threads,
        }
        for name, value in positive.items():
            if value is not None and int(value) < 1:
                raise ValueError(f"DenseIndexConfig.{name} must be >= 1, got {value}")
        if not 1 <= self.pq_bits <= 16:
            raise ValueError(f"DenseIndexConfig.pq_bits must be in [1, 16], got {self.pq_bits}")
        if self.kind in CPU_ONLY_KINDS and self.use_gpu is True:
            raise ValueError(
                f"FAISS has no GPU {self.kind.upper()} index here; set use_gpu to false or 'auto', or pick kind "
                "flat, ivf_flat or ivf_pq"
            )

    @property
    def faiss_metric(self) -> int:
        return faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT

    def resolve(self, num_items: int, dim: int) -> DenseIndexConfig:
        """A copy with ``nlist`` and ``pq_m`` filled in for ``num_items`` vectors of ``dim`` dimensions.

        Raises:
            ValueError: when the sizes cannot train the requested index.
        """
        num_train = min(num_items, self.train_size or num_items)
        resolved = self
        if self.kind in ("ivf_flat", "ivf_pq"):
            nlist = self.nlist or auto_nlist(num_train)
            if nlist > num_train:
                raise ValueError(
                    f"nlist={nlist} IVF cells need at least as many training vectors, got {num_train}; "
                    "lower nlist (or leave it unset), raise train_size, or use kind='flat'"
                )
            resolved = replace(resolved, nlist=nlist)
        if self.kind in PQ_KINDS:
            pq_m = self.pq_m or auto_pq_m(dim)
            if dim % pq_m:
                raise ValueError(
                    f"pq_m={pq_m} must divide the feature dimension {dim}; try pq_m={auto_pq_m(dim)}"
                )
            if num_train < 2**self.pq_bits:
                raise ValueError(
                    f"{self.kind} with pq_bits={self.pq_bits} needs at least {2**self.pq_bits} training vectors, "
                    f"got {num_train}; lower pq_bits or use kind='flat'"
                )
            resolved = replace(resolved, pq_m=pq_m)
        return resolved

    def factory_string(self) -> str:
        """The ``faiss.index_factory`` description of a resolved config, e.g. ``"IVF64,PQ16x8"``."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m}"
        if self.kind == "sq8":
            return "SQ8"
        if self.kind == "pq":
            if self.pq_m is None:
                raise ValueError("call DenseIndexConfig.resolve(num_items, dim) before factory_string()")
            return f"PQ{self.pq_m}x{self.pq_bits}"
        if self.nlist is None or (self.kind == "ivf_pq" and self.pq_m is None):
            raise ValueError("call DenseIndexConfig.resolve(num_items, dim) before factory_string()")
        if self.kind == "ivf_flat":
            return f"IVF{self.nlist},Flat"
        return f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_bits}"

    def wants_gpu(self) -> bool:
        """Resolve ``use_gpu``: whether indexes built from this config live on a GPU."""
        if self.use_gpu is True:
            if not gpu_available():
                raise RuntimeError(
                    "use_gpu=true but FAISS sees no GPU (it needs the faiss-gpu build and a CUDA device); "
                    "install the 'gpu' extra in place of faiss-cpu, or set use_gpu to 'auto' or false"
                )
            return True
        return self.use_gpu == "auto" and self.kind not in CPU_ONLY_KINDS and gpu_available()
