"""GenerativeRetriever LightningModule: training, decoding to items, metrics, checkpoints, schedule."""

from __future__ import annotations

import gc
import math
import shutil
import weakref

import pytest
import torch
from cpu_trainer import cpu_trainer
from toy_sid import TOY_SID_VOCABS, save_toy_bundle, toy_codes, toy_datamodule, toy_retriever

import grcm.retriever.incremental as incremental_decoding
from grcm.data.datamodules import SyntheticDataModule
from grcm.decoding import BeamSearchOutput, DecodingError, beams_to_items
from grcm.retriever.module import GenerativeRetriever, RetrieverConfigError
from grcm.retriever.schedule import warmup_cosine_restarts
from grcm.tokenizers.bundle import BundleError, SIDBundle

NUM_ITEMS = 50
SID_VOCABS = TOY_SID_VOCABS


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def datamodule() -> SyntheticDataModule:
    return toy_datamodule(NUM_ITEMS, eval_batch_size=16)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, datamodule) -> str:
    return save_toy_bundle(datamodule.corpus.item_ids, tmp_path_factory.mktemp("bundles") / "toy")


def _retriever(bundle_dir: str, datamodule, **overrides) -> GenerativeRetriever:
    args = dict(num_encoder_layers=2, beam_size=8, lr=3e-3, warmup_epochs=0.5, restart_period=2.0)
    return toy_retriever(bundle_dir, datamodule, **{**args, **overrides})


_trainer = cpu_trainer


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
    torch.testing.assert_close(restored.sid_codes, toy_codes(NUM_ITEMS))
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
        item_ids=[f"other{i}" for i in range(NUM_ITEMS)], codes=toy_codes(NUM_ITEMS), vocab_sizes=SID_VOCABS
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


# ------------------------------------------------------------ decoding paths and review fixes
def test_incremental_decoding_equals_full_recomputation(trained, datamodule):
    batch = next(iter(datamodule.val_dataloader()))
    for beam_size in (1, 5, NUM_ITEMS):
        full = trained.decode(batch["input_ids"], batch["attention_mask"], beam_size=beam_size, incremental=False)
        cached = trained.decode(batch["input_ids"], batch["attention_mask"], beam_size=beam_size)
        assert torch.equal(full.sequences, cached.sequences)
        torch.testing.assert_close(full.scores, cached.scores, atol=1e-5, rtol=1e-5)


def test_loading_a_state_dict_with_other_codes_rebuilds_the_trie(tmp_path, trained, datamodule):
    shuffled = toy_codes(NUM_ITEMS)[torch.randperm(NUM_ITEMS, generator=torch.Generator().manual_seed(0))]
    other_dir = str(
        SIDBundle(item_ids=datamodule.corpus.item_ids, codes=shuffled, vocab_sizes=SID_VOCABS).save(tmp_path / "b")
    )
    other = _retriever(other_dir, datamodule)
    other.load_state_dict({**trained.state_dict(), "sid_codes": shuffled})
    module = _retriever(other_dir, datamodule)  # same shapes; its trie is built before the load
    module.load_state_dict(trained.state_dict())
    batch = next(iter(datamodule.val_dataloader()))
    before = module.retrieve(batch["input_ids"], batch["attention_mask"])  # builds the trie of _codes
    module.load_state_dict(other.state_dict())
    after = module.retrieve(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(after, other.retrieve(batch["input_ids"], batch["attention_mask"]))
    assert not torch.equal(before, after)  # same network, new item -> SID table: other items


def test_the_trie_is_rebuilt_exactly_when_the_codes_change(bundle_dir, datamodule, monkeypatch):
    module = _retriever(bundle_dir, datamodule)
    builds = []
    build = module.build_trie
    monkeypatch.setattr(module, "build_trie", lambda: builds.append(1) or build())

    def item_of(sid: torch.Tensor) -> int:  # the item the trie maps one SID (L,) to
        return int(beams_to_items(BeamSearchOutput(sid[None, None], torch.zeros(1, 1)), module.trie)[0, 0])

    sid_of_0, sid_of_1 = module.sid_codes[0].clone(), module.sid_codes[1].clone()
    assert (item_of(sid_of_0), item_of(sid_of_1)) == (0, 1)
    assert module.trie is module.trie and len(builds) == 1  # unchanged codes: the cached trie
    with torch.no_grad():
        module.sid_codes[[0, 1]] = module.sid_codes[[1, 0]].clone()  # a swap keeps the sum of the codes
    assert (item_of(sid_of_0), item_of(sid_of_1)) == (1, 0) and len(builds) == 2
    replacement = toy_codes(NUM_ITEMS)  # the original codes in a new tensor, at the old tensor's version count
    while replacement._version < module.sid_codes._version:
        replacement.add_(0)
    module.sid_codes = replacement
    assert (item_of(sid_of_0), item_of(sid_of_1)) == (0, 1) and len(builds) == 3


def test_eval_max_items_below_the_largest_cutoff_is_an_error(bundle_dir, datamodule):
    with pytest.raises(RetrieverConfigError, match="eval_max_items=5 is below the largest reported cut-off 10"):
        _retriever(bundle_dir, datamodule, eval_max_items=5)
    assert _retriever(bundle_dir, datamodule, eval_max_items=10).eval_max_items == 10


def test_decode_rejects_a_beam_size_below_one(trained, datamodule):
    batch = next(iter(datamodule.val_dataloader()))
    with pytest.raises(RetrieverConfigError, match="beam_size must be >= 1.*got 0"):
        trained.decode(batch["input_ids"], batch["attention_mask"], beam_size=0)


def test_decode_and_retrieve_outside_lightning_run_without_dropout(bundle_dir, datamodule, trained):
    module = _retriever(bundle_dir, datamodule, dropout=0.5)
    module.load_state_dict(trained.state_dict())
    batch = next(iter(datamodule.val_dataloader()))
    module.train()
    first = module.retrieve(batch["input_ids"], batch["attention_mask"])
    second = module.decode(batch["input_ids"], batch["attention_mask"], incremental=False)
    assert module.training and module.model.training  # the caller's mode is restored
    assert first.is_inference() and second.scores.is_inference()
    module.eval()
    torch.testing.assert_close(first, module.retrieve(batch["input_ids"], batch["attention_mask"]))
    torch.testing.assert_close(
        second.scores, module.decode(batch["input_ids"], batch["attention_mask"], incremental=False).scores
    )


def test_nan_logits_raise_instead_of_returning_empty_results(bundle_dir, datamodule, trained):
    module = _retriever(bundle_dir, datamodule)
    module.load_state_dict(trained.state_dict())
    with torch.no_grad():
        module.model.heads[1].bias[0] = float("nan")
    batch = next(iter(datamodule.val_dataloader()))
    for incremental in (True, False):
        with pytest.raises(DecodingError, match=r"logits contain NaN for \d+ of \d+ queries"):
            module.decode(batch["input_ids"], batch["attention_mask"], incremental=incremental)


def test_a_retriever_with_compile_decoder_is_freed_after_use(bundle_dir, datamodule, trained, monkeypatch):
    """``compile_decoder=True`` decodes through the compiled-step cache, which must not keep the model alive."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(function, **options):  # Dynamo traces, no code generation: seconds instead of minutes
        compiled.append(function)
        return real_compile(function, backend="eager", dynamic=options.get("dynamic"))

    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr(incremental_decoding, "_COMPILED", type(incremental_decoding._COMPILED)())  # a fresh cache, restored after
    module = _retriever(bundle_dir, datamodule, compile_decoder=True)
    module.load_state_dict(trained.state_dict())
    batch = next(iter(datamodule.val_dataloader()))
    torch.testing.assert_close(module.retrieve(batch["input_ids"], batch["attention_mask"]),
                               trained.retrieve(batch["input_ids"], batch["attention_mask"]))
    assert compiled, "compile_decoder did not compile the decode step"
    freed = weakref.ref(module), weakref.ref(module.model)
    del module
    gc.collect()
    assert [ref() is None for ref in freed] == [True, True], "the compiled decode step keeps the model alive"


def test_speed_options_need_incremental_decoding_and_a_known_precision(bundle_dir, datamodule):
    with pytest.raises(RetrieverConfigError, match="incremental_decoding=true"):
        _retriever(bundle_dir, datamodule, incremental_decoding=False, compile_decoder=True)
    with pytest.raises(RetrieverConfigError, match="decode_precision must be one of"):
        _retriever(bundle_dir, datamodule, decode_precision="8")
