"""GRDR's level-by-level training schedule: which phase runs in which epoch, with what weights and what frozen.

Schedule ``"joint"`` (GRDR): for each level l = 0 .. L-1, three phases

1. ``pretrain``: query-item InfoNCE and the code loss on the levels already built;
   the decoder is frozen (no SID loss yet). Levels ``0 .. l-1`` are active.
2. ``main``: starts by K-Means-initialising codebook l from the level-l residuals;
   every loss, everything trains. Levels ``0 .. l`` are active.
3. ``fit``: the tokenizer (view encoders/decoders, query projection and the codebooks,
   i.e. also the decoder's shared embeddings and heads) is frozen; the retriever learns
   the now fixed SIDs.

Schedule ``"frozen_tokenizer"`` (ablation): per level one ``tokenize`` phase (K-Means
init, reconstruction + VQ + code loss + view separation; the retriever frozen),
then one ``fit`` phase over all levels with the tokenizer frozen: the tokenizer is
trained on its own and never sees the retrieval loss.

Loss names: ``infonce`` (retriever query vs routed view latent), ``sid`` (SID
cross-entropy), ``code`` (earlier-level code loss against drift), ``recon``, ``vq``.
Parameter groups: ``tokenizer`` (view encoders/decoders, query projection),
``codebooks``, ``encoder`` (the retriever's query encoder and query head),
``decoder`` (the rest of the retriever).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LOSSES = ("infonce", "sid", "code", "recon", "vq")
GROUPS = ("tokenizer", "codebooks", "encoder", "decoder")
SCHEDULES = ("joint", "frozen_tokenizer")

#: GRDR's loss weights per phase (DESIGN.md section 2), ``tokenize`` is the ablation's own.
DEFAULT_PHASE_WEIGHTS: dict[str, dict[str, float]] = {
    "pretrain": {"infonce": 0.5, "sid": 0.0, "code": 0.5, "recon": 0.0, "vq": 0.0},
    "main": {"infonce": 0.2, "sid": 0.5, "code": 0.8, "recon": 0.1, "vq": 0.3},
    "fit": {"infonce": 0.0, "sid": 1.0, "code": 1.0, "recon": 0.0, "vq": 0.0},
    "tokenize": {"infonce": 0.0, "sid": 0.0, "code": 0.5, "recon": 1.0, "vq": 1.0},
}

#: Which parameter groups train in each phase.
TRAINABLE: dict[str, dict[str, bool]] = {
    "pretrain": {"tokenizer": True, "codebooks": True, "encoder": True, "decoder": False},
    "main": {"tokenizer": True, "codebooks": True, "encoder": True, "decoder": True},
    "fit": {"tokenizer": False, "codebooks": False, "encoder": True, "decoder": True},
    "tokenize": {"tokenizer": True, "codebooks": True, "encoder": False, "decoder": False},
}


@dataclass(frozen=True)
class Phase:
    """One phase: epochs ``[start, end)``, SID ``level`` it builds, ``active_levels`` it trains/decodes."""

    index: int
    name: str
    level: int
    start: int
    end: int

    @property
    def active_levels(self) -> int:
        return self.level if self.name == "pretrain" else self.level + 1

    @property
    def initialises_level(self) -> bool:
        """Whether the phase starts by K-Means-initialising codebook ``level``."""
        return self.name in ("main", "tokenize")

    def __str__(self) -> str:
        return f"phase {self.index} '{self.name}' level {self.level} (epochs {self.start}-{self.end - 1})"


def _per_level(value: int | Sequence[int], levels: int, name: str) -> list[int]:
    values = [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]
    if len(values) != levels or any(v < 0 for v in values):
        raise ValueError(f"{name} must be one non-negative epoch count or one per level ({levels}); got {value}")
    return values


def build_schedule(
    num_levels: int,
    schedule: str = "joint",
    pretrain_epochs: int | Sequence[int] = 1,
    main_epochs: int | Sequence[int] = 1,
    fit_epochs: int | Sequence[int] = 1,
) -> list[Phase]:
    """Phases in order (zero-length phases are dropped).

    ``frozen_tokenizer`` uses ``main_epochs`` for its ``tokenize`` phases and ``sum(fit_epochs)``
    for its final ``fit``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    pre = _per_level(pretrain_epochs, num_levels, "pretrain_epochs")
    main = _per_level(main_epochs, num_levels, "main_epochs")
    fit = _per_level(fit_epochs, num_levels, "fit_epochs")
    if schedule == "joint":
        plan = [(name, level, n[level]) for level in range(num_levels) for name, n in
                (("pretrain", pre), ("main", main), ("fit", fit))]
    else:
        plan = [("tokenize", level, max(main[level], 1)) for level in range(num_levels)]
        plan.append(("fit", num_levels - 1, max(sum(fit), 1)))
    if schedule == "joint" and any(m == 0 for m in main):
        raise ValueError(f"main_epochs must be > 0 for every level (it initialises that level's codebook); got {main}")
    phases, epoch = [], 0
    for name, level, epochs in plan:
        if epochs:
            phases.append(Phase(len(phases), name, level, epoch, epoch + epochs))
            epoch += epochs
    return phases


def phase_at(phases: Sequence[Phase], epoch: int) -> Phase:
    """The phase that runs at ``epoch`` (epochs past the schedule stay in the last phase)."""
    for phase in phases:
        if epoch < phase.end:
            return phase
    return phases[-1]


def resolve_weights(overrides: Mapping[str, Mapping[str, float]] | None) -> dict[str, dict[str, float]]:
    """GRDR's defaults with ``overrides[phase][loss]`` applied; unknown names raise."""
    weights = {phase: dict(values) for phase, values in DEFAULT_PHASE_WEIGHTS.items()}
    for phase, values in (overrides or {}).items():
        if phase not in weights:
            raise ValueError(f"phase_weights: unknown phase {phase!r}; phases are {list(weights)}")
        for loss, weight in values.items():
            if loss not in LOSSES:
                raise ValueError(f"phase_weights.{phase}: unknown loss {loss!r}; losses are {list(LOSSES)}")
            weights[phase][loss] = float(weight)
    return weights
