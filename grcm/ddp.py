"""Multi-process (DDP) helpers: a replica-consistency check for any LightningModule.

Under ``strategy=ddp`` every rank holds a full replica of the model. Gradients
are all-reduced, so replicas stay equal as long as every state change outside
the optimizer step (K-Means initialisation, dead-code restarts, buffers) is made
once and broadcast. :class:`ReplicaConsistencyCheck` verifies exactly that: at
the start of every training epoch (the state after the previous epoch's
end-of-epoch work) and when training ends, each rank fingerprints its parameters,
buffers and optimizer state; rank 0 compares the fingerprints of all ranks.

Add it to a run with ``--trainer.callbacks+=grcm.ddp.ReplicaConsistencyCheck``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from grcm.errors import GrcmError
from grcm.io import write_json_atomic

__all__ = ["ReplicaConsistencyCheck", "ReplicaMismatchError", "mismatched_entries", "state_fingerprint"]


def is_rank_zero(module: L.LightningModule) -> bool:
    """Whether ``module`` runs on global rank 0 (True outside a trainer)."""
    return module._trainer is None or module.trainer.is_global_zero


def broadcast_from_rank_zero(module: L.LightningModule, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank of ``module``'s trainer (``obj`` itself in a single process)."""
    if module._trainer is None or module.trainer.world_size <= 1:
        return obj
    return module.trainer.strategy.broadcast(obj, src=0)


class ReplicaMismatchError(GrcmError):
    """DDP replicas disagree: some state was changed on one rank without being broadcast."""


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    header = f"{data.dtype}|{tuple(data.shape)}|".encode()
    return hashlib.sha256(header + data.numpy().tobytes()).hexdigest()[:16]


def _walk(prefix: str, value: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from _walk(f"{prefix}.{key}" if prefix else str(key), value[key])
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk(f"{prefix}[{index}]", item)
    elif isinstance(value, (int, float, bool, str)) or value is None:
        yield prefix, value


def state_fingerprint(module: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> dict[str, str]:
    """One short SHA-256 per tensor (and plain value) of the module's state dict and the optimizers' states.

    Returns ``{"model.<name>": digest, "optimizer0.state.<i>.exp_avg": digest, ...}``; two replicas are
    bit-identical exactly when their fingerprints are equal.
    """
    entries = {f"model.{name}": tensor for name, tensor in module.state_dict().items()}
    for index, optimizer in enumerate(optimizers):
        state = optimizer.state_dict()
        entries.update(dict(_walk(f"optimizer{index}.state", state["state"])))
        entries.update(dict(_walk(f"optimizer{index}.lr", [group.get("lr") for group in state["param_groups"]])))
    return {
        name: _tensor_digest(value) if isinstance(value, torch.Tensor) else repr(value)
        for name, value in entries.items()
    }


def mismatched_entries(fingerprints: list[dict[str, str]]) -> list[str]:
    """Names whose digest differs between any rank and rank 0 (or that a rank lacks), sorted."""
    reference = fingerprints[0]
    names = set().union(*fingerprints)
    return sorted(name for name in names if any(fp.get(name) != reference.get(name) for fp in fingerprints))


class ReplicaConsistencyCheck(L.Callback):
    """Check that all DDP replicas hold bit-identical model and optimizer state.

    Checked at the start of every training epoch (after K-Means initialisation for
    epoch 0, after the previous epoch's end-of-epoch updates otherwise) and at the
    end of training. In a single process it only records the fingerprint.

    Args:
        out: optional JSON file rank 0 writes (atomically) after every check:
            ``[{"when": "epoch_start"|"train_end", "epoch": int, "global_step": int,
            "world_size": int, "mismatched": [names], "fingerprint": sha256 of rank 0's state}, ...]``.
        raise_on_mismatch: raise :class:`ReplicaMismatchError` naming the diverged tensors.
    """

    def __init__(self, out: str | None = None, raise_on_mismatch: bool = True) -> None:
        super().__init__()
        self.out = out
        self.raise_on_mismatch = raise_on_mismatch
        self.records: list[dict[str, Any]] = []

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        fingerprint = state_fingerprint(pl_module, trainer.optimizers)
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            fingerprints: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(fingerprints, fingerprint)
        else:
            fingerprints = [fingerprint]
        mismatched = mismatched_entries(fingerprints)
        summary = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        record = {
            "when": when,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "world_size": len(fingerprints),
            "mismatched": mismatched,
            "fingerprint": summary,
        }
        self.records.append(record)
        if self.out is not None and trainer.is_global_zero:
            write_json_atomic(Path(self.out), self.records)
        if mismatched and self.raise_on_mismatch:
            shown = ", ".join(mismatched[:8]) + (" ..." if len(mismatched) > 8 else "")
            raise ReplicaMismatchError(
                f"DDP replicas differ at {when} of epoch {trainer.current_epoch} in {len(mismatched)} entries "
                f"({shown}); a state change made on one rank must be broadcast from rank 0"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module, "epoch_start")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module, "train_end")
