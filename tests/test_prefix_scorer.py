"""Prefix scorer: items under a decoded SID prefix ordered by beam score + weight * (W h + b) . v_item.

The pools are checked against brute force: every prefix scored by teacher forcing, every item's score a
Python dot product, ranked by sorting Python lists; the fit is checked on queries that name their item.
"""

from __future__ import annotations

import pytest
import torch
from toy_sid import TOY_SID_VOCABS, save_toy_bundle, toy_codes, toy_datamodule, toy_retriever

from grcm.data.datamodules import SyntheticDataModule
from grcm.decoding import BeamSearchOutput, SIDTrie
from grcm.retriever.model import GenerativeRetrieverModel
from grcm.retriever.module import GenerativeRetriever
from grcm.retriever.prefix_scorer import (
    PrefixItemScorer,
    PrefixScorerError,
    item_vectors,
    prefix_item_counts,
    scored_prefix_pool,
)
from grcm.retriever.prefix_scorer_fit import fit_prefix_scorer

NUM_ITEMS = 50
pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def datamodule() -> SyntheticDataModule:
    return toy_datamodule(NUM_ITEMS)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, datamodule) -> str:
    return save_toy_bundle(datamodule.corpus.item_ids, tmp_path_factory.mktemp("bundles") / "toy")


def _scorer(levels: int, state_dim: int = 32, num_items: int = NUM_ITEMS, seed: int = 0) -> PrefixItemScorer:
    torch.manual_seed(seed)
    return PrefixItemScorer(state_dim, torch.randn(num_items, 8), levels, trained=torch.rand(num_items) < 0.7)


def test_item_vectors_subtract_the_coarse_centroid_only_when_dimensions_match():
    features, centroids = torch.randn(5, 3), torch.randn(2, 3)
    codes = torch.tensor([0, 1, 1, 0, 1])
    vectors = item_vectors(features, codes, centroids)
    for row in range(5):
        assert torch.allclose(vectors[row], features[row] - centroids[codes[row]])
    assert torch.equal(item_vectors(features, codes, torch.randn(2, 4)), features)
    assert torch.equal(item_vectors(features, None, None), features)


def test_scored_pool_equals_a_per_query_loop():
    codes = toy_codes(NUM_ITEMS)[:, :2]
    trie = SIDTrie.from_codes(codes, TOY_SID_VOCABS[:2], row_items=torch.arange(NUM_ITEMS))
    torch.manual_seed(1)
    batch, beams, width = 3, 5, 16
    prefixes = torch.stack([torch.randperm(12)[:beams] for _ in range(batch)])  # 12 distinct prefixes
    sequences = torch.stack([prefixes % 4, prefixes // 4], dim=-1)  # (B, K, 2), the toy's prefix = (i % 4, i//4 % 3)
    scores = torch.randn(batch, beams).sort(dim=1, descending=True).values
    scores[2, -1] = float("-inf")  # a dead beam recalls nothing
    sequences[2, -1] = -1
    states = torch.randn(batch, beams, 32)
    scorer = _scorer(2)
    pool = scored_prefix_pool(BeamSearchOutput(sequences, scores), trie, states, scorer, 0.7, width,
                              untrained_bonus=0.4)
    trained = scorer.trained.tolist()
    weight, bias, vectors = scorer.proj.weight.tolist(), scorer.proj.bias.tolist(), scorer.vectors.tolist()
    for b in range(batch):
        entries = []
        for k in range(beams):
            if scores[b, k] == float("-inf"):
                continue
            query = [sum(w * s for w, s in zip(row, states[b, k].tolist())) + c for row, c in zip(weight, bias)]
            for item, sid in enumerate(codes.tolist()):
                if sid == sequences[b, k].tolist():
                    dot = sum(q * v for q, v in zip(query, vectors[item]))
                    entries.append((float(scores[b, k]) + 0.7 * dot + (0.0 if trained[item] else 0.4), item))
        entries.sort(key=lambda entry: -entry[0])
        expected = entries[:width]
        got = [(s, i) for s, i in zip(pool.scores[b].tolist(), pool.items[b].tolist()) if i >= 0]
        assert [i for _, i in got] == [i for _, i in expected]
        assert [s for s, _ in got] == pytest.approx([s for s, _ in expected], rel=1e-4, abs=1e-4)
        assert len(got) == min(width, len(entries))
    # the item order is not the index order the plain expansion gives (the scorer reorders within a prefix)
    assert any(row != sorted(row) for row in pool.items[:, :4].tolist())


def test_prefix_item_counts_sum_the_items_under_each_live_beam():
    codes = toy_codes(NUM_ITEMS)[:, :2]
    trie = SIDTrie.from_codes(codes, TOY_SID_VOCABS[:2], row_items=torch.arange(NUM_ITEMS))
    sequences = torch.tensor([[[0, 0], [1, 2], [3, 1]], [[2, 2], [0, 1], [0, 0]]])
    scores = torch.tensor([[-0.1, -0.5, -1.0], [-0.2, -0.3, float("-inf")]])  # query 1's last beam is dead
    expected = [sum(sum(1 for sid in codes.tolist() if sid == sequences[b, k].tolist())
                    for k in range(3) if scores[b, k] > float("-inf")) for b in range(2)]
    assert expected[0] > 0 and expected[1] > 0
    assert prefix_item_counts(BeamSearchOutput(sequences, scores), trie).tolist() == expected


def test_subset_scores_the_kept_items_as_the_full_scorer_does():
    scorer = _scorer(1)
    rows = torch.tensor([7, 2, 30])
    part = scorer.subset(rows)
    states = torch.randn(4, 32)
    full = scorer(states, torch.arange(NUM_ITEMS).expand(4, NUM_ITEMS))
    assert torch.allclose(part(states, torch.arange(3).expand(4, 3)), full[:, rows])
    assert part.trained.tolist() == scorer.trained[rows].tolist() and part.levels == 1
    with pytest.raises(PrefixScorerError, match="rows"):
        scorer.subset(torch.tensor([NUM_ITEMS]))


def _module(bundle_dir: str, datamodule, **overrides) -> GenerativeRetriever:
    return toy_retriever(bundle_dir, datamodule, **{"recall_levels": 2, "max_pool_items": 20, **overrides})


def test_retriever_pool_equals_brute_force_over_every_prefix(tmp_path, bundle_dir, datamodule):
    path = tmp_path / "scorer.pt"
    scorer = _scorer(2)
    scorer.save(path)
    module = _module(bundle_dir, datamodule, prefix_scorer=str(path), prefix_scorer_weight=2.0,
                     prefix_scorer_untrained_bonus=0.5)
    batch = next(iter(datamodule.test_dataloader()))
    input_ids, mask = batch["input_ids"][:6], batch["attention_mask"][:6]
    got = module.retrieve(input_ids, mask, max_items=20)
    codes = module.sid_codes[:, :2].tolist()
    module.eval()
    with torch.no_grad():
        for q in range(input_ids.shape[0]):
            entries = []
            for prefix in sorted({tuple(c) for c in codes}):
                targets = torch.tensor([[*prefix, 0]])
                logits = module.model(input_ids[q:q + 1], mask[q:q + 1], targets)
                beam = sum(float(torch.log_softmax(logits[level][0], -1)[prefix[level]]) for level in range(2))
                enc = module.model.encode(input_ids[q:q + 1], mask[q:q + 1])
                state = module.model._decode_states(enc, torch.tensor([prefix]))[0, -1]
                query = scorer.proj(state)
                for item, sid in enumerate(codes):
                    if tuple(sid) == prefix:
                        bonus = 0.0 if scorer.trained[item] else 0.5  # the mask travels through the file
                        entries.append((beam + 2.0 * float(query @ scorer.vectors[item]) + bonus, item))
            entries.sort(key=lambda entry: -entry[0])
            assert [i for i in got[q].tolist() if i >= 0] == [i for _, i in entries[:20]]


def test_retriever_refuses_a_scorer_that_does_not_fit(tmp_path, bundle_dir, datamodule):
    batch = next(iter(datamodule.test_dataloader()))
    args = (batch["input_ids"][:2], batch["attention_mask"][:2])
    for scorer, match in [(_scorer(1), "recall_levels=1"), (_scorer(2, num_items=40), "40 items"),
                          (_scorer(2, state_dim=16), "width 16")]:
        scorer.save(tmp_path / "s.pt")
        with pytest.raises(PrefixScorerError, match=match):
            _module(bundle_dir, datamodule, prefix_scorer=str(tmp_path / "s.pt")).retrieve(*args)
    (tmp_path / "bad.pt").write_bytes(b"not a scorer")
    with pytest.raises(PrefixScorerError, match="bad.pt"):
        _module(bundle_dir, datamodule, prefix_scorer=str(tmp_path / "bad.pt")).retrieve(*args)


def test_fit_ranks_each_training_querys_item_first_under_its_prefix():
    """Items 0..11 under 3 prefixes; query tokens name features (a token per feature sign pattern), so the
    projection must map the query to its item's vector; items 8..11 have no query and are never targets."""
    torch.manual_seed(0)
    num_items, dim = 12, 6
    codes = torch.stack([torch.arange(num_items) % 3, torch.arange(num_items) // 3], dim=1)
    vectors = torch.randn(num_items, dim)
    item_index = torch.arange(8).repeat(6)
    input_ids = torch.stack([torch.tensor([1 + 2 * d + int(vectors[i, d] > 0) for d in range(dim)])
                             for i in item_index.tolist()])
    input_ids[::2, 0] = 20  # some noise tokens
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    model = GenerativeRetrieverModel(vocab_size=32, sid_vocab_sizes=[3, 4], d_model=32, num_heads=2,
                                     num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, dropout=0.0)

    def gold_first_share(scorer: PrefixItemScorer) -> float:
        hits = 0
        with torch.no_grad():
            enc = model.encode(input_ids, mask)
            states = model._decode_states(enc, codes[item_index, :1])[:, -1]
            scores = scorer.proj(states) @ scorer.vectors.T  # (Q, N)
        for q, gold in enumerate(item_index.tolist()):
            under = [i for i in range(8) if codes[i, 0] == codes[gold, 0]]
            hits += max(under, key=lambda i: float(scores[q, i])) == gold
        return hits / len(item_index)

    untrained, _ = fit_prefix_scorer(model, codes, vectors, input_ids, mask, item_index, epochs=0)
    scorer, loss = fit_prefix_scorer(model, codes, vectors, input_ids, mask, item_index, epochs=150, lr=1e-2,
                                     batch_size=16)
    assert gold_first_share(scorer) >= 0.9 > gold_first_share(untrained) + 0.2
    assert scorer.trained.tolist() == [True] * 8 + [False] * 4
    assert loss < 0.5


def test_command_refuses_a_checkpoint_without_a_sid_bundle(tmp_path):
    from grcm.retriever.prefix_scorer_fit import main

    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, path)
    with pytest.raises(PrefixScorerError, match="not a GenerativeRetriever"):
        main(["--ckpt_path", str(path), "--out", str(tmp_path / "s.pt")])
    assert not (tmp_path / "s.pt").exists()
