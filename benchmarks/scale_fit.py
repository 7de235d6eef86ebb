"""Resumable fits of benchmarks/scale.py: a killed fit continues from its run directory's latest checkpoint.

A fit stage runs in its own run directory (``<root>/<N>/<config stem>``, :func:`grcm.demo._run_dir`). Its
config's :class:`grcm.checkpoint.ModelCheckpoint` writes ``checkpoints/last.ckpt`` when it validates, which
for the configs that validate only at the end (``check_val_every_n_epoch`` > 1: the ACE and GRDR retrievers)
is once per fit; :class:`EpochEndCheckpoint` adds ``checkpoints/epoch_end.ckpt`` at every epoch end (its own
name: Lightning's ``ModelCheckpoint`` would version its ``last.ckpt`` to ``last-v1.ckpt`` beside a file it did
not write). When the stage runs again and finds either, the fit resumes from the later of the two (the larger
``global_step``; :func:`resume_checkpoint`) with Lightning's ``ckpt_path``: weights, optimizer, scheduler,
loop counters, data order and random state come back (:mod:`grcm.resume`), so the resumed fit ends where an
uninterrupted one would. A fit whose latest checkpoint is already at its final epoch trains nothing
(Lightning's loop is done) and only reruns the end-of-fit hooks (the tokenizer's bundle, the dual tower's
index). A run directory without either file (killed before its first epoch ended) is cleared and the fit
starts from scratch.

Training time survives the restarts: :class:`FitClock` stores the wall seconds spent so far in every
checkpoint, so a fit's recorded time is the sum over its sessions (minus what a kill threw away after the
last checkpoint), and ``sessions`` counts the processes that trained it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from grcm.demo import BUNDLE_OF, Stage, _run_dir


class FitClock(L.Callback):
    """Wall seconds of one fit across restarts (kept in each checkpoint's callback state), and its sessions.

    ``seconds()`` is the time of earlier sessions (up to their last checkpoint) plus this session's time
    since ``setup``.
    """

    def __init__(self) -> None:
        self.earlier_seconds, self.earlier_sessions = 0.0, 0
        self._started = time.perf_counter()

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._started = time.perf_counter()

    def seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self._started

    def sessions(self) -> int:
        return self.earlier_sessions + 1

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds(), "sessions": self.sessions()}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.earlier_seconds = float(state_dict["seconds"])
        self.earlier_sessions = int(state_dict["sessions"])


class EpochEndCheckpoint(Checkpoint):
    """Write the latest training state to ``path`` at the end of every training epoch (atomically).

    A :class:`~lightning.pytorch.callbacks.Checkpoint` subclass, so Lightning calls its ``on_train_epoch_end``
    after the LightningModule's (GRDR's end-of-epoch code snapshot is in the file) and with the config's
    ``ModelCheckpoint``. The file is written beside ``path`` and renamed over it: a kill while writing leaves
    the previous epoch's file intact.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        partial = self.path.with_name(self.path.name + ".partial")
        trainer.save_checkpoint(partial, weights_only=False)  # the full training state: optimizer, loops, callbacks
        if trainer.is_global_zero:
            os.replace(partial, self.path)


def epoch_end_checkpoint(run_dir: Path) -> Path:
    """Where :class:`EpochEndCheckpoint` writes, beside the configs' ``ModelCheckpoint`` files
    (``dirpath: ${trainer.default_root_dir}/checkpoints``)."""
    return run_dir / "checkpoints" / "epoch_end.ckpt"


def resume_checkpoint(run_dir: Path) -> tuple[Path | None, dict]:
    """The latest training state of a run directory and its contents: of ``epoch_end.ckpt`` and the config's
    ``last.ckpt``, the one with the larger ``global_step`` (``epoch_end.ckpt`` on a tie: it is written after
    the other in the same step). ``(None, {})`` when there is neither."""
    from grcm.checkpoint import read_checkpoint

    found = []
    for rank, path in enumerate((run_dir / "checkpoints" / "last.ckpt", epoch_end_checkpoint(run_dir))):
        if path.is_file():
            state = read_checkpoint(path)
            found.append((int(state.get("global_step", 0)), rank, path, state))
    if not found:
        return None, {}
    _, _, path, state = max(found, key=lambda entry: entry[:2])
    return path, state


def fit_stage(stage: Stage, experiments: Path, checkpoints: dict[str, str], out: Path, callbacks: tuple = ()) -> dict:
    """Fit one stage in ``<out>/<config stem>``, resuming from its latest checkpoint when one is there.

    Args:
        stage: a fit-only stage (``fit=True, test=False``) with the size's overrides.
        experiments: folder of the stage configs.
        checkpoints: fitted stage name -> best checkpoint; this stage's is added.
        out: the size's folder.
        callbacks: extra Lightning callbacks for the fit (tests use them to stop a fit).

    Returns:
        the fit's record: best ``checkpoint``, wall ``seconds`` over all sessions, ``sessions``,
        ``resumed_from_epoch`` (epochs finished before this session; 0 for a fresh fit), ``epochs`` and
        ``steps`` (from the latest checkpoint at the end).
    """
    from grcm.lightning_cli import GrcmCLI  # imports Lightning's CLI: not at module import

    if stage.test or not stage.fit:
        raise ValueError(f"fit_stage runs fit-only stages; {stage.name!r} has fit={stage.fit}, test={stage.test}")
    run_dir = _run_dir(out, stage.config)
    last, state = resume_checkpoint(run_dir)
    resume = last is not None
    resumed_from = int(state.get("epoch", -1)) + 1 if resume else 0
    if not resume:  # nothing to continue: a fit killed before its first checkpoint leaves only logs
        shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"--trainer.default_root_dir={run_dir}"]
    if stage.config in BUNDLE_OF:
        overrides.append(f"--model.init_args.bundle_dir={_run_dir(out, BUNDLE_OF[stage.config]) / 'bundle'}")
    cli = GrcmCLI(args=["-c", str(experiments / stage.config), *overrides, *stage.overrides], run=False)
    clock = FitClock()
    cli.trainer.callbacks.extend([clock, EpochEndCheckpoint(epoch_end_checkpoint(run_dir)), *callbacks])
    if resume:
        print(f"resuming {run_dir} from {last} ({resumed_from} epochs done)", flush=True)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if resume else None, weights_only=True)
    latest, state = resume_checkpoint(run_dir)
    callback = cli.trainer.checkpoint_callback
    best = callback.best_model_path or callback.last_model_path or str(latest)
    checkpoints[stage.name] = best
    return {"checkpoint": best, "seconds": clock.seconds(), "sessions": clock.sessions(),
            "resumed_from_epoch": resumed_from, "epochs": int(state.get("epoch", -1)) + 1,
            "steps": int(state.get("global_step", 0)), "loadavg_after": os.getloadavg()}
