"""The fused two-stage score uses the retriever's item score and can leave out ACE's unique-token level.

References are per-row Python computations: the pool expanded from the beams through the SID table, each
item's log-probability summed (log-sum-exp) or maxed over its beams, the unique level's log-probability
recomputed by a teacher-forced pass of the retriever's model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cpu_trainer import cpu_trainer

from grcm.data.datamodules import SyntheticDataModule
from grcm.decoding.beam import BeamSearchOutput
from grcm.decoding.trie import SIDTrie
from grcm.errors import GrcmError
from grcm.rerank.dual_tower import DualTower
from grcm.rerank.stage1_pool import stage1_pool
from grcm.rerank.two_stage import TwoStageEvaluation
from grcm.retriever.module import GenerativeRetriever
from grcm.tokenizers.bundle import SIDBundle
from grcm.tokenizers.unique_token import append_unique_token

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

NUM_ITEMS = 96
FEATURE_DIM = 16
BEAM = 5


# --------------------------------------------------------------------------- stage1_pool, decoding itself
class MultiViewDecoder:
    """A module without step outputs whose fixed beams reach some items through several SIDs (views)."""

    def __init__(self, item_score: str):
        # 6 SIDs over 2 levels; items 0-3, item 1 has three views, item 2 two
        codes = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]])
        self.row_items = torch.tensor([0, 1, 1, 2, 2, 3])
        self.trie = SIDTrie.from_codes(codes, [3, 2], row_items=self.row_items)
        self.codes = codes
        generator = torch.Generator().manual_seed(0)
        levels = -torch.rand(2, BEAM, 2, generator=generator) * 3  # (B, K, L) per-level log-probabilities
        sequences = torch.tensor([[[0, 1], [1, 1], [2, 0], [1, 0], [0, 0]], [[2, 1], [1, 0], [0, 1], [1, 1], [0, 0]]])
        scores = levels.sum(-1)
        order = scores.sort(dim=1, descending=True).indices
        self.output = BeamSearchOutput(
            sequences.gather(1, order[..., None].expand(-1, -1, 2)), scores.gather(1, order),
            levels.gather(1, order[..., None].expand(-1, -1, 2)),
        )
        self.hparams = {"item_score": item_score, "beam_size": BEAM}

    def decode(self, input_ids, attention_mask, beam_size):
        assert beam_size == BEAM
        return self.output


def _per_row_reference(module: MultiViewDecoder, item_score: str, drop_last: bool) -> list[dict[int, float]]:
    rows = []
    for sequences, level_scores in zip(module.output.sequences.tolist(), module.output.level_scores.tolist()):
        per_item: dict[int, list[float]] = {}
        for sid, levels in zip(sequences, level_scores):
            score = sum(levels[:-1]) if drop_last else sum(levels)
            for row, code in enumerate(module.codes.tolist()):
                if code == sid:
                    per_item.setdefault(int(module.row_items[row]), []).append(score)
        if item_score == "max":
            rows.append({item: max(values) for item, values in per_item.items()})
        else:
            rows.append({item: math.log(sum(math.exp(v) for v in values)) for item, values in per_item.items()})
    return rows


@pytest.mark.parametrize("item_score", ["max", "logsumexp"])
@pytest.mark.parametrize("drop_last", [False, True], ids=["all-levels", "without-last-level"])
def test_decoded_pool_scores_items_as_the_retriever_does(item_score: str, drop_last: bool):
    module = MultiViewDecoder(item_score)
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.bool)}
    candidates, scores, _, beam = stage1_pool(
        module, None, batch, beam_size=BEAM, recall_levels=None, generative_weight=1.0, now=lambda: 0.0,
        batch_started=0.0, exclude_last_level=drop_last,
    )
    assert beam == BEAM
    for row, expected in enumerate(_per_row_reference(module, item_score, drop_last)):
        got = {int(i): float(s) for i, s in zip(candidates[row], scores[row]) if i >= 0}
        assert got.keys() == expected.keys()
        for item, value in expected.items():
            assert got[item] == pytest.approx(value, abs=1e-5), (row, item)
    if item_score == "logsumexp":  # item 1's three views add up: above its best beam
        best = _per_row_reference(module, "max", drop_last)[0][1]
        assert _per_row_reference(module, "logsumexp", drop_last)[0][1] > best + 1e-3


# --------------------------------------------------------------------------- the callback on ACE
@pytest.fixture(scope="module")
def datamodule() -> SyntheticDataModule:
    dm = SyntheticDataModule(num_items=NUM_ITEMS, feature_dim=FEATURE_DIM, batch_size=32, eval_batch_size=48)
    dm.setup()
    return dm


_trainer = cpu_trainer


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory, datamodule) -> str:
    torch.manual_seed(0)
    model = DualTower(vocab_size=datamodule.vocab_size, feature_dim=FEATURE_DIM, embed_dim=16, text_layers=1,
                      text_width=16, text_heads=2, text_ffn=32, warmup_steps=1, lr=3e-3)
    root = tmp_path_factory.mktemp("dense")
    trainer = _trainer(root, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    path = root / "dense.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _ace(tmp_path, datamodule, unique: bool) -> GenerativeRetriever:
    index = torch.arange(NUM_ITEMS)
    prefix = torch.stack([index % 6, (index // 6) % 4], dim=1)  # 24 prefixes, 4 items each
    if unique:
        codes, unique_vocab = append_unique_token(prefix)
        vocab, names = [6, 4, unique_vocab], ["coarse", "fine_1", "unique"]
    else:
        codes, vocab, names = torch.cat([prefix, index[:, None] // 24], 1), [6, 4, 4], ["coarse", "fine_1", "fine_2"]
    bundle = SIDBundle(item_ids=datamodule.corpus.item_ids, codes=codes, vocab_sizes=vocab,
                       config={"level_names": names})
    bundle_dir = str(bundle.save(tmp_path / f"bundle_{unique}"))
    torch.manual_seed(0)
    retriever = GenerativeRetriever(bundle_dir=bundle_dir, vocab_size=datamodule.vocab_size,
                                    pad_token_id=datamodule.pad_token_id, d_model=16, num_heads=2,
                                    num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, beam_size=BEAM)
    _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(retriever, datamodule=datamodule)
    return retriever


def test_fused_score_without_the_unique_level_matches_a_teacher_forced_reference(tmp_path, datamodule,
                                                                                  dense_checkpoint):
    retriever = _ace(tmp_path, datamodule, unique=True)
    weight = 2.0
    callbacks = [TwoStageEvaluation(dense_checkpoint, name="fused", generative_weight=weight),
                 TwoStageEvaluation(dense_checkpoint, name="prefix", generative_weight=weight,
                                    exclude_unique_level=True)]
    logged = _trainer(tmp_path, callbacks=callbacks).validate(retriever, datamodule=datamodule, verbose=False)[0]

    dense = DualTower.load_from_checkpoint(dense_checkpoint, weights_only=True).eval()
    items = dense.encode_corpus(datamodule.corpus.features)
    codes = retriever.sid_codes.tolist()
    retriever.eval()
    results: dict[str, dict[str, list[float]]] = {"fused": {}, "prefix": {}}
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            queries = dense.encode_queries(batch["input_ids"], batch["attention_mask"]).numpy()
            beams = retriever.decode(batch["input_ids"], batch["attention_mask"], beam_size=BEAM)
            for row, gold in enumerate(batch["gold_items"][:, 0].tolist()):
                sids = [sid for sid, s in zip(beams.sequences[row].tolist(), beams.scores[row].tolist()) if s > -1e30]
                # teacher-forced log-probabilities of each beam's levels, one pass over its SID
                repeat = len(sids)
                logits = retriever.model(batch["input_ids"][row : row + 1].expand(repeat, -1),
                                         batch["attention_mask"][row : row + 1].expand(repeat, -1),
                                         torch.tensor(sids))
                level_lp = torch.stack([torch.log_softmax(lg.float(), -1).gather(1, torch.tensor(sids)[:, [lvl]])[:, 0]
                                        for lvl, lg in enumerate(logits)], dim=1)
                # the beam search's recorded per-level scores are these log-probabilities
                assert torch.allclose(beams.level_scores[row, :repeat], level_lp, atol=1e-5)
                for name, lp in (("fused", level_lp.sum(1)), ("prefix", level_lp[:, :-1].sum(1))):
                    fused = {}
                    for sid, score in zip(sids, lp.tolist()):
                        item = codes.index(sid)
                        fused[item] = float(np.dot(queries[row], items[item])) + weight * score
                    ranked = [i for i, _ in sorted(fused.items(), key=lambda pair: (-pair[1], pair[0]))]
                    for k in (1, 5, 10):
                        results[name].setdefault(f"recall@{k}", []).append(float(gold in ranked[:k]))
    for name, values in results.items():
        for metric, hits in values.items():
            assert logged[f"val/{name}/{metric}"] == pytest.approx(float(np.mean(hits)), abs=1e-6), (name, metric)
    assert logged["val/prefix/exclude_unique_level"] == 1.0 and "val/fused/exclude_unique_level" not in logged
    assert logged["val/prefix/candidates_per_query"] == logged["val/fused/candidates_per_query"]  # same pool
    # the unique level matters here (4 items per prefix): leaving it out changes some rankings
    assert any(logged[f"val/prefix/recall@{k}"] != logged[f"val/fused/recall@{k}"] for k in (1, 5)) or \
        logged["val/prefix/mrr@10"] != logged["val/fused/mrr@10"]


def test_exclude_unique_level_refuses_what_it_cannot_do(tmp_path, datamodule, dense_checkpoint):
    with pytest.raises(GrcmError, match="generative_weight > 0"):
        TwoStageEvaluation(dense_checkpoint, exclude_unique_level=True)
    retriever = _ace(tmp_path, datamodule, unique=False)
    callback = TwoStageEvaluation(dense_checkpoint, generative_weight=1.0, exclude_unique_level=True)
    with pytest.raises(GrcmError, match="no unique-token level"):
        _trainer(tmp_path, callbacks=[callback]).validate(retriever, datamodule=datamodule, verbose=False)
