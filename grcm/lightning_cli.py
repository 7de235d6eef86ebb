"""``grcm fit|validate|test|predict``: :class:`GrcmCLI`, a ``LightningCLI`` with grcm's conventions.

- ``parser_mode="omegaconf+"``: ``${trainer.default_root_dir}`` and other references in configs
  follow command-line overrides (one ``--trainer.default_root_dir=<dir>`` moves a whole run).
- Sizes the model takes from the data (``feature_dim``, ``vocab_size``, ``pad_token_id``) are
  linked with ``link_arguments(..., apply_on="instantiate")``.
- **Run directories**: ``fit`` refuses a run directory whose checkpoint folder (or, for a
  tokenizer, bundle) already holds artifacts, unless it resumes (``--ckpt_path``) or is given
  ``--overwrite=true`` (then the old checkpoints/bundle are deleted first). Logs go to
  versioned ``logs/version_N`` folders, so evaluations never replace a fit's logs.
- **Restoring** (``--ckpt_path``): Lightning rebuilds the model from the checkpoint's
  hyperparameters. Command-line ``--model.*`` arguments that may change at evaluation (each
  model class lists them in ``EVAL_OVERRIDABLE``) are applied on top; any other that differs
  from the checkpoint is refused with a :class:`~grcm.errors.GrcmError` naming it. A checkpoint
  whose feature or vocabulary size differs from the data is refused too.
- Training always validates after its last epoch (also with ``check_val_every_n_epoch`` > 1),
  so a monitored ``best.ckpt`` exists after every fit that validates at all.
- ``predict`` writes each query's ranked items to JSONL (:mod:`grcm.predictions`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from grcm.errors import GrcmError

#: Data attributes linked into the model's constructor when the model accepts them.
LINKED_SIZES = ("feature_dim", "vocab_size", "pad_token_id")
#: ``ckpt_path`` values that Lightning resolves itself (not file paths).
CKPT_KEYWORDS = ("best", "last", "hpc", "registry")


class WandbAwareSaveConfig(SaveConfigCallback):
    """Saves the resolved config beside the logs (``config.yaml``; ``config_<command>.yaml`` for evaluations)
    and uploads it to W&B when a ``WandbLogger`` is active."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            self.config_filename = f"config_{stage}.yaml"
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """After fit/test: results table and SID health table/plot to W&B (rank 0; no-op without W&B)."""
        from grcm.loggers import log_run_tables

        log_run_tables(trainer, pl_module, stage)


class ValidateLastEpoch(Callback):
    """Runs validation after the final training epoch even when ``check_val_every_n_epoch`` skips it."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        every = trainer.check_val_every_n_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch == trainer.max_epochs - 1
        if last and every is not None and every > 1:
            trainer.check_val_every_n_epoch = 1


def _import(class_path: str):
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def _plain(value: Any) -> Any:
    """Namespaces, dataclasses and tuples as plain dicts/lists, for comparing config values."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def command_line_model_keys(argv: list[str]) -> list[str]:
    """Top-level model argument names given on the command line (``--model.init_args.beam_size=5`` -> beam_size)."""
    keys = []
    for token in argv:
        if not token.startswith("--model."):
            continue
        name = token[len("--model.") :].split("=", 1)[0]
        name = name.removeprefix("init_args.").removeprefix("dict_kwargs.")
        name = name.split(".", 1)[0]
        if name and name not in ("class_path", "help", "init_args", "dict_kwargs") and name not in keys:
            keys.append(name)
    return keys


class GrcmCLI(LightningCLI):
    """LightningCLI with subclass-mode model/data, omegaconf+ interpolation, size links and grcm's run rules."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", WandbAwareSaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        parser_kwargs.setdefault("exit_on_error", False)  # grcm.cli.main prints parse errors as one line
        for sub in ("fit", "validate", "test", "predict"):
            parser_kwargs.setdefault(sub, {}).setdefault("parser_mode", "omegaconf+")
            parser_kwargs[sub].setdefault("exit_on_error", False)
        self._checkpoint: dict[str, Any] | None = None
        # configs name keys from their own root (${trainer.default_root_dir}) with or without a subcommand
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        super().__init__(*args, **kwargs)

    # ----------------------------------------------------------------------------------- parsing
    def add_arguments_to_parser(self, parser) -> None:
        """Link the DataModule's sizes into the model; add ``--overwrite``."""
        for name in LINKED_SIZES:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: replace the checkpoints (and tokenizer bundle) of the run directory if it already holds a run",
        )

    def parse_arguments(self, parser, args) -> None:
        """Parse, and remember the model arguments the command line gave (before a checkpoint's hparams apply)."""
        super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        self._command_line_model_keys = command_line_model_keys(argv)
        self._config_before_checkpoint = copy.deepcopy(self._subcommand_config())

    def _subcommand_config(self, config=None):
        config = self.config if config is None else config
        subcommand = config.get("subcommand") if hasattr(config, "get") else None
        return config[subcommand] if subcommand else config

    # ------------------------------------------------------------------------ restoring checkpoints
    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in CKPT_KEYWORDS:
            self._checkpoint = self._load_checkpoint(Path(ckpt_path))
        model = config.get("model")
        if model is None or not getattr(model, "class_path", None):
            return
        model_class = _import(model.class_path)
        self._drop_unknown_checkpoint_kwargs(model, model_class)
        if self._checkpoint is not None:
            self._apply_command_line_overrides(model, model_class, Path(ckpt_path))

    @staticmethod
    def _load_checkpoint(path: Path) -> dict[str, Any]:
        if not path.is_file():
            found = sorted(p.name for p in path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
            hint = (
                f"{path.parent} holds {', '.join(found)}"
                if found
                else "train one first (grcm fit -c <config>), or check the run directory"
            )
            raise GrcmError(f"--ckpt_path={path}: no such checkpoint; {hint}.")
        import torch

        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 -- any unreadable file is the user's to replace
            raise GrcmError(f"--ckpt_path={path}: not a readable checkpoint ({type(error).__name__}); "
                            "pass a .ckpt written by grcm fit.") from error
        return {"hparams": dict(checkpoint.get("hyper_parameters", {})), "checkpoint": checkpoint}

    @staticmethod
    def _drop_unknown_checkpoint_kwargs(model, model_class) -> None:
        """A checkpoint's hparams (``dict_kwargs``) record every linked data size; drop those the class cannot take."""
        extra = getattr(model, "dict_kwargs", None)
        if not extra:
            return
        parameters = inspect.signature(model_class.__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return
        for name in [key for key in extra if key not in parameters]:
            del extra[name]

    def _apply_command_line_overrides(self, model, model_class, ckpt_path: Path) -> None:
        """Apply the command line's evaluation-safe model arguments; refuse the others when they differ."""
        hparams = self._checkpoint["hparams"]
        requested_model = self._config_before_checkpoint.get("model")
        requested = getattr(requested_model, "init_args", None)
        safe = tuple(getattr(model_class, "EVAL_OVERRIDABLE", ()))
        for key in self._command_line_model_keys:
            if requested is None or key not in requested:
                continue
            value = requested[key]
            if _plain(value) == _plain(hparams.get(key, value if key not in hparams else object())):
                continue
            if key not in safe:
                allowed = ", ".join(safe) or "none"
                raise GrcmError(
                    f"--model.init_args.{key}={_plain(value)!r} cannot change when restoring {ckpt_path} "
                    f"(it was trained with {key}={_plain(hparams.get(key))!r}); drop the argument or train a new "
                    f"model. Arguments {model_class.__name__} accepts with --ckpt_path: {allowed}."
                )
            if key == "bundle_dir":
                self._check_bundle_matches_checkpoint(str(value), ckpt_path)
            model.init_args[key] = value
            extra = getattr(model, "dict_kwargs", None)
            if extra and key in extra:
                extra[key] = value

    def _check_bundle_matches_checkpoint(self, bundle_dir: str, ckpt_path: Path) -> None:
        """A new ``bundle_dir`` is accepted only when its SIDs are those the checkpoint was trained on."""
        import torch

        from grcm.tokenizers.bundle import SIDBundle

        checkpoint = self._checkpoint["checkpoint"]
        codes = checkpoint.get("state_dict", {}).get("sid_codes")
        extras = checkpoint.get("sid_bundle") or {}
        bundle = SIDBundle.load(bundle_dir)
        same = (
            codes is not None
            and tuple(bundle.codes.shape) == tuple(codes.shape)
            and torch.equal(bundle.codes.long(), codes.long())
            and list(bundle.item_ids) == list(extras.get("item_ids", bundle.item_ids))
        )
        if not same:
            raise GrcmError(
                f"--model.init_args.bundle_dir={bundle_dir}: its SIDs differ from those {ckpt_path} was trained on; "
                "a checkpoint decodes only into its own SIDs (it carries them: drop --model.init_args.bundle_dir), "
                "or train a retriever on this bundle."
            )

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self._checkpoint is None or getattr(self, "datamodule", None) is None:
            return
        hparams, ckpt_path = self._checkpoint["hparams"], self._subcommand_config().get("ckpt_path")
        for name, what in (("feature_dim", "item feature dimension"), ("vocab_size", "query vocabulary size")):
            trained, served = hparams.get(name), getattr(self.datamodule, name, None)
            if trained is not None and served is not None and int(trained) != int(served):
                raise GrcmError(
                    f"--ckpt_path={ckpt_path} was trained with {what} {name}={trained}, but the data serves "
                    f"{name}={served} (data: {type(self.datamodule).__name__}); evaluate the checkpoint on the "
                    "corpus and data settings it was trained with, or train a model for this data."
                )

    # ---------------------------------------------------------------------------- run directories
    def before_fit(self) -> None:
        config = self._subcommand_config()
        self._guard_run_directory(bool(config.get("ckpt_path")), bool(config.get("overwrite")))
        self.trainer.callbacks.append(ValidateLastEpoch())

    def output_paths(self) -> list[Path]:
        """Folders a fit writes that must not hold another run's artifacts: checkpoint dirs and model outputs."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        paths = [Path(cb.dirpath) for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        for name in getattr(type(self.model), "OUTPUT_DIRS", ()):
            value = self.model.hparams.get(name)
            if value:
                paths.append(Path(value))
        return paths

    def _guard_run_directory(self, resuming: bool, overwrite: bool) -> None:
        occupied = [path for path in self.output_paths() if path.is_dir() and any(path.iterdir())]
        if not occupied or resuming:
            return
        if overwrite:
            if self.trainer.is_global_zero:
                import shutil

                for path in occupied:
                    shutil.rmtree(path)
            return
        root = self.trainer.default_root_dir
        raise GrcmError(
            f"{occupied[0]} already holds another run's artifacts; choose a new run directory with "
            f"--trainer.default_root_dir=<dir> (now {root}), resume that run with --ckpt_path=<its last.ckpt>, "
            "or replace it with --overwrite=true."
        )

    # ----------------------------------------------------------------------------------- predict
    def before_predict(self) -> None:
        from grcm.predictions import RankedPredictionWriter

        if not any(isinstance(cb, RankedPredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(RankedPredictionWriter())
