"""The ``grcm`` command: Lightning subcommands, extra commands, one-line errors, fast help.

This module imports nothing heavy: ``grcm --help`` and ``grcm <extra command> --help`` never
load torch or Lightning. The Lightning subcommands (``fit``, ``validate``, ``test``,
``predict``) are :class:`grcm.lightning_cli.GrcmCLI`, imported when one runs
(``from grcm.cli import GrcmCLI`` still works and imports it then).

Extra commands live in :data:`EXTRA_COMMANDS`, registered with :func:`extra_command`; a
command's function receives the remaining argv and imports what it needs inside its body,
so registering one costs nothing at start-up::

    @extra_command("demo", "the whole pipeline on the synthetic corpus, then a results table")
    def _demo(argv):
        from grcm.demo import main as demo_main
        demo_main(argv)

Errors a user can cause and fix (:class:`grcm.errors.GrcmError` and subclasses) print as
one line ``grcm: error: <message>`` with exit status 2; ``--debug`` (anywhere on the
command line) or ``GRCM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Lightning subcommands and what they do (shown by ``grcm --help``).
LIGHTNING_COMMANDS = {
    "fit": "train a model from an experiment config (writes under trainer.default_root_dir)",
    "validate": "evaluate on the validation split (with --ckpt_path)",
    "test": "evaluate on the test split (with --ckpt_path)",
    "predict": "write each test query's ranked items to <run dir>/predictions/*.jsonl",
}

#: The models and data modules of grcm (``--model.help <class>`` / ``--data.help <class>`` list their options),
#: by the class path users write (a package's re-export where there is one). Abstract bases
#: (SIDRetrievalModule, RetrievalDataModule) are no models. tests/test_cli_help.py checks this list
#: against the concrete classes in the package.
MODEL_CLASSES = {
    "grcm.rerank.dual_tower.DualTower": "dual-tower (CLIP-style) dense retriever over FAISS",
    "grcm.rerank.hybrid_tower.HybridTower": "Hybrid-Tower (PIG) dense retriever over item token features",
    "grcm.tokenizers.module.ACETokenizer": "ACE coarse-fine SID tokenizer (K-Means + RQ-VAE + unique token)",
    "grcm.retriever.module.GenerativeRetriever": "generative retriever: query -> SID -> items (beam search)",
    "grcm.retriever.grdr.GRDRRetriever": "GRDR generative retriever (multi-view SIDs, query routing)",
}
DATA_CLASSES = {
    "grcm.data.datamodules.SyntheticDataModule": "the embedded synthetic corpus (nothing to download)",
    "grcm.data.datamodules.CorpusDataModule": "a prepared corpus directory (grcm prepare)",
}


@dataclass
class ExtraCommand:
    """``grcm <name>``: ``run(argv)`` gets the arguments after the name; ``summary`` is its help line."""

    run: Callable[[list[str]], None]
    summary: str


EXTRA_COMMANDS: dict[str, ExtraCommand] = {}


def extra_command(name: str, summary: str = ""):
    """Register ``grcm <name>``; the decorated function receives the remaining argv."""

    def register(function: Callable[[list[str]], None]):
        EXTRA_COMMANDS[name] = ExtraCommand(function, summary or (function.__doc__ or "").strip().split("\n")[0])
        return function

    return register


def __getattr__(name: str):
    """``grcm.cli.GrcmCLI`` is imported on first use (it pulls in Lightning)."""
    if name == "GrcmCLI":
        from grcm.lightning_cli import GrcmCLI

        return GrcmCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------- extra commands
@extra_command("demo", "the whole pipeline on the synthetic corpus, then one results table (make demo)")
def _demo(argv: list[str]) -> None:
    from grcm.demo import main as demo_main

    demo_main(argv)


def _datamodule_from_config(config: str, overrides: list[str]):
    """The DataModule an experiment config describes (set up, corpus loaded)."""
    from grcm.lightning_cli import GrcmCLI

    cli = GrcmCLI(args=["-c", config, *overrides], run=False)
    cli.datamodule.setup("predict")
    return cli.datamodule


@extra_command("sids", "write the SID bundle of a trained tokenizer checkpoint")
def _sids(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="grcm sids", description="Write the SID bundle of a trained tokenizer checkpoint for its corpus."
    )
    parser.add_argument("-c", "--config", required=True, help="the tokenizer's experiment config (gives the corpus)")
    parser.add_argument("--ckpt_path", required=True, help="trained tokenizer checkpoint (<run dir>/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="bundle directory to write (atomically)")
    args, overrides = parser.parse_known_args(argv)
    from grcm.tokenizers.export import export_bundle

    bundle = export_bundle(args.ckpt_path, _datamodule_from_config(args.config, overrides), args.out)
    print(f"grcm sids: wrote {args.out}: {len(bundle.item_ids)} items, levels {bundle.vocab_sizes}")


@extra_command("plot-sids", "PCA/t-SNE PNG of the items coloured by their coarse token")
def _plot_sids(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="grcm plot-sids", description="PCA/t-SNE of the items coloured by their coarse token (ACE Fig. 5)."
    )
    parser.add_argument("-c", "--config", required=True, help="experiment config whose data built the bundle")
    parser.add_argument("--bundle", required=True, help="SID bundle directory")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--method", choices=["pca", "tsne"], default="pca")
    parser.add_argument("--max-points", type=int, default=5000)
    args, overrides = parser.parse_known_args(argv)
    from grcm.tokenizers.plot import plot_coarse_tokens

    corpus = _datamodule_from_config(args.config, overrides).corpus
    out = plot_coarse_tokens(args.bundle, corpus.features, args.out, method=args.method, max_points=args.max_points)
    print(f"grcm plot-sids: wrote {out}")


@extra_command("prepare", "join a benchmark's annotation files with your item features into a corpus")
def _prepare(argv: list[str]) -> None:
    import argparse
    import json
    import logging

    from grcm.data.datasets import DATASET_READERS, prepare_dataset, summary

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
    parser.add_argument("--allow-empty", action="store_true",
                        help="warn instead of failing on a split with no captions or on feature rows no item uses")
    parser.add_argument("--splits", nargs="*",
                        help="read only these splits (train val test; default: those whose files exist)")
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

    class _Notices(logging.Handler):  # reader notes as "grcm: notice:", allowed problems as "grcm: warning:"
        def emit(self, record: logging.LogRecord) -> None:
            kind = "warning" if record.levelno >= logging.WARNING else "notice"
            print(f"grcm: {kind}: {' '.join(record.getMessage().split())}", file=sys.stderr)

    datasets_logger = logging.getLogger("grcm.data.datasets")
    handler, saved = _Notices(logging.INFO), (datasets_logger.level, datasets_logger.propagate)
    datasets_logger.addHandler(handler)
    datasets_logger.setLevel(logging.INFO)
    datasets_logger.propagate = False
    try:
        out = prepare_dataset(
            args.name,
            args.annotation_dir,
            args.features,
            args.feature_ids,
            args.out,
            skip_missing=args.skip_missing,
            keep_uncaptioned=args.keep_uncaptioned,
            allow_empty=args.allow_empty,
            **options,
        )
    finally:
        datasets_logger.removeHandler(handler)
        datasets_logger.setLevel(saved[0])
        datasets_logger.propagate = saved[1]
    report = json.loads((Path(out) / "preparation.json").read_text(encoding="utf-8"))
    print(f"grcm prepare: wrote {out}: {summary(report)}")


@extra_command("index-items", "give items added after training their SIDs and add them to a retriever checkpoint")
def _index_items(argv: list[str]) -> None:
    from grcm.index_items import main as index_items_main

    index_items_main(argv)


@extra_command("extract", "encode images/videos/audio (CLIP, SigLIP, CLAP) into the features grcm prepare joins")
def _extract(argv: list[str]) -> None:
    from grcm.extract.runner import main as extract_main

    extract_main(argv)


@extra_command("generate-queries", "caption items with a local model into extra_queries.csv")
def _generate_queries(argv: list[str]) -> None:
    from grcm.queries.generate import main as generate_main

    generate_main(argv)


# ------------------------------------------------------------------------------------- help
def overview() -> str:
    """``grcm --help``: commands, grcm's model and data classes, where to go next (plain text)."""

    def rows(entries: dict[str, str]) -> str:
        width = max(map(len, entries))
        return "\n".join(f"  {name.ljust(width)}  {text}" for name, text in entries.items())

    extras = {name: command.summary for name, command in EXTRA_COMMANDS.items()}
    return f"""usage: grcm <command> [options]       (python -m grcm works too)

Generative cross-modal retrieval on PyTorch Lightning. Runs are driven by experiment
configs: grcm fit -c experiments/<dataset>/<method>.yaml

Lightning commands (grcm <command> --help lists the trainer, --model and --data options):
{rows(LIGHTNING_COMMANDS)}

Other commands (grcm <command> --help):
{rows(extras)}

Models (grcm fit --model.help <class> lists a model's arguments):
{rows(MODEL_CLASSES)}

Data (grcm fit --data.help <class>):
{rows(DATA_CLASSES)}

Every output of a run lands under its trainer.default_root_dir (checkpoints/, logs/, bundle/,
predictions/, results.json); override it with --trainer.default_root_dir=<dir>. fit refuses a
directory that already holds a run unless you resume (--ckpt_path) or pass --overwrite=true.
With --ckpt_path, test/validate/predict restore the data settings the checkpoint was fit on.

Errors you can fix print as one line; --debug or GRCM_DEBUG=1 shows the traceback."""


# ------------------------------------------------------------------------------------ help cache
def _is_help_request(argv: list[str]) -> bool:
    return any(arg in ("-h", "--help") or arg.endswith(".help") for arg in argv)


def _cache_dir() -> Path:
    root = os.environ.get("GRCM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "grcm"
    )
    return Path(root) / "help"


def help_cache_key(argv: list[str]) -> str:
    """Fingerprint of everything ``grcm <command> --help`` prints: argv, config files, grcm's sources, versions."""
    from importlib.metadata import PackageNotFoundError, version

    import grcm

    digest = hashlib.sha256()
    digest.update(json.dumps([argv, os.environ.get("COLUMNS", ""), sys.version]).encode())
    for package in ("lightning", "jsonargparse", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            digest.update(f"{package}={version(package)}".encode())
    for index, arg in enumerate(argv):  # config files' contents
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (argv[index + 1] if arg in ("-c", "--config") and index + 1 < len(argv) else None)
        if path and Path(path).is_file():
            digest.update(Path(path).read_bytes())
    package_root = Path(grcm.__file__).parent
    for source in sorted(package_root.rglob("*.py")):
        stat = source.stat()
        digest.update(f"{source.relative_to(package_root)}:{stat.st_mtime_ns}:{stat.st_size}".encode())
    return digest.hexdigest()[:32]


def run_lightning_cli(argv: list[str]) -> None:
    """Run a Lightning subcommand; help texts are cached (keyed by :func:`help_cache_key`) so repeats are instant."""
    import warnings

    # main() passes the command line itself (less --debug), which LightningCLI would warn about
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cached = _cache_dir() / f"{help_cache_key(argv)}.txt" if _is_help_request(argv) else None
    if cached is not None and cached.is_file():
        sys.stdout.write(cached.read_text())
        return
    from grcm.lightning_cli import GrcmCLI  # imports Lightning (seconds)

    if cached is None:
        GrcmCLI(args=argv)
        return
    buffer, code = io.StringIO(), 0
    with contextlib.redirect_stdout(buffer):
        try:
            GrcmCLI(args=argv)
        except SystemExit as exit_:
            code = exit_.code or 0
    text = buffer.getvalue()
    sys.stdout.write(text)
    if code == 0 and text:
        with contextlib.suppress(OSError):
            from grcm.io import atomic_path

            with atomic_path(cached) as tmp:
                tmp.write_text(text)
    if code:
        raise SystemExit(code)


# ------------------------------------------------------------------------------------- main
def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("GRCM_DEBUG", "").strip() not in ("", "0", "false", "False")


def user_error_of(error: BaseException) -> BaseException | None:
    """The :class:`~grcm.errors.GrcmError` behind ``error`` (itself or a cause), or None for a bug.

    A command-line/config parse error (``argparse.ArgumentError``) with no GrcmError behind it
    becomes a GrcmError with its message condensed to the line that says what is wrong.
    """
    import argparse

    from grcm.errors import GrcmError

    seen: set[int] = set()
    cursor, parse_error = error, None
    while cursor is not None and id(cursor) not in seen:
        if isinstance(cursor, GrcmError):
            return cursor
        if isinstance(cursor, argparse.ArgumentError) and parse_error is None:
            parse_error = cursor
        seen.add(id(cursor))
        cursor = cursor.__cause__ or cursor.__context__
    if parse_error is not None:
        return GrcmError(condense_parse_error(parse_error.message))
    return None


def condense_parse_error(message: str) -> str:
    """jsonargparse's multi-line messages (Union subtypes, class_path problems) as one actionable line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    key = re.search(r'Parser key "([^"]+)"', message)
    problem = re.search(r"Problem with given class_path '([^']+)':\s*(.+?)(?:\n|$)", message)
    if problem:
        where = f"--{key.group(1)}" if key else "a config value"
        class_path, reason = problem.group(1), problem.group(2).strip()
        inner = next((line for line in lines if "not accepted" in line or "Expected" in line), reason)
        group = key.group(1).split(".")[0] if key else "model"
        return (
            f"{where}: {class_path}: {inner.lstrip('- ')} (grcm fit --{group}.help {class_path} lists its "
            "arguments; check the config file and the command line)"
        )
    text = lines[0] if lines else message
    if "unrecognized arguments" in text or "not expected" in text or "No action for key" in text:
        text += " (grcm <command> --help lists the options; config keys follow the same names)"
    return text


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``grcm``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _dispatch(argv)
    except Exception as error:  # noqa: BLE001 -- user errors become one line, bugs keep their traceback
        user_error = None if debug else user_error_of(error)
        if user_error is None:
            raise
        message = " ".join(str(user_error).split())
        print(f"grcm: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return
    if argv[0] in EXTRA_COMMANDS:
        EXTRA_COMMANDS[argv[0]].run(argv[1:])
        return
    run_lightning_cli(argv)


if __name__ == "__main__":
    main()
