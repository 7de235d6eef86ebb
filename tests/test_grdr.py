"""GRDR: query routing, multi-view tokenizer, shared codebook, phase schedule, item-level decoding, checkpoints,
inference mode and the versioned trie, evaluation overrides with ``--ckpt_path``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_cli_runs import grcm, last_logged_hparams, last_version

from grcm.data.datamodules import SyntheticDataModule
from grcm.decoding import BeamSearchOutput, SIDTrie, beams_to_items
from grcm.metrics import ItemRetrievalMetrics, fixed_width
from grcm.retriever.grdr import CosineCodeHead, GRDRRetriever
from grcm.retriever.phases import GROUPS, TRAINABLE, build_schedule, phase_at
from grcm.tokenizers.kmeans import fit_kmeans
from grcm.tokenizers.multiview import (
    MultiViewTokenizer,
    code_usage_balance,
    multiview_health,
    routed_view_infonce,
    sum_codes,
)
from grcm.tokenizers.query_routing import cluster_routes, embed_queries, random_routes


def _tiny_retriever(**kwargs) -> GRDRRetriever:
    args = dict(vocab_size=40, feature_dim=16, num_views=2, num_levels=2, codebook_size=8, d_model=16,
                tokenizer_hidden=16, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32)
    args.update(kwargs)
    return GRDRRetriever(**args)


def test_cluster_routing_is_deterministic_per_seed_and_uses_min_v_q_views():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(40, 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    items = np.repeat(np.arange(10), [5, 5, 5, 5, 2, 1, 5, 5, 5, 2])
    first = cluster_routes(embeddings, items, num_views=4, seed=3)
    assert np.array_equal(first, cluster_routes(embeddings, items, num_views=4, seed=3))
    for item in range(10):
        views = first[items == item]
        assert set(views) == set(range(min(4, len(views))))  # min(V, #queries) groups, numbered 0..
        assert views[0] == 0  # groups are numbered by their first query
    assert np.array_equal(random_routes(items, 4, seed=1), random_routes(items, 4, seed=1))
    assert np.all(cluster_routes(embeddings, items, num_views=1) == 0)


def test_shared_codebook_is_one_parameter_and_gets_gradient_from_the_retrieval_loss():
    module = _tiny_retriever()
    for level in range(2):
        codebook = module.tokenizer.codebooks[level]
        assert module.model.code_embeddings[level].weight is codebook
        assert isinstance(module.model.heads[level], CosineCodeHead)
        assert module.model.heads[level].codebook is codebook
    input_ids = torch.randint(1, 40, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    sids = torch.randint(0, 8, (3, 2))
    logits = module.model(input_ids, mask, sids)
    loss = sum(torch.nn.functional.cross_entropy(level, sids[:, i]) for i, level in enumerate(logits))
    loss.backward()
    for codebook in module.tokenizer.codebooks:
        assert codebook.grad is not None and codebook.grad.abs().sum() > 0
    # logits are s * cos(h, E) with s learned and clamped to [20, 100]: 30 at start, the clamp's ends beyond it
    head, hidden = module.model.heads[0], torch.randn(3, 16)
    cosine = torch.nn.functional.normalize(hidden, dim=-1) @ torch.nn.functional.normalize(head.codebook, dim=-1).T
    for log_scale, scale in ((math.log(30.0), 30.0), (math.log(1000.0), 100.0), (0.0, 20.0)):
        with torch.no_grad():
            head.log_scale.fill_(log_scale)
        torch.testing.assert_close(head(hidden), scale * cosine)

    unshared = _tiny_retriever(shared_codebook=False)
    assert unshared.model.code_embeddings[0].weight is not unshared.tokenizer.codebooks[0]


@pytest.mark.parametrize("freeze_earlier", [False, True])
@pytest.mark.parametrize("schedule", ["joint", "frozen_tokenizer"])
def test_phase_schedule_freezes_exactly_what_it_says(schedule, freeze_earlier):
    module = _tiny_retriever(schedule=schedule, pretrain_epochs=[1, 0], main_epochs=1, fit_epochs=[1, 2],
                             freeze_earlier_levels=freeze_earlier)
    groups = module.parameter_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert sorted(ids) == sorted(id(p) for p in module.parameters())  # a partition of all parameters
    for phase in module.phases:
        module.apply_phase(phase)
        for name in GROUPS:
            if name == "codebooks":  # with freeze_earlier_levels, the levels below the phase's level stay fixed
                expected = [TRAINABLE[phase.name][name] and not (freeze_earlier and level < phase.level)
                            for level in range(2)]
                assert [p.requires_grad for p in groups[name]] == expected, phase
                continue
            assert all(p.requires_grad == TRAINABLE[phase.name][name] for p in groups[name]), (phase, name)
    names = [(p.name, p.level, p.start, p.end) for p in module.phases]
    if schedule == "joint":
        assert names == [("pretrain", 0, 0, 1), ("main", 0, 1, 2), ("fit", 0, 2, 3), ("main", 1, 3, 4),
                         ("fit", 1, 4, 6)]
    else:
        assert [n[0] for n in names] == ["tokenize", "tokenize", "fit"]
    assert phase_at(module.phases, 100) == module.phases[-1]
    assert module.phases[0].active_levels == (0 if schedule == "joint" else 1)
    with pytest.raises(ValueError, match="main_epochs"):
        build_schedule(2, "joint", main_epochs=[1, 0])


def test_new_level_codebook_is_kmeans_of_its_residuals():
    torch.manual_seed(0)
    tokenizer = MultiViewTokenizer(feature_dim=12, num_views=3, num_levels=2, codebook_size=8, latent_dim=6,
                                   hidden_dim=16)
    features = torch.randn(200, 12)
    tokenizer.init_level(features, 0, seed=5)
    with torch.no_grad():
        latents = tokenizer.view_latents(features)  # level-0 residuals are the latents
    expected0 = fit_kmeans(latents.reshape(-1, 6), 8, seed=5)
    assert torch.allclose(tokenizer.codebooks[0].data, torch.from_numpy(expected0))
    tokenizer.init_level(features, 1, seed=7)
    with torch.no_grad():
        codes0 = tokenizer.quantize(latents, 1).codes[..., 0]
        residual1 = latents - tokenizer.codebooks[0][codes0]
    expected1 = fit_kmeans(residual1.reshape(-1, 6), 8, seed=7)
    assert torch.allclose(tokenizer.codebooks[1].data, torch.from_numpy(expected1))
    codes = tokenizer.encode(features)
    assert codes.shape == (200, 3, 2)
    health = multiview_health(codes, tokenizer.vocab_sizes)
    # independent: distinct level-0 codes of view 0 over K = 8, distinct (level 0, level 1) rows per item
    assert health["view0_level0_utilisation"] == len(set(codes[:, 0, 0].tolist())) / 8
    distinct = [len({tuple(view) for view in item.tolist()}) for item in codes]
    assert health["unique_sids_per_item"] == pytest.approx(sum(distinct) / len(distinct))
    assert health["duplicate_sid_item_fraction"] == pytest.approx(sum(d < 3 for d in distinct) / len(distinct))


def test_routed_view_infonce_multi_positive_prefers_the_routed_view():
    views = torch.eye(4).reshape(2, 2, 4)  # item 0: views e0, e1; item 1: views e2, e3
    queries = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    good = routed_view_infonce(queries, views, torch.tensor([0, 1]), torch.tensor([1, 0]), temperature=0.1)
    bad = routed_view_infonce(queries, views, torch.tensor([0, 1]), torch.tensor([0, 1]), temperature=0.1)
    assert float(good) < 0.01 < float(bad)


def test_trie_expands_a_shared_sid_to_all_its_items_and_metrics_are_item_level():
    # 3 items x 2 views; SID (0, 1) is view 0 of item 2 and view 1 of item 0 and of item 1
    codes = torch.tensor([[[5, 5], [0, 1]], [[3, 2], [0, 1]], [[0, 1], [7, 7]]])
    trie = SIDTrie.from_codes(codes.reshape(6, 2), [8, 8], row_items=torch.arange(3).repeat_interleave(2))
    output = BeamSearchOutput(sequences=torch.tensor([[[0, 1], [3, 2]]]), scores=torch.tensor([[-0.1, -2.0]]))
    pool = beams_to_items(output, trie)
    assert pool.tolist() == [[0, 1, 2]]  # the shared SID's items (ascending), item 1's second SID adds nothing
    # gold item 2: the top SID holds it, so SID-level recall@1 would be 1; item-level recall@1 is 0
    metrics = ItemRetrievalMetrics(ks=(1, 3), mrr_k=10)
    metrics.update(pool, torch.tensor([[2]]), torch.tensor([0]))
    values = metrics.compute()
    assert float(values["recall@1"]) == 0.0 and float(values["recall@3"]) == 1.0
    assert abs(float(values["mrr@10"]) - 1 / 3) < 1e-6


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny GRDR through every phase (dropout 0.3), validated once at the end, and its checkpoint."""
    tmp_path = tmp_path_factory.mktemp("grdr_fit")
    L.seed_everything(0)
    data = SyntheticDataModule(num_items=60, feature_dim=16, batch_size=32, eval_batch_size=64,
                               max_val_queries=20)
    module = _tiny_retriever(vocab_size=data.vocab_size, query_encoder="minilm_static", routing="first_query",
                             pretrain_epochs=[1, 0],
                             main_epochs=1, fit_epochs=[0, 1], beam_size=4, dropout=0.3)
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_train_batches=3, default_root_dir=tmp_path,
                        check_val_every_n_epoch=4, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "grdr.ckpt"
    trainer.save_checkpoint(path)
    logged = {name: float(value) for name, value in trainer.callback_metrics.items()}
    return module, data, path, logged


def _expand(sequences: torch.Tensor, scores: torch.Tensor, codes: torch.Tensor) -> list[list[int]]:
    """Reference expansion of beams (B, K, l) through an (N, V, l) SID table, written out item by item:
    beams in order, each beam's items in ascending index, an item kept at its first position."""
    ranked = []
    for beams, beam_scores in zip(sequences.tolist(), scores.tolist()):
        items: list[int] = []
        for beam, score in zip(beams, beam_scores):
            if score == float("-inf"):
                continue
            for item in range(codes.shape[0]):
                if item not in items and any(view == beam for view in codes[item].tolist()):
                    items.append(item)
        ranked.append(items)
    return ranked


def test_phased_fit_routes_queries_by_the_clustering_rule(fitted):
    module, data, _, _ = fitted
    assert int(module.initialised_levels) == 2  # both levels built and decoded
    assert int(module.anchored_phase) == module.phases[-1].index
    # independent: every training query's text (captions, then extra queries, by id), embedded and clustered
    # per item; the module's table, indexed by query id, holds exactly these routes
    train = data.query_batches("train")
    ids, items = train.query_index.numpy(), train.item_index.numpy()
    corpus = data.corpus
    texts = [corpus.caption_text[q] if q < len(corpus.caption_text) else corpus.extra_text[q - len(corpus.caption_text)]
             for q in ids]
    expected = cluster_routes(embed_queries(texts, "minilm_static"), items, num_views=2, seed=0)
    routes = module.sids.query_routes
    assert routes[torch.from_numpy(ids)].tolist() == expected.tolist()
    assert int((routes >= 0).sum()) == len(set(ids.tolist()))  # ids that are not training queries stay -1


def test_pool_size_and_expanded_recall_equal_a_reference_expansion_of_the_beams(fitted):
    module, data, path, fit_logged = fitted
    batch = next(iter(data.val_dataloader()))
    assert len(batch["query_index"]) == 20  # one batch: every validation query
    output = module.decode(batch["input_ids"], batch["attention_mask"])
    ranked = _expand(output.sequences, output.scores, module.sid_codes)
    assert fit_logged["val/pool_size"] == pytest.approx(sum(map(len, ranked)) / len(ranked), abs=1e-6)
    # 30 beams expand to a pool deeper than 50 items: every cut-off of expanded_recall@k is exercised
    wide = GRDRRetriever.load_from_checkpoint(path, weights_only=True, beam_size=30)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(wide, datamodule=data, verbose=False)[0]
    output = wide.decode(batch["input_ids"], batch["attention_mask"])
    ranked = _expand(output.sequences, output.scores, wide.sid_codes)
    assert logged["val/pool_size"] == pytest.approx(sum(map(len, ranked)) / len(ranked), abs=1e-6)
    gold = batch["gold_items"].tolist()
    expected = {}
    for k in (1, 10, 50, 100):
        hits = [any(g >= 0 and g in items[:k] for g in golds) for items, golds in zip(ranked, gold)]
        expected[k] = sum(hits) / len(hits)
    assert expected[1] < expected[10] < expected[50]  # a gold item beyond the ranked list's 10 items
    assert logged["val/recall@1"] == pytest.approx(expected[1], abs=1e-6)
    for k in (10, 50, 100):
        assert logged[f"val/expanded_recall@{k}"] == pytest.approx(expected[k], abs=1e-6), k
        assert logged[f"val/candidate_recall@{k}"] == logged[f"val/expanded_recall@{k}"]  # deprecated alias


def test_checkpoint_alone_decodes_and_the_test_step_returns_the_scored_pool(fitted):
    module, data, path, _ = fitted
    batch = next(iter(data.test_dataloader()))
    expected = module.retrieve(batch["input_ids"], batch["attention_mask"])
    restored = GRDRRetriever.load_from_checkpoint(path, weights_only=True)
    assert restored.item_ids == list(data.corpus.item_ids)
    assert torch.equal(restored.sid_codes, module.sid_codes)
    got = restored.retrieve(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(got, expected) and got.shape == (len(batch["query_index"]), restored.eval_max_items)
    # the test step returns the whole pool with each item's beam log-probability, for the two-stage score fusion
    step = restored.test_step(batch, 0)
    pool, scores = step["candidates"], step["candidate_scores"]
    assert torch.equal(fixed_width(pool, restored.eval_max_items), expected)
    output = restored.decode(batch["input_ids"], batch["attention_mask"])
    reference = _expand(output.sequences, output.scores, restored.sid_codes)
    assert [row[row >= 0].tolist() for row in pool] == reference
    for row, items, beams, beam_scores in zip(scores, reference, output.sequences, output.scores):
        for position, item in enumerate(items):  # the score of the first (best) beam that holds the item
            first = next(k for k, beam in enumerate(beams.tolist()) if beam in restored.sid_codes[item].tolist())
            assert float(row[position]) == float(beam_scores[first])
        assert bool((row[len(items):] == float("-inf")).all())


def test_a_checkpoint_with_top_level_sid_buffers_still_loads(fitted, tmp_path):
    """Checkpoints written before the SID state was its own module hold ``sid_codes``, ... at the top level."""
    module, data, path, _ = fitted
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["state_dict"]
    for name in ("sid_codes", "anchor_codes", "query_routes", "initialised_levels", "anchored_phase"):
        state[name] = state.pop(f"sids.{name}")
    torch.save(checkpoint, tmp_path / "old.ckpt")
    restored = GRDRRetriever.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    assert torch.equal(restored.sid_codes, module.sid_codes) and int(restored.initialised_levels) == 2
    assert torch.equal(restored.sids.query_routes, module.sids.query_routes)
    batch = next(iter(data.test_dataloader()))
    assert torch.equal(restored.retrieve(batch["input_ids"], batch["attention_mask"]),
                       module.retrieve(batch["input_ids"], batch["attention_mask"]))


def test_a_loaded_checkpoint_decodes_without_dropout(fitted):
    """``load_from_checkpoint`` returns a module in training mode; decoding must not apply its dropout (0.3)."""
    _, data, path, _ = fitted
    restored = GRDRRetriever.load_from_checkpoint(path, weights_only=True)
    assert restored.hparams.dropout == 0.3 and restored.training
    batch = next(iter(data.test_dataloader()))
    for incremental in (True, False):
        first = restored.decode(batch["input_ids"], batch["attention_mask"], incremental=incremental)
        second = restored.decode(batch["input_ids"], batch["attention_mask"], incremental=incremental)
        assert torch.equal(first.sequences, second.sequences) and torch.equal(first.scores, second.scores)
    assert torch.equal(restored.retrieve(batch["input_ids"], batch["attention_mask"]),
                       restored.retrieve(batch["input_ids"], batch["attention_mask"]))
    assert restored.training and restored.model.training  # the caller's mode is restored


def test_incremental_decoding_returns_the_beams_of_full_recomputation(fitted):
    module, data, _, _ = fitted
    batch = next(iter(data.val_dataloader()))
    for beam_size in (1, 4, 30):
        full = module.decode(batch["input_ids"], batch["attention_mask"], beam_size=beam_size, incremental=False)
        cached = module.decode(batch["input_ids"], batch["attention_mask"], beam_size=beam_size, incremental=True)
        assert torch.equal(full.sequences, cached.sequences), beam_size
        torch.testing.assert_close(full.scores, cached.scores, atol=1e-5, rtol=1e-5)


def test_swapping_two_items_codes_changes_the_decoded_items(fitted):
    """The trie follows every change of the SID table, also one that keeps the sum of the codes."""
    _, data, path, _ = fitted
    module = GRDRRetriever.load_from_checkpoint(path, weights_only=True)
    batch = next(iter(data.test_dataloader()))
    before = module.retrieve(batch["input_ids"], batch["attention_mask"])  # builds the trie
    codes = module.sid_codes
    first = int(before[0, 0])
    other = next(i for i in range(codes.shape[0])  # an item that shares no SID with the first
                 if not any(view in codes[first].tolist() for view in codes[i].tolist()))
    with torch.no_grad():
        codes[[first, other]] = codes[[other, first]].clone()
    output = module.decode(batch["input_ids"], batch["attention_mask"])
    after = module.retrieve(batch["input_ids"], batch["attention_mask"])
    expected = [items[: module.eval_max_items] for items in _expand(output.sequences, output.scores, codes)]
    assert [row[row >= 0].tolist() for row in after] == expected
    assert int(after[0, 0]) != first and other in after[0].tolist()  # the first item's SID is the other's now


def test_code_usage_balance_is_zero_for_even_use_and_high_for_collapse():
    tokenizer = MultiViewTokenizer(feature_dim=4, num_views=1, num_levels=1, codebook_size=8, latent_dim=8)
    tokenizer.codebooks[0].data.copy_(torch.eye(8))
    spread = torch.eye(8).reshape(8, 1, 8)  # each item on its own code
    collapsed = torch.eye(8)[torch.zeros(8, dtype=torch.long)].reshape(8, 1, 8)  # every item on code 0
    assert float(code_usage_balance(tokenizer, spread)) < 0.01
    assert float(code_usage_balance(tokenizer, collapsed)) > 0.9


GRDR_CLI = [
    "--data.init_args.num_items=40", "--data.init_args.feature_dim=16", "--data.init_args.batch_size=32",
    "--data.init_args.eval_batch_size=64", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.max_epochs=3", "--trainer.check_val_every_n_epoch=3",
    "--model.init_args.num_views=2", "--model.init_args.num_levels=2", "--model.init_args.codebook_size=8",
    "--model.init_args.d_model=16", "--model.init_args.tokenizer_hidden=16", "--model.init_args.num_heads=2",
    "--model.init_args.num_encoder_layers=1", "--model.init_args.num_decoder_layers=1",
    "--model.init_args.ffn_dim=32", "--model.init_args.beam_size=4", "--model.init_args.query_encoder=minilm_static",
    "--model.init_args.pretrain_epochs=[1,0]", "--model.init_args.main_epochs=[1,1]",
    "--model.init_args.fit_epochs=[0,0]", "--trainer.default_root_dir=runs/grdr",
]


def test_eval_overrides_apply_with_ckpt_path_and_others_are_refused(tmp_path, monkeypatch, capsys):
    """``grcm test -c grdr.yaml --ckpt_path=... --model.init_args.beam_size=50`` (GRDRRetriever.EVAL_OVERRIDABLE)."""
    def test_metrics(run: Path) -> dict[str, float]:
        rows = list(csv.DictReader((last_version(run) / "metrics.csv").open()))
        return {key: float(value) for row in rows for key, value in row.items() if value not in ("", None)}

    config = str(Path(__file__).resolve().parents[1] / "experiments" / "synthetic" / "grdr.yaml")
    monkeypatch.chdir(tmp_path)
    run, ckpt = tmp_path / "runs" / "grdr", "--ckpt_path=runs/grdr/checkpoints/last.ckpt"
    assert grcm("fit", "-c", config, *GRDR_CLI) == 0
    assert GRDRRetriever.EVAL_OVERRIDABLE == ("beam_size", "eval_max_items", "ks", "mrr_k", "recall_levels",
                                              "max_pool_items", "item_score", "inference_quantization")

    assert grcm("test", "-c", config, *GRDR_CLI, ckpt) == 0
    trained = test_metrics(run)
    assert grcm("test", "-c", config, *GRDR_CLI, ckpt, "--model.init_args.beam_size=50",
                "--model.init_args.ks=[1,3]", "--model.init_args.mrr_k=5", "--model.init_args.eval_max_items=20") == 0
    hparams = last_logged_hparams(run)
    assert (hparams["beam_size"], hparams["ks"], hparams["mrr_k"], hparams["eval_max_items"]) == (50, [1, 3], 5, 20)
    wide = test_metrics(run)
    assert {"test/recall@3", "test/mrr@5"} <= set(wide) and "test/recall@5" not in wide
    assert wide["test/pool_size"] > trained["test/pool_size"], "50 beams expand to more items than 4"

    capsys.readouterr()
    assert grcm("test", "-c", config, *GRDR_CLI, ckpt, "--model.init_args.num_views=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--model.init_args.num_views=1" in err and "cannot change" in err
    assert "beam_size, eval_max_items, ks, mrr_k, recall_levels, max_pool_items, item_score" in err


def test_codebook_gradients_are_summed_without_racing_threads():
    """Codebook lookups backpropagate through embedding_dense_backward (a fixed summation order), never through
    index_put with accumulate, whose multi-threaded CPU/CUDA kernels add in a run-dependent order (two identical
    GRDR fits trained different models). The gradients equal those of an explicit one-hot matmul."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    tokenizer = MultiViewTokenizer(feature_dim=8, num_views=3, num_levels=2, codebook_size=4, latent_dim=6,
                                   hidden_dim=8)
    latents = torch.nn.functional.normalize(torch.randn(32, 3, 6), dim=-1).requires_grad_()
    ops = Ops()
    with ops:
        out = tokenizer.quantize(latents)
        loss = out.vq_loss + (sum_codes(tokenizer, out.codes) * torch.linspace(-1, 1, 6)).sum()
        loss.backward()
    assert not [name for name in ops.names if "index_put" in name], "a codebook lookup backpropagates via index_put"
    assert any("embedding_dense_backward" in name for name in ops.names)
    got = [codebook.grad.clone() for codebook in tokenizer.codebooks]

    # independent: the same losses with one-hot matrix products instead of lookups
    for codebook in tokenizer.codebooks:
        codebook.grad = None
    normalize = torch.nn.functional.normalize
    vq, total, residual = 0.0, 0.0, latents
    for level, codebook in enumerate(tokenizer.codebooks):
        one_hot = torch.nn.functional.one_hot(out.codes[..., level], 4).float()  # (B, V, K)
        unit_r, chosen = normalize(residual, dim=-1), one_hot @ normalize(codebook, dim=-1)
        vq = vq + (unit_r.detach() - chosen).pow(2).sum(-1).mean()
        vq = vq + tokenizer.beta * (unit_r - chosen.detach()).pow(2).sum(-1).mean()
        vector = one_hot @ codebook
        residual, total = residual - vector, total + vector
    (vq / 2 + (total * torch.linspace(-1, 1, 6)).sum()).backward()
    for level, codebook in enumerate(tokenizer.codebooks):
        assert got[level].abs().sum() > 0
        torch.testing.assert_close(got[level], codebook.grad, rtol=1e-5, atol=1e-6)


def test_item_score_logsumexp_ranks_predictions_by_the_sum_over_views(fitted):
    from grcm.decoding.beam import logsumexp_per_item

    module, data, _, _ = fitted
    batch = next(iter(data.test_dataloader()))
    module.hparams.item_score = "logsumexp"
    try:
        ranked = module.predict_step(batch, 0)
    finally:
        module.hparams.item_score = "max"
    output = module.decode(batch["input_ids"], batch["attention_mask"])
    trie = module.recall_trie
    per_leaf = trie.max_items_per_leaf
    leaves = trie.lookup(output.sequences).masked_fill(~(output.scores > float("-inf")), -1)
    items = trie.items_of_leaves(leaves.reshape(-1), per_leaf).reshape(output.scores.shape[0], -1)
    totals = logsumexp_per_item(items, output.scores.repeat_interleave(per_leaf, dim=1))
    for row in range(items.shape[0]):
        best = {}
        for item, total in zip(items[row].tolist(), totals[row].tolist()):
            if item >= 0:
                best.setdefault(item, total)
        kept = [(item, score) for item, score in zip(ranked["items"][row].tolist(), ranked["scores"][row].tolist())
                if item >= 0]
        assert [score for _, score in kept] == sorted((score for _, score in kept), reverse=True)
        for item, score in kept:
            assert score == pytest.approx(best[item], abs=1e-5)
