"""``grcm fit|validate|test|predict``: :class:`GrcmCLI`, a ``LightningCLI`` with grcm's conventions.

- ``parser_mode="omegaconf+"``: ``${trainer.default_root_dir}`` and other references in configs
  follow command-line overrides (one ``--trainer.default_root_dir=<dir>`` moves a whole run).
- Sizes the model takes from the data (``feature_dim``, ``vocab_size``, ``pad_token_id``) are
  linked with ``link_arguments(..., apply_on="instantiate")``.
- **Run directories**: ``fit`` refuses a run directory whose checkpoint folder (or, for a
  tokenizer, bundle) already holds artifacts, unless it resumes (``--ckpt_path``) or is given
  ``--overwrite=true`` (then the old checkpoints/bundle are deleted first). Logs go to
  versioned ``logs/version_N`` folders, so evaluations never replace a fit's logs; the resolved
  config is saved there as ``config_<command>.yaml``. A start that fails before logging a metric
  leaves no ``version_N`` behind. A W&B-logged run gets a CSV log too (:mod:`grcm.loggers`).
- **Results**: a successful fit/validate/test writes its final metrics to ``<run dir>/results.json``
  and fit's last line names the run directory and the best checkpoint with its monitored value
  (:mod:`grcm.run_results`).
- **Restoring** (``--ckpt_path``): the checkpoint is read with ``weights_only=True`` (here and in
  Lightning's restore of the loops, unless ``--weights_only=false`` is given); a missing,
  truncated or foreign file, or another model class's checkpoint, is one
  :class:`~grcm.checkpoint.CheckpointError` line. The model is rebuilt from the checkpoint's
  hyperparameters. Command-line ``--model.*`` arguments that may change at evaluation (each
  model class lists them in ``EVAL_OVERRIDABLE``) are applied on top; any other that differs
  from the checkpoint is refused with a :class:`~grcm.errors.GrcmError` naming it. The data
  settings the fit ran with (stored in every checkpoint by
  :class:`~grcm.checkpoint.RunSettingsRecorder`; for an older checkpoint, its run's saved fit config)
  are restored the same way: the config's values are
  replaced (a notice lists them), evaluation-only ones (:data:`DATA_EVAL_OVERRIDABLE`) are taken
  from the config, and a differing one given on the command line is refused, naming the fit's saved
  config. A checkpoint whose feature or vocabulary size differs from the data is refused too.
- No abbreviated options: ``--trainer.max_epoch`` is an error that suggests ``--trainer.max_epochs``.
- Training always validates after its last epoch (also with ``check_val_every_n_epoch`` > 1),
  so a monitored ``best.ckpt`` exists after every fit that validates at all.
- ``predict`` writes each query's ranked items to JSONL (:mod:`grcm.predictions`).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from grcm.checkpoint import RUN_SETTINGS_KEY, CheckpointError, RunSettingsRecorder, read_checkpoint
from grcm.errors import GrcmError
from grcm.run_settings import (
    DATA_EVAL_OVERRIDABLE,  # noqa: F401 -- documented here, defined beside the restore rules
    check_model_class,
    command_line_keys,
    command_line_model_keys,
    restored_data_settings,
    saved_fit_settings,
)
from grcm.run_settings import import_class as _import
from grcm.run_settings import plain as _plain

#: Data attributes linked into the model's constructor when the model accepts them.
LINKED_SIZES = ("feature_dim", "vocab_size", "pad_token_id")
#: ``ckpt_path`` values that Lightning resolves itself (not file paths).
CKPT_KEYWORDS = ("best", "last", "hpc", "registry")
def stage_name(stage: Any) -> str:
    """``"fit"``, ``"validate"``, ``"test"`` or ``"predict"`` for a Lightning stage (a ``TrainerFn`` or a str)."""
    return str(getattr(stage, "value", stage))


class WandbAwareSaveConfig(SaveConfigCallback):
    """Saves the resolved config beside the logs as ``config_<command>.yaml`` (``config_fit.yaml``,
    ``config_test.yaml``, ...) and uploads it to W&B when a ``WandbLogger`` is active."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.config_filename = f"config_{stage_name(stage)}.yaml"
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
        parser_kwargs.setdefault("allow_abbrev", False)  # --trainer.max_epoch is a typo, not max_epochs
        for sub in ("fit", "validate", "test", "predict"):
            parser_kwargs.setdefault(sub, {}).setdefault("parser_mode", "omegaconf+")
            parser_kwargs[sub].setdefault("exit_on_error", False)
            parser_kwargs[sub].setdefault("allow_abbrev", False)
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
        """Parse, and remember the model and data arguments the command line gave (before a checkpoint's apply)."""
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            if "unrecognized arguments" not in str(error):
                raise
            raise self._unrecognized(str(error), argv) from error
        self._command_line_model_keys = command_line_model_keys(argv)
        self._command_line_data_keys = command_line_keys(argv, "data")
        self._config_before_checkpoint = copy.deepcopy(self._subcommand_config())

    def _unrecognized(self, message: str, argv: list[str]) -> GrcmError:
        """An unknown option as one line with the closest known ones (options are never abbreviated)."""
        subcommand = next((arg for arg in argv if arg in getattr(self, "_subcommand_parsers", {})), None)
        parser = self._subcommand_parsers[subcommand] if subcommand else self.parser
        known = [option for option in parser._option_string_actions if option.startswith("--")]
        given = re.findall(r"--[\w.\-]+", message.split("unrecognized arguments:", 1)[-1])
        hints = [match for option in given for match in difflib.get_close_matches(option, known, n=1, cutoff=0.75)]
        hint = f"; did you mean {' '.join(hints)}?" if hints else ""
        return GrcmError(
            f"unrecognized arguments: {' '.join(given) or message}{hint} (options are never abbreviated; "
            f"grcm {subcommand or '<command>'} --help lists them)"
        )

    def _subcommand_config(self, config=None):
        config = self.config if config is None else config
        subcommand = config.get("subcommand") if hasattr(config, "get") else None
        return config[subcommand] if subcommand else config

    # ------------------------------------------------------------------------ restoring checkpoints
    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` once (one-line errors), check its model class, restore its model and data settings."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or str(ckpt_path) in CKPT_KEYWORDS:
            return
        checkpoint = read_checkpoint(ckpt_path)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        self._checkpoint = {"hparams": hparams, "checkpoint": checkpoint}
        self._check_model_class(hparams.get("_class_path"), Path(ckpt_path))
        run = checkpoint.get(RUN_SETTINGS_KEY) or saved_fit_settings(Path(ckpt_path))
        self._restore_data_settings(run, Path(ckpt_path))
        model = {key: value for key, value in hparams.items() if key != "_instantiator"}  # parsing consumes it
        if not model:
            return
        if "_class_path" in model:
            model = {"class_path": model.pop("_class_path"), "dict_kwargs": model}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def _check_model_class(self, trained: str | None, ckpt_path: Path) -> None:
        model = self._subcommand_config().get("model")
        check_model_class(trained, getattr(model, "class_path", None) if model is not None else None, ckpt_path)

    def _restore_data_settings(self, run: dict[str, Any], ckpt_path: Path) -> None:
        """The fit's data settings replace the config's (:func:`grcm.run_settings.restored_data_settings`)."""
        current = self._subcommand_config().get("data")
        if current is None or not getattr(current, "class_path", None):
            return
        restored = restored_data_settings(
            current.class_path, _plain(current.init_args) or {}, run, ckpt_path, self._command_line_data_keys
        )
        if restored is not None:
            self.config = self.parser.parse_object({self.config["subcommand"]: {"data": restored}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        ckpt_path = config.get("ckpt_path")
        if "weights_only" in config and config.get("weights_only") is None:
            # Lightning reads --ckpt_path again to restore the loops; tensors and plain types only there too
            config["weights_only"] = True
        model = config.get("model")
        if model is None or not getattr(model, "class_path", None):
            return
        model_class = _import(model.class_path)
        self._drop_unknown_checkpoint_kwargs(model, model_class)
        if self._checkpoint is not None:
            self._apply_command_line_overrides(model, model_class, Path(ckpt_path))

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

    # ------------------------------------------------------------------------------- the run itself
    def instantiate_trainer(self, **kwargs: Any):
        """The trainer, plus a CSV log beside W&B and the recorder of the data settings in every checkpoint."""
        from grcm.loggers import add_csv_beside_wandb

        trainer = super().instantiate_trainer(**kwargs)
        add_csv_beside_wandb(trainer)
        data = self._subcommand_config().get("data")
        if data is not None and getattr(data, "class_path", None):
            settings = {"class_path": data.class_path, "init_args": _plain(data.init_args) or {}}
            trainer.callbacks.append(RunSettingsRecorder(settings, config_name="config_fit.yaml"))
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Run; on failure remove the log folders that logged nothing; on success write results.json."""
        from grcm.loggers import finish_wandb, new_log_dirs, remove_unused_log_dirs
        from grcm.run_results import fit_summary, write_run_results

        created = new_log_dirs(self.trainer) if self.trainer.is_global_zero else []
        try:
            super()._run_subcommand(subcommand)
        except BaseException as error:
            remove_unused_log_dirs(created)
            if isinstance(error, RuntimeError) and "Error(s) in loading state_dict" in str(error):
                ckpt_path = Path(str(self._subcommand_config().get("ckpt_path")))
                raise CheckpointError(
                    f"--ckpt_path={ckpt_path}: its weights do not fit {type(self.model).__name__} as configured (a "
                    f"checkpoint of another model or size); pass this model's checkpoint, e.g. "
                    f"{ckpt_path.parent / 'last.ckpt'}."
                ) from error
            raise
        written = write_run_results(self.trainer, subcommand, self._subcommand_config().get("ckpt_path"))
        finish_wandb(self.trainer)
        if self.trainer.is_global_zero:
            if subcommand == "fit":
                print(fit_summary(self.trainer), flush=True)
            elif written is not None:
                print(f"grcm {subcommand}: metrics in {written}", flush=True)

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
