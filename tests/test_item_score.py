"""Item scores across the beams that reach an item: ``max`` (best beam) or ``logsumexp`` (GRDR's views)."""

from __future__ import annotations

import math

import pytest
import torch

from grcm.decoding import SIDTrie
from grcm.decoding.beam import BeamSearchOutput, beams_to_scored_items, logsumexp_per_item


def _brute_force_logsumexp(items: list[int], scores: list[float]) -> list[float]:
    out = []
    for item, _ in zip(items, scores):
        if item < 0:
            out.append(float("-inf"))
            continue
        same = [s for i, s in zip(items, scores) if i == item]
        peak = max(same)
        out.append(peak + math.log(sum(math.exp(s - peak) for s in same)) if peak > float("-inf") else peak)
    return out


def test_logsumexp_per_item_equals_a_per_row_loop():
    generator = torch.Generator().manual_seed(0)
    items = torch.randint(-1, 6, (7, 12), generator=generator)
    scores = -torch.rand(7, 12, generator=generator) * 5
    scores[0, :3] = float("-inf")
    got = logsumexp_per_item(items, scores)
    for row in range(items.shape[0]):
        expected = _brute_force_logsumexp(items[row].tolist(), scores[row].tolist())
        assert got[row].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def _two_view_case():
    # item 0 owns SIDs (0, 0) and (1, 0) (two views); item 1 owns (0, 1); item 2 owns (1, 1)
    codes = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])
    trie = SIDTrie.from_codes(codes, [2, 2], row_items=torch.tensor([0, 0, 1, 2]))
    sequences = torch.tensor([[[0, 1], [0, 0], [1, 0], [1, 1]]])
    scores = torch.log(torch.tensor([[0.30, 0.25, 0.25, 0.20]]))  # item 1 best alone; item 0 twice
    return BeamSearchOutput(sequences=sequences, scores=scores), trie


def test_logsumexp_ranks_an_item_reached_by_two_views_above_a_single_better_beam():
    output, trie = _two_view_case()
    by_max = beams_to_scored_items(output, trie)
    assert by_max.items.tolist() == [[1, 0, 2]]
    assert by_max.scores.exp().tolist()[0] == pytest.approx([0.30, 0.25, 0.20])
    by_sum = beams_to_scored_items(output, trie, item_score="logsumexp")
    assert by_sum.items.tolist() == [[0, 1, 2]]
    assert by_sum.scores.exp().tolist()[0] == pytest.approx([0.50, 0.30, 0.20])
    capped = beams_to_scored_items(output, trie, max_items=2, item_score="logsumexp")
    assert capped.items.tolist() == [[0, 1]]


def test_unknown_item_score_is_refused():
    output, trie = _two_view_case()
    with pytest.raises(ValueError, match="item_score"):
        beams_to_scored_items(output, trie, item_score="sum")


def test_retrievers_take_item_score_as_a_flag_and_refuse_unknown_values():
    from grcm.retriever.grdr import GRDRRetriever
    from grcm.retriever.sid_retrieval import RetrieverConfigError

    args = dict(vocab_size=40, feature_dim=16, num_views=2, num_levels=2, codebook_size=8, d_model=16,
                tokenizer_hidden=16, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32)
    assert GRDRRetriever(**args, item_score="logsumexp").hparams.item_score == "logsumexp"
    with pytest.raises(RetrieverConfigError, match="item_score"):
        GRDRRetriever(**args, item_score="sum")
