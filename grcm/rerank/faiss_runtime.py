"""FAISS' runtime around a dense index: GPU detection, per-device GPU resources, OpenMP thread limits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import faiss

__all__ = ["GPU_MAX_K", "faiss_threads", "gpu_available", "gpu_resources"]

GPU_MAX_K = 2048  # largest k FAISS GPU indexes search for


def gpu_available() -> bool:
    """Whether this FAISS build has GPU support and sees at least one CUDA device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@contextmanager
def faiss_threads(num_threads: int | None) -> Iterator[None]:
    """Let FAISS use ``num_threads`` OpenMP threads inside the block (None: leave FAISS' setting alone)."""
    if num_threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(num_threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


_GPU_RESOURCES: dict[int, Any] = {}


def gpu_resources(device: int) -> Any:
    """One ``StandardGpuResources`` per device, kept alive for every index that uses it."""
    if device not in _GPU_RESOURCES:
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return _GPU_RESOURCES[device]
