"""GenerativeRetriever LightningModule: training, decoding to items, metrics, checkpoints, schedule."""

from __future__ import annotations

import math
import shutil

import lightning as L
import pytest
import torch

from grcm.data.datamodules import SyntheticDataModule
from grcm.decoding import beams_to_items
from grcm.retriever.module import GenerativeRetriever
from grcm.retriever.schedule import warmup_cosine_restarts
from grcm.tokenizers.bundle import BundleError, SIDBundle

NUM_ITEMS = 50
SID_VOCABS = [4, 3, 5]  # 50 of the 60 code combinations are valid SIDs


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: one intra-op thread avoids synchronisation overhead on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _codes(num_items: int) -> torch.Tensor:
    index = torch.arange(num_items)
    return torch.stack([index % 4, (index // 4) % 3, index // 12], dim=1)


@pytest.fixture(scope="module")
def datamodule() -> SyntheticDataModule:
    dm = SyntheticDataModule(num_items=NUM_ITEMS, feature_dim=16, batch_size=32, eval_batch_size=16)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, datamodule) -> str:
    bundle = SIDBundle(
        item_ids=datamodule.corpus.item_ids,
        codes=_codes(NUM_ITEMS),
        vocab_sizes=SID_VOCABS,
        codebooks={"coarse": torch.randn(4, 16)},
        config={"level_names": ["a", "b", "unique"]},
        health={"collisions": 0},
    )
    return str(bundle.save(tmp_path_factory.mktemp("bundles") / "toy"))


def _retriever(bundle_dir: str, datamodule, **overrides) -> GenerativeRetriever:
    torch.manual_seed(0)
    args = dict(
        bundle_dir=bundle_dir, vocab_size=datamodule.vocab_size, pad_token_id=datamodule.pad_token_id,
        d_model=32, num_heads=2, num_encoder_layers=2, num_decoder_layers=1, ffn_dim=64,
        max_query_len=32, beam_size=8, lr=3e-3, warmup_epochs=0.5, restart_period=2.0,
    )
    args.update(overrides)
    return GenerativeRetriever(**args)


def _trainer(**overrides) -> L.Trainer:
    args = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    args.update(overrides)
    return L.Trainer(**args)


def _oracle_scores(module: GenerativeRetriever, input_ids, attention_mask) -> torch.Tensor:
    """(B, N) log-probability of every item's SID, scored by teacher forcing (no beam search)."""
    codes = module.sid_codes
    batch, num_items = input_ids.shape[0], codes.shape[0]
    with torch.no_grad():
        logits = module.model(
            input_ids.repeat_interleave(num_items, 0),
            attention_mask.repeat_interleave(num_items, 0),
            codes.repeat(batch, 1),
        )
    targets = codes.repeat(batch, 1)
    total = sum(
        torch.log_softmax(level_logits, -1).gather(1, targets[:, level : level + 1]).squeeze(1)
        for level, level_logits in enumerate(logits)
    )
    return total.reshape(batch, num_items)


@pytest.fixture(scope="module")
def trained(bundle_dir, datamodule) -> GenerativeRetriever:
    torch.set_num_threads(1)
    module = _retriever(bundle_dir, datamodule)
    _trainer(max_epochs=3, limit_val_batches=0).fit(module, datamodule=datamodule)
    return module.eval()


def test_training_logs_finite_loss_with_rdrop(bundle_dir, datamodule):
    module = _retriever(bundle_dir, datamodule, rdrop_omega=0.15)
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    logged = trainer.callback_metrics
    assert math.isfinite(float(logged["train/loss"]))
    assert float(logged["train/kl"]) > 0  # two dropout passes disagree
    torch.testing.assert_close(logged["train/loss"], logged["train/ce"] + 0.15 * logged["train/kl"])


def test_without_rdrop_the_loss_is_plain_cross_entropy(bundle_dir, datamodule):
    module = _retriever(bundle_dir, datamodule, rdrop_omega=0.0)
    trainer = _trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    assert float(trainer.callback_metrics["train/kl"]) == 0
    torch.testing.assert_close(trainer.callback_metrics["train/loss"], trainer.callback_metrics["train/ce"])


def test_constrained_decoding_ranks_items_like_exhaustive_scoring(trained, datamodule):
    batch = next(iter(datamodule.val_dataloader()))
    oracle = _oracle_scores(trained, batch["input_ids"], batch["attention_mask"])
    # a beam as wide as the trie's largest level never prunes: beam search is exhaustive
    output = trained.decode(batch["input_ids"], batch["attention_mask"], beam_size=NUM_ITEMS)
    assert bool(trained.trie.contains(output.sequences).all())
    ranked = beams_to_items(output, trained.trie, max_items=10)
    torch.testing.assert_close(oracle.gather(1, ranked), oracle.topk(10, dim=1).values, atol=1e-4, rtol=0)
    assert trained.retrieve(batch["input_ids"], batch["attention_mask"]).shape == (len(batch["query_index"]), 10)
    full = oracle.sort(dim=1, descending=True).values
    torch.testing.assert_close(output.scores, full, atol=1e-4, rtol=0)


def test_validation_metrics_match_an_independent_item_level_computation(trained, datamodule, bundle_dir):
    exhaustive = _retriever(bundle_dir, datamodule, beam_size=NUM_ITEMS)  # no pruning: beams = full ranking
    exhaustive.load_state_dict(trained.state_dict())
    results = _trainer().validate(exhaustive, datamodule=datamodule, verbose=False)[0]
    hits = {1: 0, 5: 0, 10: 0}
    reciprocal_rank, num_queries = 0.0, 0
    for batch in datamodule.val_dataloader():
        oracle = _oracle_scores(trained, batch["input_ids"], batch["attention_mask"])
        for scores, gold in zip(oracle, batch["gold_items"]):
            ranking = scores.argsort(descending=True).tolist()
            rank = ranking.index(int(gold[0])) + 1
            num_queries += 1
            for k in hits:
                hits[k] += rank <= k
            reciprocal_rank += 1.0 / rank if rank <= 10 else 0.0
    tolerance = 1.0 / num_queries + 1e-6  # one near-tie may flip between beam and exhaustive scoring
    for k, count in hits.items():
        assert results[f"val/recall@{k}"] == pytest.approx(count / num_queries, abs=tolerance)
    assert results["val/mrr@10"] == pytest.approx(reciprocal_rank / num_queries, abs=tolerance)
    assert results["val/valid_sid@1"] == 1.0
    assert results["val/recall@1"] <= results["val/recall@5"] <= results["val/recall@10"]


def test_unconstrained_beams_recall_only_items_of_valid_sids(bundle_dir, datamodule, trained):
    module = _retriever(bundle_dir, datamodule, constrained=False, beam_size=20)
    module.load_state_dict(trained.state_dict())
    module.eval()
    batch = next(iter(datamodule.val_dataloader()))
    output = module.decode(batch["input_ids"], batch["attention_mask"])
    ranked = module.retrieve(batch["input_ids"], batch["attention_mask"], max_items=20)
    sid_of_item = {tuple(code.tolist()): item for item, code in enumerate(module.sid_codes)}
    for beams, items in zip(output.sequences, ranked):
        expected = [sid_of_item[tuple(b.tolist())] for b in beams if tuple(b.tolist()) in sid_of_item]
        assert items[items >= 0].tolist() == expected
    # the unconstrained scores are never below the constrained ones (a relaxation)
    constrained = trained.decode(batch["input_ids"], batch["attention_mask"], beam_size=20)
    assert bool((output.scores[:, 0] >= constrained.scores[:, 0] - 1e-5).all())


def test_checkpoint_alone_restores_bundle_and_decoding(tmp_path, trained, datamodule, bundle_dir):
    moved = tmp_path / "bundle"
    shutil.copytree(bundle_dir, moved)
    module = _retriever(str(moved), datamodule)
    module.load_state_dict(trained.state_dict())
    trainer = _trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    module.eval()
    path = tmp_path / "retriever.ckpt"
    trainer.save_checkpoint(path)
    shutil.rmtree(moved)  # the bundle directory is gone; the checkpoint must be enough

    restored = GenerativeRetriever.load_from_checkpoint(path, weights_only=True).eval()
    assert restored.hparams.sid_vocab_sizes == SID_VOCABS
    assert restored.item_ids == datamodule.corpus.item_ids
    torch.testing.assert_close(restored.sid_codes, _codes(NUM_ITEMS))
    batch = next(iter(datamodule.val_dataloader()))
    torch.testing.assert_close(
        restored.retrieve(batch["input_ids"], batch["attention_mask"]),
        module.retrieve(batch["input_ids"], batch["attention_mask"]),
    )
    exported = SIDBundle.load(restored.sid_bundle.save(tmp_path / "exported"))
    assert exported.config == {"level_names": ["a", "b", "unique"]}
    torch.testing.assert_close(exported.codebooks["coarse"], SIDBundle.load(bundle_dir).codebooks["coarse"])


def test_bundle_of_another_corpus_is_rejected_naming_the_bundle(tmp_path, datamodule):
    other = SIDBundle(
        item_ids=[f"other{i}" for i in range(NUM_ITEMS)], codes=_codes(NUM_ITEMS), vocab_sizes=SID_VOCABS
    )
    path = str(other.save(tmp_path / "other_bundle"))
    module = _retriever(path, datamodule)
    with pytest.raises(BundleError, match="other_bundle.*rebuild the bundle"):
        _trainer().validate(module, datamodule=datamodule, verbose=False)


def test_missing_bundle_is_a_clear_error(tmp_path, datamodule):
    with pytest.raises(BundleError, match="no SID bundle at .*missing.*ace_tokenizer.yaml"):
        _retriever(str(tmp_path / "missing"), datamodule)


def test_schedule_warms_up_linearly_then_restarts_cosine_periods():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    scheduler = warmup_cosine_restarts(optimizer, warmup_steps=4, restart_period=6, warmup_start_lr=1e-5, min_lr=1e-5)
    seen = []
    for _ in range(18):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-5 + (1e-3 - 1e-5) * s / 4 for s in range(4)]
    for s in range(14):
        expected.append(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (s % 6) / 6)))
    assert seen == pytest.approx(expected, rel=1e-6)
