"""What a checkpoint remembers of the run that built it, and how ``--ckpt_path`` puts it back.

A fit writes its resolved data settings into every checkpoint
(:class:`grcm.checkpoint.RunSettingsRecorder`, key ``"grcm_run"``). When ``grcm test|validate|predict``
(or a resumed ``grcm fit``) is given that checkpoint, :func:`restored_data_settings` rebuilds the data
section of the config from it:

- a value the config files set differently is replaced by the checkpoint's (the notice lists them), so
  ``grcm test -c <config> --ckpt_path=<run>/checkpoints/best.ckpt`` evaluates on the corpus, sizes and
  query vocabulary the model was trained on, whatever overrides the fit had;
- evaluation-only arguments (:data:`DATA_EVAL_OVERRIDABLE`, or the data class's ``EVAL_OVERRIDABLE``)
  keep the config's value;
- a differing value given on the command line is refused with one line naming the argument, the
  checkpoint's value and the fit's saved config (``<run>/logs/version_N/config_fit.yaml``).

A checkpoint written before grcm stored its data settings gets them from its run's saved fit config
instead (:func:`saved_fit_settings`). :func:`check_model_class` refuses a checkpoint of another model class (a tokenizer's checkpoint given to a
retriever config). :func:`command_line_keys` tells which arguments the command line itself gave.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Any

from grcm.checkpoint import CheckpointError
from grcm.errors import GrcmError

__all__ = [
    "DATA_EVAL_OVERRIDABLE",
    "check_model_class",
    "command_line_keys",
    "command_line_model_keys",
    "plain",
    "restored_data_settings",
    "same_class",
    "saved_fit_settings",
]

#: Data arguments that may differ from a checkpoint's at evaluation (a data class may list its own in
#: ``EVAL_OVERRIDABLE``): they change how batches are served, not which queries and items the model saw.
DATA_EVAL_OVERRIDABLE = ("batch_size", "eval_batch_size", "num_workers", "pin_memory", "max_val_queries",
                         "max_test_queries", "uncovered_items")


def import_class(class_path: str) -> type:
    """The class a dotted path names."""
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def same_class(path_a: str, path_b: str) -> bool:
    """Whether two class paths name the same class (a package's re-export and its module agree)."""
    if path_a == path_b:
        return True
    try:
        return import_class(path_a) is import_class(path_b)
    except (ImportError, AttributeError, ValueError):
        return False


def plain(value: Any) -> Any:
    """Namespaces, dataclasses and tuples as plain dicts/lists, for comparing config values."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def command_line_keys(argv: list[str], group: str = "model") -> list[str]:
    """Top-level argument names of ``group`` given on the command line (``--model.init_args.beam_size=5`` ->
    ``beam_size``); ``class_path`` when the class itself is given (``--data=...``, ``--data.class_path=...``)."""
    keys = []
    for token in argv:
        if token == f"--{group}" or token.startswith(f"--{group}="):
            name = "class_path"
        elif token.startswith(f"--{group}."):
            name = token[len(group) + 3 :].split("=", 1)[0]
            name = name.removeprefix("init_args.").removeprefix("dict_kwargs.").split(".", 1)[0]
        else:
            continue
        if name and name not in ("help", "init_args", "dict_kwargs") and name not in keys:
            keys.append(name)
    return keys


def command_line_model_keys(argv: list[str]) -> list[str]:
    """Top-level model argument names given on the command line (``--model.init_args.beam_size=5`` -> beam_size)."""
    return [key for key in command_line_keys(argv, "model") if key != "class_path"]


def saved_fit_settings(ckpt_path: Path) -> dict[str, Any]:
    """The run record of a checkpoint that has none, from its run's saved fit config, or ``{}``.

    Looks for ``<run dir>/logs/version_N/config_fit.yaml`` (``config.yaml`` before configs were named
    by command) beside ``<run dir>/checkpoints/``; takes the newest one saved before the checkpoint was
    written (the fit that wrote it).
    """
    import yaml

    logs = Path(ckpt_path).resolve().parent.parent / "logs"
    written = Path(ckpt_path).stat().st_mtime
    candidates = [
        path for pattern in ("version_*/config_fit.yaml", "version_*/config.yaml") for path in logs.glob(pattern)
        if path.stat().st_mtime <= written
    ]
    for path in sorted(candidates, key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0), reverse=True):
        data = (yaml.safe_load(path.read_text()) or {}).get("data")
        if isinstance(data, dict) and data.get("class_path"):
            return {"data": {"class_path": data["class_path"], "init_args": data.get("init_args") or {}},
                    "config": str(path)}
    return {}


def _short(class_path: str) -> str:
    return class_path.rpartition(".")[2]


def check_model_class(trained: str | None, wanted: str | None, ckpt_path: Path) -> None:
    """Refuse a checkpoint whose model class (``trained``) is not the config's (``wanted``)."""
    if trained and wanted and not same_class(trained, wanted):
        raise CheckpointError(
            f"--ckpt_path={ckpt_path} is a checkpoint of {_short(trained)}, but the config's model is "
            f"{_short(wanted)}; pass a {_short(wanted)} checkpoint (its run's checkpoints/last.ckpt or best.ckpt), "
            "or the config that trained this one."
        )


def restored_data_settings(
    class_path: str,
    init_args: dict[str, Any],
    run: dict[str, Any],
    ckpt_path: Path,
    given: list[str],
) -> dict[str, Any] | None:
    """The data section (``class_path``, ``init_args``) to evaluate ``ckpt_path`` with.

    Args:
        class_path, init_args: the data section the config files and command line resolved to.
        run: the checkpoint's ``"grcm_run"`` record (``{"data": {...}, "config": <saved config>}``;
            empty for a checkpoint written before grcm stored it: nothing is restored then).
        ckpt_path: the checkpoint, for messages.
        given: the data argument names the command line gave (:func:`command_line_keys`).

    Returns:
        the restored section, or None when the checkpoint records no data settings.

    Raises:
        GrcmError: a data argument given on the command line differs from the checkpoint's and may not.
    """
    saved = run.get("data") or {}
    if not saved.get("class_path"):
        return None
    fit_config = run.get("config")
    where = (f"pass the fit's saved config, -c {fit_config}" if fit_config and Path(fit_config).is_file()
             else "repeat the fit's data settings")
    saved_args = dict(saved.get("init_args") or {})
    if not same_class(class_path, saved["class_path"]):
        if "class_path" in given:
            raise GrcmError(
                f"--data={class_path}: {ckpt_path} was trained on {saved['class_path']}; drop --data (the "
                f"checkpoint's data settings are restored), or {where}."
            )
        _notify(ckpt_path, [f"class {saved['class_path']}"])
        return {"class_path": saved["class_path"], "init_args": saved_args}
    safe = tuple(getattr(import_class(saved["class_path"]), "EVAL_OVERRIDABLE", DATA_EVAL_OVERRIDABLE))
    restored, notes = {}, []
    for key, value in init_args.items():
        if key in safe or key not in saved_args or plain(value) == saved_args[key]:
            restored[key] = value
            continue
        if key in given:
            raise GrcmError(
                f"--data.init_args.{key}={plain(value)!r} differs from the data {ckpt_path} was trained on "
                f"({key}={saved_args[key]!r}); drop the argument (the checkpoint's data settings are restored), "
                f"or {where}. Data arguments that may change: {', '.join(safe)}."
            )
        restored[key] = saved_args[key]
        notes.append(f"{key}={saved_args[key]!r} (config: {plain(value)!r})")
    _notify(ckpt_path, notes)
    return {"class_path": class_path, "init_args": restored}


def _notify(ckpt_path: Path, notes: list[str]) -> None:
    if notes:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"grcm: --ckpt_path={ckpt_path}: the fit's data settings restored: {', '.join(notes)}")
