"""Exact, batched beam search over SID levels, optionally constrained by a trie.

Semantics (the same as transformers' beam search with
``prefix_allowed_tokens_fn``, ``length_penalty=0`` and a fixed length ``L``):

* at level ``t`` the model's logits over the level's full code range are cast
  to float32 and go through ``log_softmax`` *before* masking; invalid codes are then set to
  ``-inf`` and nothing is renormalised, so a beam's score is the sum of its
  codes' log-probabilities under the unconstrained model;
* only beam 0 is live at level 0 (the others start at ``-inf``), so the
  first level fills the beams with distinct codes;
* when fewer than ``K`` valid continuations exist, the missing beams keep
  score ``-inf``; their sequences are reported as ``-1`` rows and they map to
  no item.

Ties are broken deterministically: candidates are ranked by score
(descending), then by parent beam index, then by code (both ascending); this
is the order of a stable descending sort over the flattened ``(beam, code)``
candidates of a query.

The loop runs over the ``L`` levels only. Every step is a handful of tensor
operations on ``(B*K, V_t)`` blocks on the model's device, with no Python loop
over queries or beams and no host synchronisation; one check at the end raises
:class:`DecodingError` if NaN logits reached the scores (they would otherwise
leave every beam empty without a word).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from grcm.decoding.trie import SIDTrie
from grcm.errors import GrcmError
from grcm.metrics import deduplicate_ranked

StepFn = Callable[[Tensor], Tensor]
"""``step_fn(prefix: LongTensor (B*K, t)) -> FloatTensor (B*K, V_t)`` logits for level ``t``.

Rows are batch-major: row ``b * K + k`` is beam ``k`` of query ``b``. Beams
with score ``-inf`` are passed too (with in-range codes) so shapes stay static.

A stateful step function (one that caches per-beam state, such as
:class:`grcm.retriever.incremental.IncrementalStep`) may also define
``reorder(rows: LongTensor (B*K,))``: after every level but the last, the
search calls it with the parent row of every new beam row, so that the state
follows the beams (new row ``r`` continues old row ``rows[r]``).
"""


class DecodingError(GrcmError, FloatingPointError):
    """The model produced NaN logits while decoding (e.g. a diverged or corrupted checkpoint)."""


@dataclass(frozen=True)
class BeamSearchOutput:
    """Result of a beam search.

    Attributes:
        sequences: ``(B, K, L)`` long codes, beams ranked best first; ``-1`` rows for
            beams whose score is ``-inf`` (fewer than ``K`` valid SIDs).
        scores: ``(B, K)`` float, sum of per-level log-probabilities, descending.
        level_scores: ``(B, K, L)`` float, each level's log-probability (summing to ``scores``), or None when
            the producer did not record them.
    """

    sequences: Tensor
    scores: Tensor
    level_scores: Tensor | None = None


@dataclass(frozen=True)
class RankedItems:
    """Items recalled by a beam search.

    Attributes:
        items: ``(B, M)`` long item indices, best first, padded with ``-1``.
        scores: ``(B, M)`` float score of the beam that recalled each item, ``-inf`` on padding.
    """

    items: Tensor
    scores: Tensor


class BeamConstraint(Protocol):
    """Per-beam state machine that says which codes a beam may take next."""

    def initial_state(self, num_rows: int, device: torch.device) -> Tensor:
        """``(R,)`` state of an empty prefix."""
        ...

    def allowed(self, states: Tensor, prefix: Tensor, level: int) -> Tensor:
        """``(R, V_level)`` bool mask of allowed codes given ``(R,)`` states and ``(R, level)`` prefixes."""
        ...

    def advance(self, states: Tensor, codes: Tensor, level: int) -> Tensor:
        """``(R,)`` states after appending ``(R,)`` codes to prefixes in ``states``."""
        ...


class TrieConstraint:
    """Constraint that keeps every beam inside a :class:`SIDTrie` (state = trie state, -1 = dead)."""

    def __init__(self, trie: SIDTrie) -> None:
        self.trie = trie

    def initial_state(self, num_rows: int, device: torch.device) -> Tensor:
        return torch.zeros(num_rows, dtype=torch.long, device=device)

    def allowed(self, states: Tensor, prefix: Tensor, level: int) -> Tensor:
        return self.trie.valid_mask(states, level)

    def advance(self, states: Tensor, codes: Tensor, level: int) -> Tensor:
        return self.trie.advance(states, codes, level)


def beam_search(
    step_fn: StepFn,
    batch_size: int,
    beam_size: int,
    vocab_sizes: Sequence[int],
    constraint: BeamConstraint | None = None,
    device: torch.device | str | None = None,
) -> BeamSearchOutput:
    """Fixed-length beam search over ``L = len(vocab_sizes)`` levels.

    Args:
        step_fn: see :data:`StepFn`.
        batch_size: number of queries ``B``.
        beam_size: beams per query ``K``.
        vocab_sizes: ``L`` code ranges; ``step_fn`` must return ``V_t`` logits at level ``t``.
        constraint: allowed-code rule; ``None`` decodes unconstrained.
        device: where the search tensors live (the logits' device); defaults to CPU.

    ``step_fn`` is called once per level with all ``B*K`` rows, including beams whose
    score is ``-inf``, so its shapes never change. If it has a ``reorder`` method, that
    is called with the kept beams' parent rows after every level but the last.

    Returns:
        :class:`BeamSearchOutput` with ``sequences (B, K, L)``, ``scores (B, K)`` and ``level_scores (B, K, L)``.
    """
    if batch_size < 1 or beam_size < 1:
        raise ValueError(
            f"beam_search: batch_size and beam_size must be >= 1, got {batch_size} and {beam_size}"
        )
    device = torch.device("cpu") if device is None else torch.device(device)
    num_queries, num_beams = batch_size, beam_size
    num_rows = num_queries * num_beams
    row_base = torch.arange(num_queries, device=device)[:, None] * num_beams  # (B, 1)

    scores = torch.full((num_queries, num_beams), float("-inf"), device=device)
    scores[:, 0] = 0.0
    prefix = torch.zeros(num_rows, 0, dtype=torch.long, device=device)
    level_scores = torch.zeros(num_rows, 0, device=device)
    states = constraint.initial_state(num_rows, device) if constraint is not None else row_base.new_zeros(0)
    reorder = getattr(step_fn, "reorder", None)
    for level, size in enumerate(vocab_sizes):
        logits = step_fn(prefix)
        if logits.shape != (num_rows, size):
            raise ValueError(
                f"beam_search: step_fn returned logits of shape {tuple(logits.shape)} at level {level}; "
                f"expected (batch_size * beam_size, vocab_sizes[{level}]) = ({num_rows}, {size})"
            )
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if constraint is not None:
            log_probs = log_probs.masked_fill(~constraint.allowed(states, prefix, level), float("-inf"))
        candidates = (scores.reshape(num_rows, 1) + log_probs).reshape(num_queries, -1)
        scores, flat_index = stable_topk(candidates, num_beams)
        parent = flat_index // size
        codes = (flat_index % size).reshape(num_rows)
        rows = (row_base + parent).reshape(num_rows)
        prefix = torch.cat([prefix[rows], codes[:, None]], dim=1)
        chosen = log_probs.reshape(num_queries, -1).gather(1, flat_index).reshape(num_rows, 1)
        level_scores = torch.cat([level_scores[rows], chosen], dim=1)
        if constraint is not None:
            states = constraint.advance(states[rows], codes, level)
        if reorder is not None and level + 1 < len(vocab_sizes):
            reorder(rows)

    nan_queries = int(torch.isnan(scores).any(dim=1).sum())
    if nan_queries:
        raise DecodingError(
            f"beam_search: the model's logits contain NaN for {nan_queries} of {num_queries} queries, so their "
            "beams have no valid score; the model weights hold NaN/inf (diverged training or a corrupted "
            "checkpoint): check the training loss, lower the learning rate, or load another checkpoint."
        )
    live = scores > float("-inf")
    sequences = prefix.reshape(num_queries, num_beams, -1).masked_fill(~live[..., None], -1)
    level_scores = level_scores.reshape(num_queries, num_beams, -1).masked_fill(~live[..., None], float("-inf"))
    return BeamSearchOutput(sequences=sequences, scores=scores, level_scores=level_scores)


def constrained_beam_search(
    step_fn: StepFn,
    batch_size: int,
    beam_size: int,
    trie: SIDTrie,
    vocab_sizes: Sequence[int],
    constrained: bool = True,
) -> BeamSearchOutput:
    """Beam search whose beams stay inside ``trie`` (``constrained=False``: the ablation without it).

    Args:
        step_fn: see :data:`StepFn`; it must return logits on ``trie.device``.
        batch_size: number of queries ``B``.
        beam_size: beams per query ``K`` (ACE uses 5, 25 and 50).
        trie: the valid SIDs.
        vocab_sizes: ``L`` code ranges, equal to ``trie.vocab_sizes``.
        constrained: mask codes that leave the trie. Unconstrained beams may spell SIDs
            that are not in the trie; :func:`beams_to_items` maps those to no item.

    Returns:
        :class:`BeamSearchOutput` with ``sequences (B, K, L)`` and ``scores (B, K)``.
    """
    if tuple(int(v) for v in vocab_sizes) != trie.vocab_sizes:
        raise ValueError(
            f"constrained_beam_search: vocab_sizes {list(vocab_sizes)} differ from the trie's "
            f"{list(trie.vocab_sizes)}; build the trie from the same SID bundle as the model"
        )
    constraint = TrieConstraint(trie) if constrained else None
    return beam_search(step_fn, batch_size, beam_size, vocab_sizes, constraint, device=trie.device)


def stable_topk(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` per row, ties broken by the smaller column index.

    Args:
        values: ``(B, M)`` float scores (``-inf`` allowed), ``k <= M``.
        k: number of entries to keep.

    Returns:
        ``(B, k)`` values in descending order and their ``(B, k)`` long column indices;
        identical to ``values.sort(dim=1, descending=True, stable=True)[..., :k]``.

    Two linear-time ``topk`` passes replace the full sort: the first finds the
    ``k``-th value, the second picks every entry above it plus the leftmost
    entries equal to it (integer priorities, so no ties remain); a sort of the
    ``k`` winners then orders them.
    """
    width = values.shape[1]
    kth = values.topk(k, dim=1).values[:, -1:]
    column = torch.arange(width, device=values.device)
    priority = torch.where(
        values > kth, 2 * width - column, torch.where(values == kth, width - column, torch.zeros_like(column))
    )
    chosen = priority.topk(k, dim=1).indices.sort(dim=1).values  # column-ascending
    chosen_values = values.gather(1, chosen)
    order = chosen_values.sort(dim=1, descending=True, stable=True).indices
    return chosen_values.gather(1, order), chosen.gather(1, order)


ITEM_SCORES = ("max", "logsumexp")


def logsumexp_per_item(items: Tensor, scores: Tensor) -> Tensor:
    """Each entry's score replaced by the log-sum-exp of the scores of every entry of its item in its row.

    Args:
        items: (Q, K) item indices, ``-1`` = padding.
        scores: (Q, K) float scores of the entries (log-probabilities of the beams that reached them).

    Returns:
        (Q, K) float: for an item reached by several beams, log(sum_b exp(score_b)) on each of its entries;
        ``-inf`` on padding.
    """
    present = items >= 0
    keys = torch.where(present, items, torch.iinfo(items.dtype).max)
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)
    sorted_scores = scores.gather(1, order).masked_fill(~present.gather(1, order), float("-inf"))
    new_group = torch.ones_like(sorted_keys, dtype=torch.bool)
    new_group[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1  # (Q, K) segment id within the row
    peak = torch.full_like(sorted_scores, float("-inf")).scatter_reduce(1, group, sorted_scores, "amax")
    safe_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    shifted = (sorted_scores - safe_peak.gather(1, group)).exp()
    total = torch.zeros_like(sorted_scores).scatter_add(1, group, shifted)
    group_score = (total.log() + safe_peak).masked_fill(~torch.isfinite(peak), float("-inf"))
    aggregated_sorted = group_score.gather(1, group)
    aggregated = torch.empty_like(aggregated_sorted).scatter_(1, order, aggregated_sorted)
    return aggregated.masked_fill(~present, float("-inf"))


def beams_to_scored_items(
    output: BeamSearchOutput, trie: SIDTrie, max_items: int | None = None, item_score: str = "max"
) -> RankedItems:
    """Expand ranked beams into ranked items.

    A beam's SID expands to all of its items in ascending item order; beams are
    taken best first; an item recalled by several beams keeps its first (best)
    position; beams with score ``-inf`` or a SID outside the trie give nothing.

    Args:
        output: beams ``(B, K, L)`` and scores ``(B, K)``.
        trie: the trie the SIDs are looked up in.
        max_items: output width ``M``. ``None`` uses the largest number of items any
            query recalls (one host synchronisation).
        item_score: ``"max"`` (an item keeps its best beam's score and position) or ``"logsumexp"``
            (an item reached by several beams, e.g. several GRDR views, scores the log-sum-exp of their
            scores; items are re-ranked by it, ties in first-occurrence order).

    Returns:
        :class:`RankedItems` with ``items (B, M)`` and ``scores (B, M)``.
    """
    sequences, scores = output.sequences, output.scores
    num_queries, num_beams = scores.shape
    leaves = trie.lookup(sequences.to(trie.device)).masked_fill(~(scores > float("-inf")), -1)
    per_leaf = trie.max_items_per_leaf if max_items is None else min(int(max_items), trie.max_items_per_leaf)
    per_leaf = max(per_leaf, 1)
    items = trie.items_of_leaves(leaves.reshape(-1), per_leaf).reshape(num_queries, num_beams * per_leaf)
    item_scores = scores.repeat_interleave(per_leaf, dim=1)
    if item_score not in ITEM_SCORES:
        raise ValueError(f"item_score must be one of {ITEM_SCORES}, got {item_score!r}.")
    if item_score == "logsumexp":
        item_scores = logsumexp_per_item(items, item_scores)
    items, item_scores = deduplicate_ranked(items, item_scores)
    if item_score == "logsumexp":
        order = item_scores.sort(dim=1, descending=True, stable=True).indices
        items, item_scores = items.gather(1, order), item_scores.gather(1, order)
    if max_items is None:
        width = max(int((items >= 0).sum(dim=1).max()), 1)
    else:
        width = int(max_items)
    if width > items.shape[1]:
        pad = width - items.shape[1]
        items = torch.nn.functional.pad(items, (0, pad), value=-1)
        item_scores = torch.nn.functional.pad(item_scores, (0, pad), value=float("-inf"))
    return RankedItems(items=items[:, :width], scores=item_scores[:, :width])


def beams_to_items(output: BeamSearchOutput, trie: SIDTrie, max_items: int | None = None) -> Tensor:
    """``(B, M)`` ranked item indices padded with ``-1``; see :func:`beams_to_scored_items`."""
    return beams_to_scored_items(output, trie, max_items).items
