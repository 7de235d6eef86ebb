"""The stage-1 pool a two-stage evaluation reranks: taken from the retriever's step output, or decoded.

:func:`stage1_pool` reads the candidates a generative retriever's ``validation_step`` / ``test_step``
returned (``{"candidates", "candidate_scores", "beam_size", "recall_levels", "decode_seconds"}``, see
:class:`~grcm.retriever.sid_retrieval.SIDRetrievalModule`), checks that they were decoded with the beam
size and SID levels the caller asked for, and decodes them itself for a module whose steps return none, or
when the fused score leaves out the last SID level (``exclude_last_level``: ACE's unique token, whose code
only tells colliding items apart). A decoded pool scores each item as the retriever's ``item_score`` does
(``max``: its best beam; ``logsumexp``: the log-sum-exp over the beams that reach it).
:func:`cap_pool` keeps each query's first ``max_items`` distinct candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from grcm.decoding import beams_to_scored_items
from grcm.decoding.beam import BeamSearchOutput
from grcm.errors import GrcmError
from grcm.metrics import deduplicate_ranked

__all__ = ["cap_pool", "require_unique_last_level", "stage1_pool", "without_last_level"]


def _check_reported(name: str, outputs: Mapping[str, Any], beam_size: int | None,
                    recall_levels: int | None) -> int:
    """The beam size of the step's candidates, after checking it and their SID levels against the callback's."""
    levels = outputs.get("recall_levels")
    if recall_levels is not None and levels != recall_levels:
        raise GrcmError(
            f"TwoStageEvaluation.recall_levels={recall_levels} but {name} decoded recall_levels={levels}; the "
            f"candidates are decoded once, by the retriever, so set model.init_args.recall_levels={recall_levels} "
            "(or leave the callback's recall_levels unset to follow the retriever)"
        )
    reported = outputs.get("beam_size")
    reported = None if reported is None else int(reported)
    if beam_size is not None and reported is not None and reported != beam_size:
        raise GrcmError(
            f"TwoStageEvaluation.beam_size={beam_size} but {name} decoded its candidates with "
            f"beam_size={reported}; the candidates are decoded once, by the retriever, so set "
            f"model.init_args.beam_size={beam_size} (or leave the callback's beam_size unset to follow the retriever)"
        )
    beam = reported if reported is not None else beam_size
    if beam is None:
        raise GrcmError(f"{name} returned candidates without their beam_size; set TwoStageEvaluation.beam_size")
    return beam


def stage1_pool(
    pl_module: Any,
    outputs: Any,
    batch: Mapping[str, Tensor],
    *,
    beam_size: int | None,
    recall_levels: int | None,
    generative_weight: float,
    now: Callable[[], float],
    batch_started: float,
    exclude_last_level: bool = False,
) -> tuple[Tensor, Tensor | None, float, int]:
    """Stage-1 candidates (B, M) of the batch, their beam scores (B, M) when known, the stage-1 seconds they
    cost and their beam size.

    Args:
        pl_module: the retriever; decoded with only when ``outputs`` holds no ``"candidates"``.
        outputs: what its validation/test step returned.
        batch: the batch (``input_ids``, ``attention_mask``).
        beam_size, recall_levels: what the caller expects (None: follow the retriever).
        generative_weight: > 0 needs the candidates' beam scores.
        now: the caller's clock; ``batch_started``: its time at batch start (stage-1 time when the step
            reports no ``decode_seconds``: an upper bound).
        exclude_last_level: score each beam without its last level's log-probability (decodes here, since
            the step's scores include it).
    """
    name = type(pl_module).__name__
    if isinstance(outputs, Mapping) and "candidates" in outputs and not exclude_last_level:
        beam = _check_reported(name, outputs, beam_size, recall_levels)
        seconds = outputs.get("decode_seconds")
        if seconds is None:
            seconds = now() - batch_started
        scores = outputs.get("candidate_scores")
        if scores is None and generative_weight:
            raise GrcmError(
                f"TwoStageEvaluation.generative_weight={generative_weight} fuses stage-1 scores, but {name} returns "
                "candidates without 'candidate_scores'; set generative_weight: 0 for this retriever"
            )
        return outputs["candidates"], scores, float(seconds), beam
    if not (hasattr(pl_module, "decode") and hasattr(pl_module, "trie")):
        raise TypeError(
            f"TwoStageEvaluation needs stage-1 candidates: {name}.validation_step/test_step "
            "must return {'candidates': LongTensor (B, M)}, or the module must offer "
            "decode(input_ids, attention_mask, beam_size) and trie like GenerativeRetriever"
        )
    beam = beam_size or getattr(getattr(pl_module, "hparams", {}), "beam_size", None)
    if beam is None:
        raise GrcmError(f"set TwoStageEvaluation.beam_size: {name} has no beam_size hyperparameter")
    if recall_levels is not None and getattr(pl_module, "recall_levels", None) != recall_levels:
        raise GrcmError(f"TwoStageEvaluation.recall_levels={recall_levels}: set the retriever's "
                        f"recall_levels={recall_levels} ({name} decodes its own levels)")
    start = now()
    output = pl_module.decode(batch["input_ids"], batch["attention_mask"], beam_size=int(beam))
    if exclude_last_level:
        output = without_last_level(output, name)
    hparams = getattr(pl_module, "hparams", {})
    recalled = beams_to_scored_items(output, getattr(pl_module, "recall_trie", None) or pl_module.trie,
                                     hparams.get("max_pool_items"), hparams.get("item_score", "max"))
    return recalled.items, recalled.scores, now() - start, int(beam)


def without_last_level(output: BeamSearchOutput, name: str = "the retriever") -> BeamSearchOutput:
    """The beams (B, K, L) rescored without the last level's log-probability, best first again (stable), so an
    item's best beam is the best by the new score."""
    if output.level_scores is None:
        raise GrcmError(f"{name}.decode returned beams without per-level scores; the fused score cannot leave out "
                        "the unique level (set TwoStageEvaluation.exclude_unique_level: false)")
    live = output.scores > float("-inf")
    scores = output.level_scores[..., :-1].sum(dim=-1).masked_fill(~live, float("-inf"))
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    sequences = output.sequences.gather(1, order[..., None].expand_as(output.sequences))
    levels = output.level_scores[..., :-1]
    return BeamSearchOutput(sequences, scores, levels.gather(1, order[..., None].expand_as(levels)))


def require_unique_last_level(pl_module: Any) -> None:
    """For ``TwoStageEvaluation.exclude_unique_level``: ``pl_module`` decodes full SIDs whose last level is ACE's
    unique token; anything else is a one-line :class:`GrcmError` naming the fix."""
    name = type(pl_module).__name__
    bundle = getattr(pl_module, "sid_bundle", None)
    level_names = (getattr(bundle, "config", None) or {}).get("level_names") or []
    if not level_names or level_names[-1] != "unique":
        raise GrcmError(
            f"TwoStageEvaluation.exclude_unique_level: {name}'s SIDs have no unique-token level (levels "
            f"{level_names or 'unnamed'}); it applies to an ACE bundle with unique_token: true, so set "
            "exclude_unique_level: false"
        )
    if getattr(pl_module, "recall_levels", None) is not None:
        raise GrcmError(f"TwoStageEvaluation.exclude_unique_level: {name} decodes SID prefixes "
                        "(recall_levels), which hold no unique level; set exclude_unique_level: false")


def cap_pool(candidates: Tensor, scores: Tensor | None, max_items: int | None) -> tuple[Tensor, Tensor | None]:
    """Each row's first ``max_items`` distinct candidates (stage-1 order) and their scores; unchanged for None.

    Args:
        candidates: (B, M) item indices, ``-1`` padded, repeats allowed.
        scores: (B, M) their beam scores, or None.
    """
    if max_items is None:
        return candidates, scores
    if scores is None:
        return deduplicate_ranked(candidates)[:, :max_items], None
    candidates, scores = deduplicate_ranked(candidates, scores.to(candidates.device))
    return candidates[:, :max_items], scores[:, :max_items]

