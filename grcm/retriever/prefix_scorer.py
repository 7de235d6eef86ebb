"""Ordering the items under a decoded SID prefix by their features: a text-aligned finer level.

Prefix recall (``recall_levels`` = p) expands each decoded prefix to every item under it. The finer SID
levels cannot order those items for an item without training queries: its fine codes were never a
training target, so the decoder gives them no mass (docs/studies/inductive.md). A
:class:`PrefixItemScorer` replaces them by a level whose logits are tied to the items' *features*
instead of to per-item output rows:

    score(item i | query, prefix) = beam log-probability of the prefix + weight * (W h + b) . v_i

where ``h`` (d_model) is the decoder state after the prefix (the state the level-p head reads), ``W, b``
a learned projection into the item space, and ``v_i`` (D) item i's vector: its feature minus the centroid
of its coarse (K-Means) code when the SID bundle has one (the within-cluster residual), else its feature.
An item gets its score from what its features say, so an unseen item is ranked as well as a seen one
with the same features. The pool is then each query's best ``max_pool_items`` items by that score
(:func:`scored_prefix_pool`), so the cap keeps the best items of many prefixes instead of every item
of the few best prefixes.

The retriever's beam scores and the fitted projection both favour the items that had training queries
(their queries were learned, an unseen item's never were). ``untrained_bonus`` (the retriever's
``prefix_scorer_untrained_bonus``, default 0) adds a constant to the score of every item the scorer was
fitted without, a prior that trades recall of trained items for recall of new ones (the scorer file
records which items had training queries).

The projection is fitted after the retriever, with the retriever frozen (:func:`grcm.retriever.prefix_scorer_fit.fit_prefix_scorer`, a few
minutes on a CPU): for each training query, a softmax over the training items under its gold prefix.
``python -m grcm.retriever.prefix_scorer_fit --ckpt_path <retriever.ckpt> --out <scorer.pt>`` fits one on
the checkpoint's own training queries and writes it; the retriever reads it with
``--model.init_args.prefix_scorer=<scorer.pt>`` (plus ``recall_levels`` equal to the scorer's levels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from grcm.decoding import BeamSearchOutput, RankedItems, SIDTrie
from grcm.errors import GrcmError
from grcm.metrics import deduplicate_ranked
from grcm.retriever.model import EncoderOutput, GenerativeRetrieverModel

__all__ = ["PrefixItemScorer", "PrefixScorerError", "item_vectors", "prefix_item_counts", "prefix_states",
           "scored_prefix_pool"]

FORMAT = "grcm-prefix-scorer-1"


class PrefixScorerError(GrcmError, ValueError):
    """A prefix scorer that does not fit the retriever it is used with (names the file and the fix)."""


def item_vectors(features: Tensor, coarse_codes: Tensor | None, coarse_centroids: Tensor | None) -> Tensor:
    """(N, D) item vectors: features (N, D) minus the centroid (K, D) of each item's coarse code (N,),
    or the features themselves without a coarse level (or with centroids of another dimension)."""
    features = features.float()
    if coarse_codes is None or coarse_centroids is None or coarse_centroids.shape[1] != features.shape[1]:
        return features
    return features - coarse_centroids.float()[coarse_codes.long()]


class PrefixItemScorer(nn.Module):
    """Scores of items under decoded prefixes: ``(W h + b) . v_item``.

    Args:
        state_dim: d_model of the retriever's decoder.
        vectors: (N, D) item vectors (:func:`item_vectors`), one row per item of the retriever's table.
        levels: the SID levels p of the prefixes it orders (the retriever's ``recall_levels``).
        trained: (N,) bool, the items that had training queries when it was fitted (default: all).
    """

    def __init__(self, state_dim: int, vectors: Tensor, levels: int, trained: Tensor | None = None) -> None:
        super().__init__()
        self.levels = int(levels)
        self.proj = nn.Linear(int(state_dim), int(vectors.shape[1]))
        self.register_buffer("vectors", vectors.float().clone())
        trained = torch.ones(vectors.shape[0], dtype=torch.bool) if trained is None else trained.bool().clone()
        self.register_buffer("trained", trained)

    @property
    def num_items(self) -> int:
        return int(self.vectors.shape[0])

    def forward(self, states: Tensor, items: Tensor) -> Tensor:
        """states (R, d) and item indices (R, M), ``-1`` = none -> scores (R, M), ``-inf`` where no item."""
        query = self.proj(states.float())  # (R, D)
        if self.num_items <= items.shape[1] * self.vectors.shape[1]:  # cheaper: every item, then pick
            scores = (query @ self.vectors.T).gather(1, items.clamp(min=0))
        else:
            scores = torch.einsum("rd,rmd->rm", query, self.vectors[items.clamp(min=0)])
        return scores.masked_fill(items < 0, float("-inf"))

    def subset(self, rows: Tensor) -> PrefixItemScorer:
        """The same scorer over the items ``rows`` (k,) of its table, in that order (e.g. a retriever checkpoint
        whose SID table was cut to an evaluation pool with :func:`grcm.index_items.restrict_sid_table`): the
        projection is shared, each kept item keeps its vector and its trained flag."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_items):
            raise PrefixScorerError(f"PrefixItemScorer.subset: rows must lie in [0, {self.num_items}), got "
                                    f"[{int(rows.min())}, {int(rows.max())}]")
        out = PrefixItemScorer(int(self.proj.in_features), self.vectors[rows], self.levels, self.trained[rows])
        out.proj.load_state_dict(self.proj.state_dict())
        return out.eval()

    def state(self) -> dict[str, Any]:
        """What :meth:`save` writes: tensors and plain values only (a ``weights_only`` load reads it)."""
        return {"format": FORMAT, "levels": self.levels, "state_dim": int(self.proj.in_features),
                "weight": self.proj.weight.detach().cpu(), "bias": self.proj.bias.detach().cpu(),
                "vectors": self.vectors.detach().cpu(), "trained": self.trained.cpu()}

    def save(self, path: str | Path) -> None:
        """Write the scorer atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> PrefixItemScorer:
        """Read a scorer written by :meth:`save`; one-line errors for a missing or foreign file."""
        path = Path(path)
        if not path.is_file():
            raise PrefixScorerError(f"model.prefix_scorer={str(path)!r} is not a file; fit one with "
                                    "python -m grcm.retriever.prefix_scorer_fit --ckpt_path <retriever.ckpt> --out <file>.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 -- any unreadable file is the same one-line error
            raise PrefixScorerError(f"model.prefix_scorer={str(path)!r} is not a readable scorer file ({error}).") \
                from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise PrefixScorerError(f"model.prefix_scorer={str(path)!r} was not written by "
                                    "grcm.retriever.prefix_scorer (format key missing or different).")
        scorer = cls(int(state["state_dim"]), state["vectors"], int(state["levels"]), state["trained"])
        scorer.proj.weight.data.copy_(state["weight"])
        scorer.proj.bias.data.copy_(state["bias"])
        return scorer.eval()

    def check_against(self, where: str, num_items: int, state_dim: int, recall_levels: int | None) -> None:
        """Raise :class:`PrefixScorerError` unless it fits a retriever of that size, width and prefix length."""
        if self.num_items != num_items:
            raise PrefixScorerError(
                f"model.prefix_scorer={where!r} holds vectors of {self.num_items} items but the retriever's SID "
                f"table has {num_items} (items added with grcm index-items?); refit the scorer on this checkpoint.")
        if int(self.proj.in_features) != int(state_dim):
            raise PrefixScorerError(f"model.prefix_scorer={where!r} reads decoder states of width "
                                    f"{self.proj.in_features}, this retriever's are {state_dim}; refit it.")
        if recall_levels != self.levels:
            raise PrefixScorerError(f"model.prefix_scorer={where!r} orders items under {self.levels}-level prefixes; "
                                    f"set model.init_args.recall_levels={self.levels} (it is {recall_levels}).")


def prefix_states(model: GenerativeRetrieverModel, enc: EncoderOutput, prefixes: Tensor) -> Tensor:
    """Decoder states after each prefix: enc of B queries, prefixes (B, K, p) -> (B, K, d).

    Rows with a ``-1`` prefix (dead beams) are computed on code 0 and are meaningless; the caller masks them.
    """
    batch, beams, levels = prefixes.shape
    # batch-major rows (row b*K + k reads query b): the decoder folds a query's K rows into one cross block
    states = model._decode_states(enc, prefixes.reshape(batch * beams, levels).clamp(min=0))
    return states[:, -1].reshape(batch, beams, -1)


def prefix_item_counts(output: BeamSearchOutput, trie: SIDTrie) -> Tensor:
    """(B,) items under each query's decoded prefixes (live beams (B, K, p) of ``trie``): what prefix recall
    expands before ``max_pool_items`` cuts it, and what a prefix scorer reads. An item under several decoded
    prefixes (a GRDR item's views) counts once per prefix."""
    live = output.scores > float("-inf")
    leaves = trie.lookup(output.sequences.to(trie.device)).masked_fill(~live.to(trie.device), -1)
    return trie.leaf_item_ranges(leaves)[1].sum(1)


def scored_prefix_pool(output: BeamSearchOutput, trie: SIDTrie, states: Tensor, scorer: PrefixItemScorer,
                       weight: float, max_items: int | None, untrained_bonus: float = 0.0) -> RankedItems:
    """Every item under the decoded prefixes, ranked by beam score + ``weight`` * the scorer's item score.

    Args:
        output: beams (B, K, p) over prefixes and their scores (B, K).
        trie: the prefix trie the beams were decoded in (its leaves hold every item under a prefix).
        states: (B, K, d) decoder states after each beam's prefix (:func:`prefix_states`).
        scorer: the item scorer; weight: its weight against the beam log-probability.
        untrained_bonus: added to the score of every item without training queries (``~scorer.trained``).
        max_items: pool width M (the best M distinct items); None: every item recalled.

    Returns:
        :class:`RankedItems` (B, M), best first; an item under several beams keeps its best entry; ties in
        beam order, then ascending item index.
    """
    sequences, beam_scores = output.sequences, output.scores
    batch, beams = beam_scores.shape
    live = beam_scores > float("-inf")
    leaves = trie.lookup(sequences.to(trie.device)).masked_fill(~live.to(trie.device), -1)
    per_leaf = max(trie.max_items_per_leaf, 1)
    items = trie.items_of_leaves(leaves.reshape(-1), per_leaf).reshape(batch * beams, per_leaf).to(states.device)
    item_scores = scorer(states.reshape(batch * beams, -1), items)  # (B*K, P)
    total = (beam_scores.reshape(-1, 1).to(item_scores.device) + float(weight) * item_scores)
    if untrained_bonus:
        total = total + float(untrained_bonus) * (~scorer.trained[items.clamp(min=0)]).float()
    total = total.masked_fill(items < 0, float("-inf")).reshape(batch, beams * per_leaf)
    items = items.reshape(batch, beams * per_leaf)
    order = total.sort(dim=1, descending=True, stable=True).indices
    items, total = deduplicate_ranked(items.gather(1, order), total.gather(1, order))
    width = max(int((items >= 0).sum(1).max()), 1) if max_items is None else int(max_items)
    if width > items.shape[1]:
        pad = width - items.shape[1]
        items = nn.functional.pad(items, (0, pad), value=-1)
        total = nn.functional.pad(total, (0, pad), value=float("-inf"))
    return RankedItems(items=items[:, :width], scores=total[:, :width])
