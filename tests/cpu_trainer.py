"""A quiet one-process CPU ``L.Trainer`` for the tests (no logger, checkpoints, progress bar or sanity check).

Not a test module; test files import it by name (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L


def cpu_trainer(root: str | Path | None = None, **overrides) -> L.Trainer:
    """A Trainer on one CPU process writing under ``root`` (if given); ``overrides`` replace any default."""
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    if root is not None:
        args["default_root_dir"] = str(root)
    return L.Trainer(**{**args, **overrides})
