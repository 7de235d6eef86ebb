"""Dense nearest-neighbour index over item features: a thin wrapper over FAISS.

One API for six FAISS index families, chosen by :class:`DenseIndexConfig`:

* ``flat``     exact search (``IndexFlat``), the reference;
* ``ivf_flat`` inverted lists over K-Means cells, full vectors (``IndexIVFFlat``);
* ``ivf_pq``   inverted lists with product-quantised codes (``IndexIVFPQ``), the compact one;
* ``hnsw``     graph search over full vectors (``IndexHNSWFlat``), CPU only;
* ``sq8``      every vector as 8-bit scalar-quantised codes, scanned exhaustively
  (``IndexScalarQuantizer``), CPU only;
* ``pq``       every vector as product-quantised codes, scanned exhaustively (``IndexPQ``), CPU only.

``sq8`` and ``pq`` are compact *stores* rather than fast searchers: the two-stage
reranker keeps its item embeddings in them and scores candidates from the
decoded vectors (:meth:`DenseIndex.reconstruct`).

Scores returned by :meth:`DenseIndex.search` are always "higher is better":
the inner product for ``metric="ip"``, the cosine for ``metric="cosine"``
(vectors are L2-normalised on the way in) and the *negative squared* Euclidean
distance for ``metric="l2"``. Missing results (k larger than what the index can
return) have item index ``-1`` and score ``-inf``.

GPU indexes are used when FAISS was built with GPU support and a CUDA device is
visible (install the ``gpu`` extra in place of ``faiss-cpu``); everything else,
including saving, works the same on both.

The build recipe, :class:`~grcm.rerank.index_config.DenseIndexConfig`, lives in
:mod:`grcm.rerank.index_config` and FAISS' GPU and thread handling in
:mod:`grcm.rerank.faiss_runtime`; both stay importable from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from grcm.io import atomic_path, write_json_atomic
from grcm.rerank.faiss_runtime import GPU_MAX_K, faiss_threads, gpu_available, gpu_resources
from grcm.rerank.index_config import PQ_KINDS, DenseIndexConfig, auto_nlist, auto_pq_m

__all__ = ["DenseIndex", "DenseIndexConfig", "auto_nlist", "auto_pq_m", "gpu_available", "sidecar_path"]

FORMAT_VERSION = 1
MAX_POINTS_PER_CENTROID = 256  # FAISS K-Means subsamples to this many points per centroid anyway
SQ_TRAIN_ROWS = 262_144  # sq8 learns each dimension's min/max: a large sample, clipping stays rare
ADD_CHUNK_ROWS = 65_536  # rows converted to float32 at a time, so memmaps are never copied whole


def sidecar_path(index_path: str | Path) -> Path:
    """The JSON file that sits beside a saved index (``items.faiss`` -> ``items.faiss.json``)."""
    index_path = Path(index_path)
    return index_path.with_name(index_path.name + ".json")


def _as_matrix(array: Any, name: str) -> np.ndarray:
    """A 2-D array view of ``array`` (torch tensors are moved to CPU numpy); dtype is left alone."""
    if hasattr(array, "detach"):
        tensor = array.detach().cpu()
        array = (tensor.float() if str(tensor.dtype) == "torch.bfloat16" else tensor).numpy()
    array = np.asarray(array) if not isinstance(array, np.ndarray) else array
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, dim), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array


def _float32_rows(
    array: np.ndarray, name: str, start: int, normalize: bool, row_numbers: np.ndarray | None = None
) -> np.ndarray:
    """Contiguous float32 copy of a block of rows, checked for NaN/inf and optionally L2-normalised.

    ``start`` (or ``row_numbers``, for a gathered sample) maps block rows back to rows of ``name``
    in error messages.
    """
    block = np.array(array, dtype=np.float32, order="C", copy=True)
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
        first_bad = int(np.flatnonzero(~finite)[0])
        bad = int(row_numbers[first_bad]) if row_numbers is not None else start + first_bad
        raise ValueError(f"{name} row {bad} contains NaN or inf; clean the features or drop that row")
    if normalize:
        faiss.normalize_L2(block)
    return block


class DenseIndex:
    """A built FAISS index over ``num_items`` vectors of ``dim`` dimensions.

    Row i of the features given to :meth:`build` is item index i. Build with
    :meth:`build`, search with :meth:`search`, persist with :meth:`save` / :meth:`load`.
    """

    def __init__(self, index: Any, config: DenseIndexConfig, on_gpu: bool) -> None:
        self.index = index
        self.config = config
        self.on_gpu = on_gpu
        self._apply_search_params()

    # ------------------------------------------------------------------ build

    @classmethod
    def build(cls, features: Any, config: DenseIndexConfig | None = None) -> DenseIndex:
        """Train (when needed) and fill an index.

        Args:
            features: (N, D) array of item vectors, any real dtype (float16 memmaps are read
                in blocks, never copied whole); a torch tensor also works.
            config: how to build; defaults to an exact inner-product index.

        Returns:
            The index; ``index.config`` has ``nlist``/``pq_m`` resolved.
        """
        features = _as_matrix(features, "features")
        num_items, dim = features.shape
        if num_items == 0 or dim == 0:
            raise ValueError(
                f"features must have at least one row and one column, got shape {features.shape}"
            )
        config = (config or DenseIndexConfig()).resolve(num_items, dim)
        normalize = config.metric == "cosine"
        on_gpu = config.wants_gpu()
        index = faiss.index_factory(dim, config.factory_string(), config.faiss_metric)
        if config.kind == "hnsw":
            index.hnsw.efConstruction = config.ef_construction
        if config.kind in PQ_KINDS:
            # Polysemous code ordering only serves Hamming-distance filtering, which search
            # never uses, and it multiplies training time by ~20.
            index.do_polysemous_training = False
        with faiss_threads(config.num_threads):
            if on_gpu:
                index = faiss.index_cpu_to_gpu(gpu_resources(config.gpu_device), config.gpu_device, index)
            if not index.is_trained:
                index.train(cls._training_sample(features, config, normalize))
            for start in range(0, num_items, ADD_CHUNK_ROWS):
                index.add(
                    _float32_rows(features[start : start + ADD_CHUNK_ROWS], "features", start, normalize)
                )
        return cls(index, config, on_gpu)

    @staticmethod
    def _training_sample(features: np.ndarray, config: DenseIndexConfig, normalize: bool) -> np.ndarray:
        """Float32 (T, D) rows to train IVF/PQ on: ``train_size`` rows, or as many as FAISS would use."""
        num_items = features.shape[0]
        if config.train_size is not None:
            size = min(num_items, config.train_size)
        elif config.kind == "sq8":
            size = min(num_items, SQ_TRAIN_ROWS)
        else:
            centroids = max(config.nlist or 1, 2**config.pq_bits if config.kind in PQ_KINDS else 1)
            size = min(num_items, MAX_POINTS_PER_CENTROID * centroids)
        if size == num_items:
            return _float32_rows(features, "features", 0, normalize)
        rows = np.sort(np.random.default_rng(config.seed).choice(num_items, size, replace=False))
        return _float32_rows(features[rows], "features", 0, normalize, row_numbers=rows)

    # ------------------------------------------------------------------ search

    @property
    def num_items(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        device = f"cuda:{self.config.gpu_device}" if self.on_gpu else "cpu"
        return (
            f"DenseIndex({self.config.factory_string()}, metric={self.config.metric}, "
            f"num_items={self.num_items}, dim={self.dim}, device={device})"
        )

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the speed/accuracy knobs of a built index (``nprobe`` for IVF, ``ef_search`` for HNSW)."""
        changes = {
            name: value for name, value in (("nprobe", nprobe), ("ef_search", ef_search)) if value is not None
        }
        self.config = replace(self.config, **changes)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        config = self.config
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        if config.kind in ("ivf_flat", "ivf_pq"):
            space.set_index_parameter(self.index, "nprobe", min(config.nprobe, config.nlist or config.nprobe))
        elif config.kind == "hnsw":
            space.set_index_parameter(self.index, "efSearch", config.ef_search)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best items per query.

        Args:
            queries: (Q, D) array (or torch tensor) of query vectors in the item space.
            k: results per query, >= 1.

        Returns:
            ``(scores, item_indices)``: float32 (Q, k), higher is better (see module
            docstring), and int64 (Q, k) item indices; missing results are ``-1`` / ``-inf``.
        """
        queries = _as_matrix(queries, "queries")
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"queries have {queries.shape[1]} dimensions but the index holds {self.dim}-d vectors; "
                "encode queries into the same space as the indexed items"
            )
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.on_gpu and k > GPU_MAX_K:
            raise ValueError(f"FAISS GPU indexes return at most k={GPU_MAX_K} results, got k={k}")
        vectors = _float32_rows(queries, "queries", 0, self.config.metric == "cosine")
        if vectors.shape[0] == 0:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        with faiss_threads(self.config.num_threads):
            distances, labels = self.index.search(vectors, k)
        scores = -distances if self.config.metric == "l2" else distances
        scores = np.where(labels < 0, -np.inf, scores).astype(np.float32)
        return scores, labels.astype(np.int64)

    def reconstruct(self, item_indices: Any) -> np.ndarray:
        """The stored vectors of some items, decoded from the index's codes.

        Exact for ``flat`` (and ``hnsw``/``ivf_flat``); the quantised approximation for
        ``sq8``, ``pq`` and ``ivf_pq``. With ``metric="cosine"`` the vectors are the
        L2-normalised ones that were indexed.

        Args:
            item_indices: (M,) integer item indices in ``[0, num_items)``; repeats allowed.

        Returns:
            float32 (M, dim) array, row j is the vector of ``item_indices[j]``.
        """
        if hasattr(item_indices, "detach"):
            item_indices = item_indices.detach().cpu().numpy()
        ids = np.ascontiguousarray(np.asarray(item_indices).reshape(-1), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_items):
            raise ValueError(
                f"item indices span [{ids.min()}, {ids.max()}] but the index holds items [0, {self.num_items}); "
                "the indices and the index must come from the same corpus"
            )
        index = self._cpu_index()
        if self.config.kind in ("ivf_flat", "ivf_pq"):
            faiss.extract_index_ivf(index).make_direct_map()  # id -> (list, offset); no-op once built
        if ids.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with faiss_threads(self.config.num_threads):
            return index.reconstruct_batch(ids)

    # ------------------------------------------------------------------ size, save, load

    @property
    def code_bytes_per_item(self) -> int:
        """Bytes of one item's stored code: ``4 * dim`` for flat, ``dim`` for sq8,
        ``ceil(pq_m * pq_bits / 8)`` for pq (IVF kinds add the cell number). Codebooks,
        inverted-list ids and HNSW links are not counted; :attr:`bytes_per_item` counts them."""
        index = self._cpu_index()
        if self.config.kind == "hnsw":
            index = faiss.downcast_index(index.storage)
        return int(index.sa_code_size())

    def _cpu_index(self) -> Any:
        return faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index

    def nbytes(self) -> int:
        """Size of the serialised index in bytes (what :meth:`save` writes)."""
        return int(faiss.serialize_index(self._cpu_index()).nbytes)

    @property
    def bytes_per_item(self) -> float:
        return self.nbytes() / max(self.num_items, 1)

    def save(self, path: str | Path) -> Path:
        """Write the index to ``path`` and its config to :func:`sidecar_path` (both atomically).

        GPU indexes are copied to CPU first, so any machine can load the file.
        """
        path = Path(path)
        with atomic_path(path) as tmp:
            faiss.write_index(self._cpu_index(), str(tmp))
        write_json_atomic(
            sidecar_path(path),
            {
                "format_version": FORMAT_VERSION,
                "config": asdict(self.config),
                "num_items": self.num_items,
                "dim": self.dim,
                "factory": self.config.factory_string(),
                "index_file_bytes": path.stat().st_size,
                "faiss_version": faiss.__version__,
            },
        )
        return path

    @classmethod
    def load(
        cls, path: str | Path, expected_dim: int | None = None, use_gpu: bool | Literal["auto"] | None = None
    ) -> DenseIndex:
        """Read an index written by :meth:`save`.

        Args:
            path: the index file (its ``.json`` sidecar must sit beside it).
            expected_dim: when given, the feature dimension the caller will query with.
            use_gpu: override the saved ``use_gpu`` (e.g. ``False`` to load a GPU-built index on CPU).
        """
        path = Path(path)
        meta_path = sidecar_path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no FAISS index at {path}; build one with DenseIndex.build(...).save(path)"
            )
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} is missing; it is written by DenseIndex.save next to the index"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{meta_path} is not valid JSON ({error}); re-save the index") from error
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path} has format_version {meta.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; rebuild the index"
            )
        known = {field.name for field in fields(DenseIndexConfig)}
        unknown = set(meta.get("config", {})) - known
        if unknown:
            raise ValueError(f"{meta_path} config has unknown fields {sorted(unknown)}; rebuild the index")
        config = DenseIndexConfig(**meta["config"])
        if use_gpu is not None:
            config = replace(config, use_gpu=use_gpu)
        if path.stat().st_size != meta.get("index_file_bytes"):
            raise ValueError(
                f"{path} has {path.stat().st_size} bytes but {meta_path} records {meta.get('index_file_bytes')}; "
                "the index and its sidecar come from different saves, save them again together"
            )
        index = faiss.read_index(str(path))
        if index.ntotal != meta["num_items"] or index.d != meta["dim"]:
            raise ValueError(
                f"{path} holds {index.ntotal} vectors of {index.d} dimensions but {meta_path} records "
                f"{meta['num_items']} of {meta['dim']}; save the index again"
            )
        if expected_dim is not None and index.d != int(expected_dim):
            raise ValueError(
                f"{path} indexes {index.d}-d vectors but the features here are {expected_dim}-d; "
                "rebuild the index from the current features"
            )
        on_gpu = config.wants_gpu()
        if on_gpu:
            index = faiss.index_cpu_to_gpu(gpu_resources(config.gpu_device), config.gpu_device, index)
        return cls(index, config, on_gpu)
