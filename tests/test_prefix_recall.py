"""Prefix recall: decode the first p SID levels, expand each decoded prefix to every item under it.

The pools and metrics are checked against brute force: every prefix scored by teacher forcing, ranked,
and expanded item by item through the SID table in Python (no trie, no beam search).
"""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from toy_sid import TOY_SID_VOCABS, save_toy_bundle, toy_datamodule, toy_retriever

from grcm.data.datamodules import SyntheticDataModule
from grcm.decoding import beams_to_scored_items
from grcm.metrics import candidate_recall
from grcm.rerank.stage1_pool import cap_pool
from grcm.retriever.grdr import GRDRRetriever
from grcm.retriever.module import GenerativeRetriever, RetrieverConfigError

NUM_ITEMS = 50
SID_VOCABS = TOY_SID_VOCABS

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def datamodule() -> SyntheticDataModule:
    return toy_datamodule(NUM_ITEMS)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, datamodule) -> str:
    return save_toy_bundle(datamodule.corpus.item_ids, tmp_path_factory.mktemp("bundles") / "toy")


_retriever = toy_retriever


def _brute_force_pools(module: GenerativeRetriever, batch, levels: int, cap: int | None) -> list[list[int]]:
    """Every valid prefix of ``levels`` codes scored by teacher forcing (sum of unmasked log-softmax), ranked best
    first, each expanded to its items in ascending order through the SID table, cut at ``cap`` items."""
    codes = module.sid_codes.tolist()
    prefixes = sorted({tuple(row[:levels]) for row in codes})
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    scores = torch.zeros(input_ids.shape[0], len(prefixes))
    with torch.no_grad():
        module.eval()
        for j, prefix in enumerate(prefixes):
            targets = torch.tensor([*prefix, *[0] * (len(SID_VOCABS) - levels)]).expand(input_ids.shape[0], -1)
            logits = module.model(input_ids, mask, targets)
            for level in range(levels):
                scores[:, j] += torch.log_softmax(logits[level].float(), -1)[:, prefix[level]]
    pools = []
    for row in scores.tolist():
        ranked = sorted(range(len(prefixes)), key=lambda j: -row[j])
        assert all(abs(row[a] - row[b]) > 1e-5 for a, b in itertools.pairwise(ranked))  # no near-ties
        items = [i for j in ranked for i, sid in enumerate(codes) if tuple(sid[:levels]) == prefixes[j]]
        pools.append(items[:cap] if cap is not None else items)
    return pools


def test_prefix_recall_pool_and_metrics_equal_brute_force(bundle_dir, datamodule):
    module = _retriever(bundle_dir, datamodule, recall_levels=2, max_pool_items=20, ks=(1, 5, 10))
    batch = next(iter(datamodule.test_dataloader()))
    expected = _brute_force_pools(module, batch, levels=2, cap=20)
    output = module.decode(batch["input_ids"], batch["attention_mask"])
    assert output.sequences.shape[-1] == 2  # prefixes, not full SIDs
    pool = beams_to_scored_items(output, module.recall_trie, 20).items
    assert [[i for i in row if i >= 0] for row in pool.tolist()] == expected
    # a prefix of 4-5 items yields items that the full-SID beams of the same width never reach
    full = _retriever(bundle_dir, datamodule)
    full_pool = beams_to_scored_items(full.decode(batch["input_ids"], batch["attention_mask"]), full.trie).items
    assert int((full_pool >= 0).sum(1).max()) == 12 and all(len(row) == 20 for row in expected)

    logged = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
                       ).test(module, datamodule=datamodule, verbose=False)[0]
    gold = batch["gold_items"][:, 0].tolist()
    assert len(gold) == NUM_ITEMS  # one batch holds every test query
    for k in (1, 5, 10):
        hits = [g in items[:k] for g, items in zip(gold, expected)]
        assert logged[f"test/recall@{k}"] == pytest.approx(sum(hits) / len(hits), abs=1e-6), k
    assert logged["test/pool_items"] == pytest.approx(20.0)
    assert logged["test/pool_share"] == pytest.approx(20.0 / NUM_ITEMS)


def test_uncapped_pool_scores_and_order_follow_the_decoded_beams(bundle_dir, datamodule):
    module = _retriever(bundle_dir, datamodule, recall_levels=1, beam_size=3)
    batch = next(iter(datamodule.test_dataloader()))
    output = module.decode(batch["input_ids"], batch["attention_mask"])
    recalled = beams_to_scored_items(output, module.recall_trie)
    codes = module.sid_codes.tolist()
    for q, (beams, scores) in enumerate(zip(output.sequences.tolist(), output.scores.tolist())):
        items = [(i, s) for beam, s in zip(beams, scores) for i, sid in enumerate(codes) if sid[:1] == beam]
        width = len(items)
        assert width == sum(1 for sid in codes if sid[0] in {b[0] for b in beams})  # all items of 3 coarse codes
        assert recalled.items[q, :width].tolist() == [i for i, _ in items]
        assert recalled.scores[q, :width].tolist() == pytest.approx([s for _, s in items])


def test_default_and_full_length_recall_are_the_full_sid_path(bundle_dir, datamodule):
    batch = next(iter(datamodule.test_dataloader()))
    default = _retriever(bundle_dir, datamodule)
    full = _retriever(bundle_dir, datamodule, recall_levels=3)
    assert default.recall_trie is default.trie and full.recall_trie is full.trie
    a = default.retrieve(batch["input_ids"], batch["attention_mask"])
    b = full.retrieve(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b)


def test_bad_prefix_recall_arguments_are_refused(bundle_dir, datamodule):
    with pytest.raises(RetrieverConfigError, match="recall_levels"):
        _retriever(bundle_dir, datamodule, recall_levels=0)
    with pytest.raises(RetrieverConfigError, match="max_pool_items"):
        _retriever(bundle_dir, datamodule, max_pool_items=5)  # below recall@10


def test_grdr_prefix_recall_expands_every_view_of_every_item():
    torch.manual_seed(0)
    module = GRDRRetriever(vocab_size=40, feature_dim=16, num_views=2, num_levels=3, codebook_size=6, d_model=16,
                           tokenizer_hidden=16, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, beam_size=3,
                           recall_levels=1, max_pool_items=10)
    num_items = 30
    codes = torch.randint(0, 6, (num_items, 2, 3))
    module.sids.sid_codes = codes.clone()
    module.sids.initialised_levels.fill_(3)
    input_ids = torch.randint(1, 40, (4, 7))
    output = module.decode(input_ids, torch.ones_like(input_ids, dtype=torch.bool))
    assert output.sequences.shape == (4, 3, 1)
    pool = beams_to_scored_items(output, module.recall_trie).items
    for q, beams in enumerate(output.sequences.tolist()):
        expected: list[int] = []
        for beam in beams:  # every item with any view whose first code is the beam's
            expected += [i for i in range(num_items) if i not in expected and beam[0] in codes[i, :, 0].tolist()]
        assert [i for i in pool[q].tolist() if i >= 0] == expected


def test_two_stage_pool_cap_keeps_the_first_distinct_candidates():
    candidates = torch.tensor([[4, 4, 2, -1, 7, 1], [3, -1, -1, -1, -1, -1]])
    scores = torch.tensor([[-1.0, -1.0, -2.0, float("-inf"), -3.0, -3.0], [-0.5] + [float("-inf")] * 5])
    capped, capped_scores = cap_pool(candidates, scores, 3)
    assert capped.tolist() == [[4, 2, 7], [3, -1, -1]]
    assert capped_scores[0].tolist() == [-1.0, -2.0, -3.0]
    gold = torch.tensor([[1], [3]])
    assert candidate_recall(capped, gold).tolist() == [0.0, 1.0]  # item 1 was the 4th distinct candidate
