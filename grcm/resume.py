"""Exact resume: a fit restarted from a mid-epoch checkpoint continues as if never stopped.

Lightning restores weights, optimizer, LR scheduler and loop counters. Two more
things decide what the next training step computes, and both live here:

* **Data order.** :class:`ResumableSampler` shuffles with a permutation that
  depends only on ``(seed, epoch)`` (the :class:`DistributedSampler` rule, so one
  and N processes use the same code path) and, for the epoch a fit resumes in,
  starts after the batches already completed.
* **Random state** (dropout masks, R-Drop): :func:`rng_state` captures the torch,
  CUDA, numpy and Python generators of every rank when a checkpoint is written;
  :func:`set_rng_state` puts them back right before the first resumed training step.

:class:`~grcm.data.datamodules.RetrievalDataModule` wires both in, so every
model trained on it resumes exactly with ``--ckpt_path=last``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableDataLoader", "ResumableSampler", "gather_rng_states", "rng_state", "set_rng_state"]


class ResumableSampler(DistributedSampler):
    """Epoch-seeded shuffling, sharded over ``num_replicas`` ranks, that starts where the training loop stands.

    The order of epoch ``e`` is ``DistributedSampler``'s (a permutation seeded by
    ``seed + e``, padded to a multiple of the world size, rank ``r`` taking every
    ``num_replicas``-th index). Lightning calls :meth:`set_epoch` at every epoch
    and leaves a ``DistributedSampler`` in place under DDP.

    Each iteration first asks ``batches_done()`` how many batches of this epoch the
    training loop has already run (0 at an epoch start, N after resuming from a
    checkpoint written after batch N) and skips their samples, so a resumed epoch
    continues with exactly the batches an uninterrupted one would have seen. The
    question is asked when iteration starts, not when the sampler is built: Lightning
    may build the loader before it restores the loop state.

    Args:
        dataset: anything with ``len()``.
        num_replicas: world size (1 in a single process).
        rank: this process's global rank.
        seed: shuffling seed, shared by all ranks.
        batch_size: samples per batch on this rank.
        batches_done: callable returning the batches of the current epoch already run (None: always 0).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        batch_size: int = 1,
        batches_done: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.batch_size = int(batch_size)
        self.batches_done = batches_done

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        done = int(self.batches_done()) if self.batches_done is not None else 0
        return iter(indices[done * self.batch_size :])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler`, marked resumable for Lightning.

    Its position needs no state of its own (the sampler asks the fit loop), so ``state_dict`` is
    empty; having the methods tells Lightning the loader resumes mid-epoch correctly.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


def rng_state() -> dict[str, Any]:
    """This process's random state: torch CPU (and CUDA) generators, numpy's global one, Python's ``random``."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # plain types and tensors only, so checkpoints still load with weights_only=True
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state returned by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, indexed by rank (a collective under DDP: call it on all ranks)."""
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states
