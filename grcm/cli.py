"""Command line: ``grcm fit|validate|test|predict -c experiments/<dataset>/<method>.yaml`` and extra commands.

The Lightning subcommands are :class:`GrcmCLI` (``LightningCLI`` with
``parser_mode="omegaconf+"``, so ``${.x}`` references follow command-line
overrides such as ``--model.init_args.lr=3e-4`` from W&B sweeps). Sizes the model
takes from the data (``feature_dim``, ``vocab_size``, ``pad_token_id``) are linked
from the DataModule with ``link_arguments(..., apply_on="instantiate")``; a model class
without such an argument simply does not receive it.

Extra commands (``grcm <command> --help`` for their options):

- ``grcm demo``: the whole pipeline on the synthetic corpus, printing a results table.
- ``grcm prepare``: join a benchmark's annotation files with precomputed features into a corpus.
- ``grcm extract``: encode images/videos/audio (CLIP, SigLIP, CLAP) into the features ``grcm prepare`` joins.
- ``grcm generate-queries``: caption items with a local model into ``extra_queries.csv``.
- ``grcm sids``: write a SID bundle from a trained tokenizer checkpoint.
- ``grcm plot-sids``: PCA/t-SNE PNG of items coloured by coarse token.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

#: Data attributes linked into the model's constructor when the model accepts them.
LINKED_SIZES = ("feature_dim", "vocab_size", "pad_token_id")


class WandbAwareSaveConfig(SaveConfigCallback):
    """Saves the resolved config beside the logs (overwriting: W&B runs share a folder) and uploads it to W&B."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """After fit/test: results table and SID health table/plot to W&B (rank 0; no-op without W&B)."""
        from grcm.loggers import log_run_tables

        log_run_tables(trainer, pl_module, stage)


class GrcmCLI(LightningCLI):
    """LightningCLI with subclass-mode model/data, omegaconf+ interpolation and data->model size links."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", WandbAwareSaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        for sub in ("fit", "validate", "test", "predict"):
            parser_kwargs.setdefault(sub, {}).setdefault("parser_mode", "omegaconf+")
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        """Drop checkpoint hyperparameters the model class cannot take.

        With ``--ckpt_path`` Lightning re-reads the checkpoint's hyperparameters, which record every
        linked data size, as ``dict_kwargs``; a model class without such an argument would fail.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config.get("model")
        extra = getattr(model, "dict_kwargs", None) if model is not None else None
        if not extra or not getattr(model, "class_path", None):
            return
        parameters = inspect.signature(_import(model.class_path).__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return
        for name in [key for key in extra if key not in parameters]:
            del extra[name]

    def add_arguments_to_parser(self, parser) -> None:
        """Link the DataModule's sizes into the model (skipped for model classes without that argument)."""
        for name in LINKED_SIZES:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def _import(class_path: str):
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


EXTRA_COMMANDS: dict[str, Callable[[list[str]], None]] = {}


def extra_command(name: str):
    """Register ``grcm <name>``; the function receives the remaining argv."""

    def register(function: Callable[[list[str]], None]):
        EXTRA_COMMANDS[name] = function
        return function

    return register


@extra_command("demo")
def _demo(argv: list[str]) -> None:
    from grcm.demo import main as demo_main

    demo_main(argv)


def _datamodule_from_config(config: str, overrides: list[str]):
    """The DataModule an experiment config describes (set up, corpus loaded)."""
    cli = GrcmCLI(args=["-c", config, *overrides], run=False)
    cli.datamodule.setup("predict")
    return cli.datamodule


@extra_command("sids")
def _sids(argv: list[str]) -> None:
    import argparse

    from grcm.tokenizers.export import export_bundle

    parser = argparse.ArgumentParser(
        prog="grcm sids", description="Write the SID bundle of a trained tokenizer checkpoint for its corpus."
    )
    parser.add_argument("-c", "--config", required=True, help="the tokenizer's experiment config (gives the corpus)")
    parser.add_argument("--ckpt_path", required=True, help="trained tokenizer checkpoint")
    parser.add_argument("--out", required=True, help="bundle directory to write (atomically)")
    args, overrides = parser.parse_known_args(argv)
    bundle = export_bundle(args.ckpt_path, _datamodule_from_config(args.config, overrides), args.out)
    print(f"grcm sids: wrote {args.out}: {len(bundle.item_ids)} items, levels {bundle.vocab_sizes}")


@extra_command("plot-sids")
def _plot_sids(argv: list[str]) -> None:
    import argparse

    from grcm.tokenizers.plot import plot_coarse_tokens

    parser = argparse.ArgumentParser(
        prog="grcm plot-sids", description="PCA/t-SNE of the items coloured by their coarse token (ACE Fig. 5)."
    )
    parser.add_argument("-c", "--config", required=True, help="experiment config whose data built the bundle")
    parser.add_argument("--bundle", required=True, help="SID bundle directory")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--method", choices=["pca", "tsne"], default="pca")
    parser.add_argument("--max-points", type=int, default=5000)
    args, overrides = parser.parse_known_args(argv)
    corpus = _datamodule_from_config(args.config, overrides).corpus
    out = plot_coarse_tokens(args.bundle, corpus.features, args.out, method=args.method, max_points=args.max_points)
    print(f"grcm plot-sids: wrote {out}")


@extra_command("prepare")
def _prepare(argv: list[str]) -> None:
    import argparse

    from grcm.data.datasets import DATASET_READERS, prepare_dataset

    parser = argparse.ArgumentParser(
        prog="grcm prepare",
        description="Join a benchmark's annotation files with your precomputed item features into a corpus directory.",
    )
    parser.add_argument("name", choices=sorted(DATASET_READERS))
    parser.add_argument("--annotation-dir", required=True, help="folder with the benchmark's annotation files")
    parser.add_argument("--features", required=True, help="(N, D) .npy or .safetensors item features")
    parser.add_argument("--feature-ids", required=True, help="text file: line i names the item of feature row i")
    parser.add_argument("--out", required=True, help="corpus directory to write")
    parser.add_argument("--skip-missing", action="store_true", help="drop (and report) items without features")
    parser.add_argument("--keep-uncaptioned", action="store_true", help="keep items that have no captions")
    parser.add_argument("--splits", nargs="*", help="read only these splits (train val test)")
    parser.add_argument("--karpathy-json", help="Flickr30K/COCO: Karpathy dataset_*.json")
    parser.add_argument("--msrvtt-data-json", help="MSR-VTT: MSRVTT_data.json (train captions)")
    parser.add_argument("--validation", choices=["test", "official", "none"], help="MSR-VTT validation split")
    parser.add_argument("--transductive", action="store_true", help="MSR-VTT: GRDR's transductive training set")
    args = parser.parse_args(argv)
    options = {
        key: value
        for key, value in {
            "splits": tuple(args.splits) if args.splits else None,
            "karpathy_json": args.karpathy_json,
            "msrvtt_data_json": args.msrvtt_data_json,
            "validation": args.validation,
            "transductive": args.transductive or None,
        }.items()
        if value is not None
    }
    out = prepare_dataset(
        args.name,
        args.annotation_dir,
        args.features,
        args.feature_ids,
        args.out,
        skip_missing=args.skip_missing,
        keep_uncaptioned=args.keep_uncaptioned,
        **options,
    )
    print(f"grcm prepare: wrote {out}")


@extra_command("extract")
def _extract(argv: list[str]) -> None:
    from grcm.extract.runner import main as extract_main

    extract_main(argv)


@extra_command("generate-queries")
def _generate_queries(argv: list[str]) -> None:
    from grcm.queries.generate import main as generate_main

    generate_main(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``grcm``."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv and argv[0] in EXTRA_COMMANDS:
        EXTRA_COMMANDS[argv[0]](argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
    GrcmCLI(args=None if from_command_line else argv)


if __name__ == "__main__":
    main()
