"""Items held out of training (``data.unseen_items``) and seen vs unseen metrics, against brute force."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from toy_sid import save_toy_bundle

from grcm.data.datamodules import SyntheticDataModule
from grcm.data.unseen_items import hold_out_items, seen_items_of, unseen_queries
from grcm.decoding import beams_to_scored_items
from grcm.metrics import SeenUnseenMetrics
from grcm.retriever.module import GenerativeRetriever

NUM_ITEMS = 50

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def datamodule() -> SyntheticDataModule:
    dm = SyntheticDataModule(num_items=NUM_ITEMS, feature_dim=16, eval_batch_size=64, unseen_items=0.2,
                             generated_queries_per_item=1, uncovered_items="ignore")
    dm.setup()
    return dm


def test_held_out_items_lose_their_training_queries_and_nothing_else(datamodule):
    plain = SyntheticDataModule(num_items=NUM_ITEMS, feature_dim=16, generated_queries_per_item=1)
    plain.setup()
    full, held = plain.corpus, datamodule.corpus
    _, unseen = hold_out_items(full, 0.2, seed=0)
    assert unseen.sum() == 10
    train_items = datamodule.query_batches("train").item_index.numpy()
    assert set(train_items.tolist()) == set(np.flatnonzero(~unseen).tolist())  # captions and generated queries
    assert np.array_equal(held.features, full.features) and held.item_ids == full.item_ids
    for split in ("val", "test"):
        assert np.array_equal(held.caption_split == split, full.caption_split == split)
    seen_train = (full.caption_split == "train") & ~unseen[full.caption_item]
    assert np.array_equal(held.caption_split == "train", seen_train)
    assert torch.equal(seen_items_of(datamodule), torch.from_numpy(~unseen))
    assert not hold_out_items(full, 0.2, seed=1)[1].tolist() == unseen.tolist()  # the seed picks the items


def test_seen_unseen_metrics_equal_per_group_brute_force():
    generator = torch.Generator().manual_seed(0)
    ranked = torch.randint(-1, 12, (40, 6), generator=generator)
    gold = torch.randint(0, 12, (40, 1), generator=generator)
    seen = torch.rand(12, generator=generator) > 0.3
    pool_hits = torch.rand(40, generator=generator).round()
    metrics = SeenUnseenMetrics(ks=(1, 5), mrr_k=5)
    ids = torch.arange(40)
    metrics.update(ranked[:25], pool_hits[:25], gold[:25], ids[:25], unseen_queries(gold[:25], seen))
    metrics.update(ranked[20:], pool_hits[20:], gold[20:], ids[20:], unseen_queries(gold[20:], seen))  # 5 repeats
    values = metrics.compute()
    for group, members in (("seen", [q for q in range(40) if seen[gold[q, 0]]]),
                           ("unseen", [q for q in range(40) if not seen[gold[q, 0]]])):
        assert values[f"{group}/queries"] == len(members)
        for k in (1, 5):
            hits = [int(gold[q, 0]) in [i for i in dict.fromkeys(ranked[q].tolist()) if i >= 0][:k] for q in members]
            assert float(values[f"{group}/recall@{k}"]) == pytest.approx(sum(hits) / len(members))
        assert float(values[f"{group}/candidate_recall"]) == pytest.approx(float(pool_hits[members].mean()))


def test_prefix_recall_reports_unseen_items_apart(datamodule, tmp_path):
    bundle_dir = save_toy_bundle(datamodule.corpus.item_ids, tmp_path / "b", with_metadata=False)
    torch.manual_seed(0)
    module = GenerativeRetriever(bundle_dir=bundle_dir, vocab_size=datamodule.vocab_size,
                                 d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32,
                                 beam_size=2, recall_levels=1)
    logged = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
                       ).test(module, datamodule=datamodule, verbose=False)[0]
    batch = next(iter(datamodule.test_dataloader()))
    output = module.decode(batch["input_ids"], batch["attention_mask"])
    pools = beams_to_scored_items(output, module.recall_trie).items.tolist()
    seen = seen_items_of(datamodule)
    gold = batch["gold_items"][:, 0].tolist()
    for group, members in (("seen", [q for q, g in enumerate(gold) if seen[g]]),
                           ("unseen", [q for q, g in enumerate(gold) if not seen[g]])):
        assert logged[f"test/{group}/queries"] == len(members) > 0
        in_pool = [gold[q] in pools[q] for q in members]
        first = [pools[q][0] == gold[q] for q in members]
        assert logged[f"test/{group}/candidate_recall"] == pytest.approx(sum(in_pool) / len(members))
        assert logged[f"test/{group}/recall@1"] == pytest.approx(sum(first) / len(members))
