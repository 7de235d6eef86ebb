"""Exact resume: a fit killed mid-epoch and resumed with ckpt_path="last" ends bit-identical to an uninterrupted fit.

Covered: the generative retriever killed inside its LR warm-up and inside its second cosine
period (after a warm restart), the SID tokenizer killed inside its warm-up with dead-code
restarts on, and GRDR killed inside later phases of its level-by-level schedule (right after a
level's K-Means initialisation, and in a phase with the tokenizer frozen); data order, dropout
RNG, optimizer, scheduler, K-Means/restart state and GRDR's phase, frozen parameters and anchors
must all come back.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler
from toy_sid import save_toy_bundle

from grcm.checkpoint import ModelCheckpoint
from grcm.data.datamodules import SyntheticDataModule
from grcm.resume import ResumableSampler
from grcm.retriever.grdr import GRDRRetriever
from grcm.retriever.module import GenerativeRetriever
from grcm.tokenizers.bundle import SIDBundle
from grcm.tokenizers.module import ACETokenizer


class Killed(Exception):
    """Stands for the process being killed."""


class KillAt(L.Callback):
    """Raise when step ``step`` is about to start (the checkpoint of step ``step`` is on disk by then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed before step {self.step}")


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py


def _fit(make_model, make_data, root: Path, *, max_epochs: int, every: int, kill: int | None = None, resume=False,
         monitor: str = "val/recall@1", mode: str = "max", callbacks=()):
    """Fit with the configs' checkpointing: best by a validation metric, last.ckpt every ``every`` steps."""
    L.seed_everything(0, verbose=False)
    model, data = make_model(), make_data()
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_last=True, monitor=monitor,
                                 mode=mode, filename="best")
    callbacks = [checkpoint, *callbacks] + ([KillAt(kill)] if kill is not None else [])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=callbacks, num_sanity_val_steps=1,
    )
    if kill is not None:
        with pytest.raises(Killed):
            trainer.fit(model, data)
        assert (root / "ckpt" / "last.ckpt").is_file()
        return None, None
    trainer.fit(model, data, ckpt_path="last" if resume else None)
    return model, trainer


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [name for name in sa if not torch.equal(sa[name], sb[name])]
    assert not different, f"resumed fit differs in {different}"


# ----------------------------------------------------------------------------- retriever

NUM_ITEMS = 50


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> str:
    data = SyntheticDataModule(num_items=NUM_ITEMS, feature_dim=16)
    data.setup()
    return save_toy_bundle(data.corpus.item_ids, tmp_path_factory.mktemp("bundle") / "toy")


def _retriever_parts(bundle_dir: str):
    def make_data():
        return SyntheticDataModule(num_items=NUM_ITEMS, feature_dim=16, batch_size=32, eval_batch_size=25)

    def make_model():
        return GenerativeRetriever(
            bundle_dir=bundle_dir, vocab_size=30522, d_model=16, num_heads=2, num_encoder_layers=1,
            num_decoder_layers=1, ffn_dim=32, beam_size=4, lr=3e-3, rdrop_omega=0.15, dropout=0.1,
            warmup_epochs=0.5, restart_period=1.0,  # 8 steps/epoch: warm-up steps 0-3, cosine restart at step 12
        )

    return make_model, make_data


@pytest.mark.parametrize("kill_step", [2, 14], ids=["in-warmup", "in-second-cosine-period"])
def test_retriever_resumes_exactly(tmp_path, bundle_dir, kill_step):
    make_model, make_data = _retriever_parts(bundle_dir)
    straight, straight_trainer = _fit(make_model, make_data, tmp_path / "straight", max_epochs=2, every=100)
    _fit(make_model, make_data, tmp_path / "killed", max_epochs=2, every=kill_step, kill=kill_step)
    resumed, resumed_trainer = _fit(make_model, make_data, tmp_path / "killed", max_epochs=2, every=100, resume=True)

    assert straight_trainer.global_step == resumed_trainer.global_step == 16
    _assert_same_state(straight, resumed)
    lr = [t.optimizers[0].param_groups[0]["lr"] for t in (straight_trainer, resumed_trainer)]
    assert lr[0] == lr[1]
    metrics = [t.callback_metrics for t in (straight_trainer, resumed_trainer)]
    for name in ("val/recall@1", "val/recall@10", "val/mrr@10", "val/ce"):
        assert float(metrics[0][name]) == float(metrics[1][name]), name


def test_resuming_at_the_kill_point_matters(tmp_path, bundle_dir):
    """Control: resuming with a different seed changes the result, so the equality above is informative."""
    make_model, make_data = _retriever_parts(bundle_dir)
    straight, _ = _fit(make_model, make_data, tmp_path / "a", max_epochs=1, every=100)
    L.seed_everything(1, verbose=False)
    model, data = make_model(), make_data()
    L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, limit_val_batches=0).fit(model, data)
    with pytest.raises(AssertionError):
        _assert_same_state(straight, model)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_resumes_exactly_in_warmup_with_dead_code_restarts(tmp_path):
    def make_data():
        return SyntheticDataModule(serve="items", num_items=300, feature_dim=32, batch_size=100, eval_batch_size=300)

    def make_model(root):
        return lambda: ACETokenizer(
            feature_dim=32, coarse_codebook_size=8, codebook_size=16, latent_dim=8, hidden_dims=(32, 16),
            dropout=0.1, lr=1e-3, warmup_epochs=3, dead_code_restart=True, dead_code_min_usage=4,
            health_pairs=200, bundle_dir=str(root / "bundle"),
        )

    recon = dict(monitor="val/recon", mode="min")
    straight, straight_trainer = _fit(make_model(tmp_path / "a"), make_data, tmp_path / "a", max_epochs=3, every=100,
                                      **recon)
    _fit(make_model(tmp_path / "b"), make_data, tmp_path / "b", max_epochs=3, every=4, kill=4, **recon)  # epoch 1
    resumed, resumed_trainer = _fit(make_model(tmp_path / "b"), make_data, tmp_path / "b", max_epochs=3, every=100,
                                    resume=True, **recon)

    _assert_same_state(straight, resumed)
    restarted = [float(straight_trainer.logged_metrics.get(f"sid/level{i}_restarted", 0)) for i in (1, 2)]
    assert straight_trainer.global_step == resumed_trainer.global_step == 9
    for name in ("val/recon", "sid/collision_rate", "sid/recon_mse", "sid/level1_restarted"):
        assert float(straight_trainer.callback_metrics[name]) == float(resumed_trainer.callback_metrics[name]), name
    a, b = SIDBundle.load(tmp_path / "a" / "bundle"), SIDBundle.load(tmp_path / "b" / "bundle")
    assert torch.equal(a.codes, b.codes)
    assert restarted is not None


# ----------------------------------------------------------------------------- GRDR

class PhaseRecorder(L.Callback):
    """At the first training step of every epoch: GRDR's phase, its trainable parameters, the codes the next
    ``train/code_drift`` compares with and the drift logged at the end of the previous epoch."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch in self.epochs:
            return
        phase = pl_module.phase_of_epoch(trainer.current_epoch)
        drift = trainer.callback_metrics.get("train/code_drift")  # not known in the epoch a fit resumes in
        previous = pl_module._previous_codes
        self.epochs[trainer.current_epoch] = {
            "phase": (phase.index, phase.name, phase.level),
            "trainable": sorted(name for name, param in pl_module.named_parameters() if param.requires_grad),
            "initialised_levels": int(pl_module.initialised_levels),
            "anchored_phase": int(pl_module.anchored_phase),
            "previous_codes": None if previous is None else previous.tolist(),
            "previous_code_drift": None if drift is None else float(drift),
        }


def _grdr_parts():
    def make_data():
        return SyntheticDataModule(num_items=40, feature_dim=16, batch_size=32, eval_batch_size=40,
                                   max_val_queries=20)  # 200 train captions: 7 steps per epoch

    def make_model():
        return GRDRRetriever(  # phases: pretrain 0 | main 0 | fit 0 | main 1 (epoch 3) | fit 1 (epochs 4-5)
            vocab_size=30522, feature_dim=16, num_views=2, num_levels=2, codebook_size=8, d_model=16,
            tokenizer_hidden=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, dropout=0.1,
            beam_size=4, query_encoder="minilm_static", pretrain_epochs=[1, 0], main_epochs=1, fit_epochs=[1, 2],
        )

    return make_model, make_data


@pytest.mark.parametrize("kill_step", [23, 31], ids=["after-level-1-kmeans", "in-frozen-tokenizer-phase"])
def test_grdr_resumes_in_the_right_phase(tmp_path, kill_step):
    """Killed in epoch 3 (main, level 1, its codebook just K-Means-initialised) or epoch 4 (fit, tokenizer frozen)."""
    make_model, make_data = _grdr_parts()
    loss = dict(monitor="train/loss", mode="min")  # no val metric before level 0 exists
    straight_phases, resumed_phases = PhaseRecorder(), PhaseRecorder()
    straight, straight_trainer = _fit(make_model, make_data, tmp_path / "straight", max_epochs=6, every=100,
                                      callbacks=[straight_phases], **loss)
    _fit(make_model, make_data, tmp_path / "killed", max_epochs=6, every=kill_step, kill=kill_step, **loss)
    resumed, resumed_trainer = _fit(make_model, make_data, tmp_path / "killed", max_epochs=6, every=100, resume=True,
                                    callbacks=[resumed_phases], **loss)

    resumed_epoch = kill_step // 7
    assert sorted(resumed_phases.epochs) == list(range(resumed_epoch, 6))
    phase = resumed_phases.epochs[resumed_epoch]["phase"]
    assert phase == ((3, "main", 1) if kill_step == 23 else (4, "fit", 1))
    for epoch, record in resumed_phases.epochs.items():
        expected = dict(straight_phases.epochs[epoch])
        if epoch == resumed_epoch:
            record, expected = dict(record), expected
            del record["previous_code_drift"], expected["previous_code_drift"]
        assert record == expected, epoch  # phase, frozen set, K-Means / anchor state, drift
    frozen = [name for name in straight_phases.epochs[4]["trainable"] if name.startswith("tokenizer.")]
    assert not frozen and straight_phases.epochs[3]["trainable"] != straight_phases.epochs[4]["trainable"]

    assert straight_trainer.global_step == resumed_trainer.global_step == 42
    _assert_same_state(straight, resumed)
    metrics = [t.callback_metrics for t in (straight_trainer, resumed_trainer)]
    names = ["val/recall@1", "val/recall@10", "val/mrr@10", "val/pool_size", "val/candidate_recall@10",
             "train/code_drift", "sid/unique_sids_per_item", "phase/index"]
    for name in names:
        assert float(metrics[0][name]) == float(metrics[1][name]), name


# ----------------------------------------------------------------------------- sampler

def test_resumable_sampler_shards_like_distributed_sampler_and_skips_done_batches():
    data = list(range(10))
    done = [0]
    sampler = ResumableSampler(data, num_replicas=2, rank=1, seed=3, batch_size=2, batches_done=lambda: done[0])
    reference = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
    assert list(sampler) == list(reference)
    done[0] = 1  # resumed after one batch of two samples
    assert list(sampler) == list(reference)[2:]
    sampler.set_epoch(1), reference.set_epoch(1)
    done[0] = 0
    assert list(sampler) == list(reference) != list(ResumableSampler(data, 2, 1, 3))
