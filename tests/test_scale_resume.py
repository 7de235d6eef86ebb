"""benchmarks/scale.py's fits resume mid-fit: a fit killed after its first epoch continues from its last.ckpt
at the second epoch and ends with the weights, SID bundle, steps and record of an uninterrupted fit."""

from pathlib import Path

import lightning as L
import pytest
import torch
from benchmark_scripts import load_benchmark

from grcm.checkpoint import read_checkpoint
from grcm.demo import GRDR_DEMO, Stage
from grcm.tokenizers.bundle import SIDBundle

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

NUM_ITEMS = 300


class Killed(Exception):
    """Stands for the process being killed."""


class KillAtEpoch(L.Callback):
    """Raise when epoch ``epoch`` is about to start (every earlier epoch's checkpoint is on disk by then)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Killed(f"killed before epoch {self.epoch}")


class TrainedEpochs(L.Callback):
    """The epochs in which at least one training batch ran."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch not in self.epochs:
            self.epochs.append(trainer.current_epoch)


def _size(scale, root: Path):
    args = scale.parse_args(["--quick", "--sizes", str(NUM_ITEMS), "--test-queries", "40", "--root", str(root)])
    return scale.SizeRun(root, NUM_ITEMS, args)


def _fit(scale, size, stage, *callbacks) -> list[int]:
    """Run one fit stage of the size; the epochs it trained."""
    trained = TrainedEpochs()
    scale.run_stage(size, stage, callbacks=(trained, *callbacks))
    return trained.epochs


def _weights(size, run: str) -> dict[str, torch.Tensor]:
    return read_checkpoint(size.dir / run / "checkpoints" / "last.ckpt")["state_dict"]


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


def test_a_killed_fit_continues_at_its_next_epoch_and_ends_as_an_uninterrupted_one(tmp_path):
    """GRDR (--quick: 4 epochs, validating only after the last): its last.ckpt comes from the epoch-end writer."""
    scale = load_benchmark("scale")
    grdr = Stage(scale.FIT_GRDR, "grdr.yaml", test=False, overrides=GRDR_DEMO)
    straight = _size(scale, tmp_path / "straight")
    assert _fit(scale, straight, grdr) == [0, 1, 2, 3]
    once = straight.state["fits"][scale.FIT_GRDR]
    assert (once["epochs"], once["sessions"], once["resumed_from_epoch"]) == (4, 1, 0)

    killed = _size(scale, tmp_path / "killed")
    with pytest.raises(Killed):
        _fit(scale, killed, grdr, KillAtEpoch(2))
    assert scale.FIT_GRDR not in killed.state["fits"]  # not recorded: the next run must fit on
    assert _fit(scale, killed, grdr) == [2, 3]  # epochs 0 and 1 are not trained again
    twice = killed.state["fits"][scale.FIT_GRDR]
    assert (twice["epochs"], twice["steps"], twice["sessions"], twice["resumed_from_epoch"]) == (
        4, once["steps"], 2, 2)
    assert twice["seconds"] > 0
    straight_weights = _weights(straight, "grdr")
    assert _differing(straight_weights, _weights(killed, "grdr")) == []  # exact resume (grcm.resume)
    for size in (straight, killed):  # the epoch-end file never makes ModelCheckpoint version its own (last-v1)
        names = {path.name for path in (size.dir / "grdr" / "checkpoints").iterdir()}
        assert names == {"best.ckpt", "last.ckpt", "epoch_end.ckpt"}, names

    # killed after its last checkpoint but before results.json recorded it: nothing is trained again
    del killed.state["fits"][scale.FIT_GRDR]
    assert _fit(scale, killed, grdr) == []
    again = killed.state["fits"][scale.FIT_GRDR]
    assert (again["epochs"], again["steps"], again["resumed_from_epoch"], again["sessions"]) == (4, once["steps"], 4, 3)
    assert _differing(straight_weights, _weights(killed, "grdr")) == []


def test_the_tokenizer_resumes_after_its_first_epoch_and_restarts_without_a_checkpoint(tmp_path):
    """ACE tokenizer (--quick: 2 epochs, validating each): a kill before the first checkpoint starts over; a kill
    after epoch 1 resumes at epoch 2 and still writes the SID bundle."""
    scale = load_benchmark("scale")
    tokenizer = Stage(scale.FIT_TOKENIZER, "ace_tokenizer.yaml", test=False)
    size = _size(scale, tmp_path)
    with pytest.raises(Killed):
        _fit(scale, size, tokenizer, KillAtEpoch(0))
    assert not (size.dir / "ace_tokenizer" / "checkpoints" / "last.ckpt").exists()
    with pytest.raises(Killed):
        _fit(scale, size, tokenizer, KillAtEpoch(1))  # the second run starts from scratch, then is killed
    assert read_checkpoint(size.dir / "ace_tokenizer" / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert _fit(scale, size, tokenizer) == [1]
    record = size.state["fits"][scale.FIT_TOKENIZER]
    assert (record["epochs"], record["sessions"], record["resumed_from_epoch"]) == (2, 2, 1)
    assert SIDBundle.load(size.dir / "ace_tokenizer" / "bundle").num_items == NUM_ITEMS
