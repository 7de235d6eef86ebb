"""Runs through the ``grcm`` command: restore on a trained (wordpiece) vocabulary, run directories,
command-line overrides with ``--ckpt_path`` applied or refused, the fit's data settings restored from the
checkpoint, unreadable checkpoints as one line, ``results.json`` and fit's last line, failed starts that leave
no log folder, ``grcm predict`` output.

One tiny pipeline (hierarchical K-Means tokenizer -> generative retriever on a wordpiece vocabulary)
is trained once per module and shared by the tests.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from grcm.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments" / "synthetic"
DATA = ["--data.init_args.num_items=40", "--data.init_args.feature_dim=16", "--data.init_args.eval_batch_size=64"]
WORDPIECE = ["--data.init_args.query_vocab=wordpiece", "--data.init_args.wordpiece_vocab_size=120"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"]
TOKENIZER = [
    "-c", str(EXPERIMENTS / "hkmeans_tokenizer.yaml"), *DATA,
    "--model.init_args.coarse_codebook_size=4", "--model.init_args.codebook_size=4", *QUIET,
]
RETRIEVER = [
    "-c", str(EXPERIMENTS / "ace_retriever.yaml"), *DATA, *WORDPIECE, *QUIET,
    "--model.init_args.bundle_dir=runs/hk/bundle", "--model.init_args.d_model=16", "--model.init_args.num_heads=2",
    "--model.init_args.num_encoder_layers=1", "--model.init_args.num_decoder_layers=1", "--model.init_args.ffn_dim=32",
    "--model.init_args.beam_size=4", "--trainer.default_root_dir=runs/gr",
]


def grcm(*args: str) -> int:
    """Run ``grcm args`` in-process; the exit status (0 when it returns)."""
    try:
        main(list(args))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def last_version(run: Path) -> Path:
    """The newest ``logs/version_N`` folder of a run directory."""
    return max((run / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def last_logged_hparams(run: Path) -> dict:
    return yaml.safe_load((last_version(run) / "hparams.yaml").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder holding runs/hk (tokenizer + bundle) and runs/gr (retriever trained 1 epoch, wordpiece);
    ``fit_stdout.txt`` holds what the retriever's fit printed."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert grcm("fit", *TOKENIZER, "--trainer.default_root_dir=runs/hk") == 0
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert grcm("fit", *RETRIEVER, "--trainer.max_epochs=1") == 0
        (folder / "fit_stdout.txt").write_text(printed.getvalue())
    return folder


@pytest.fixture
def in_trained(trained, monkeypatch):
    monkeypatch.chdir(trained)
    return trained


def test_fit_writes_everything_under_the_run_directory(in_trained):
    run = in_trained / "runs" / "gr"
    assert (run / "checkpoints" / "best.ckpt").is_file(), "validation ran after the last epoch: best.ckpt exists"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "logs" / "version_0" / "metrics.csv").is_file()
    assert (run / "logs" / "version_0" / "config_fit.yaml").is_file(), "the saved config is named by its command"
    assert (in_trained / "runs" / "hk" / "bundle").is_dir(), "the tokenizer bundle follows default_root_dir"


def test_fit_writes_results_and_ends_naming_the_best_checkpoint(in_trained):
    results = json.loads((in_trained / "runs/gr/results.json").read_text())
    fit = results["fit"]
    best = Path(fit["best_checkpoint"])
    assert best.name == "best.ckpt" and best.is_file() and fit["monitor"] == "val/recall@1"
    logged = torch.load(best, map_location="cpu", weights_only=True)["callbacks"]
    (state,) = [value for key, value in logged.items() if key.startswith("ModelCheckpoint")]
    assert fit["best_score"] == pytest.approx(float(state["best_model_score"]))
    assert fit["metrics"]["val/recall@1"] == pytest.approx(fit["best_score"]), "one epoch: the last validation is best"
    assert fit["global_step"] > 0 and not list((in_trained / "runs/gr").glob(".results.json.*")), "no temporary file"
    last = [line for line in (in_trained / "fit_stdout.txt").read_text().splitlines() if line.strip()][-1]
    assert last.startswith("grcm fit: run directory runs/gr;"), last
    assert "best.ckpt (val/recall@1=" in last and f"{fit['best_score']:.4f}" in last and "results.json" in last


def test_test_restores_the_fits_data_settings(in_trained, capsys):
    """The fit ran on 40 items, 16-d features and a wordpiece vocabulary (command-line overrides); a test with
    the bare config (2,000 items, 256-d, minilm_compact) evaluates on the fit's data, not the config's."""
    run = in_trained / "runs" / "gr"
    bare = ["-c", str(EXPERIMENTS / "ace_retriever.yaml"), *QUIET, "--trainer.default_root_dir=runs/gr"]
    assert grcm("test", *bare, "--ckpt_path=runs/gr/checkpoints/best.ckpt", "--data.init_args.eval_batch_size=7") == 0
    saved = yaml.safe_load((last_version(run) / "config_test.yaml").read_text())["data"]["init_args"]
    assert (saved["num_items"], saved["feature_dim"], saved["query_vocab"]) == (40, 16, "wordpiece")
    assert saved["eval_batch_size"] == 7, "evaluation-only data arguments still apply"
    test = json.loads((run / "results.json").read_text())["test"]
    assert test["ckpt_path"] == "runs/gr/checkpoints/best.ckpt" and 0 <= test["metrics"]["test/recall@1"] <= 1
    assert "fit" in json.loads((run / "results.json").read_text()), "a test keeps the fit's section"
    assert grcm("validate", *bare, "--ckpt_path=runs/gr/checkpoints/best.ckpt") == 0
    assert grcm("predict", *bare, "--ckpt_path=runs/gr/checkpoints/last.ckpt") == 0
    assert len((run / "predictions" / "last.jsonl").read_text().splitlines()) == 40, "the fit's 40 test queries"
    assert "error" not in capsys.readouterr().err


def test_checkpoint_without_data_settings_takes_them_from_the_runs_saved_config(in_trained, tmp_path):
    """A checkpoint written before grcm stored its data settings: its run's logs/version_N/config.yaml has them."""
    run = tmp_path / "legacy"
    shutil.copytree(in_trained / "runs/gr/checkpoints", run / "checkpoints")
    (run / "logs" / "version_0").mkdir(parents=True)
    shutil.copy(in_trained / "runs/gr/logs/version_0/config_fit.yaml", run / "logs/version_0/config.yaml")
    checkpoint = torch.load(run / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    del checkpoint["grcm_run"]
    torch.save(checkpoint, run / "checkpoints/best.ckpt")
    bare = ["-c", str(EXPERIMENTS / "ace_retriever.yaml"), *QUIET, f"--trainer.default_root_dir={run}"]
    assert grcm("test", *bare, f"--ckpt_path={run / 'checkpoints/best.ckpt'}") == 0
    saved = yaml.safe_load((last_version(run) / "config_test.yaml").read_text())["data"]["init_args"]
    assert (saved["num_items"], saved["query_vocab"]) == (40, "wordpiece")


def test_data_argument_differing_from_the_checkpoint_is_refused(in_trained, capsys):
    assert grcm("test", *RETRIEVER, "--ckpt_path=runs/gr/checkpoints/best.ckpt", "--data.init_args.num_items=41") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--data.init_args.num_items=41" in err and "num_items=40" in err
    assert "-c runs/gr/logs/version_0/config_fit.yaml" in err, "names the fit's saved config"
    # ... which evaluates as it is
    assert grcm("test", "-c", "runs/gr/logs/version_0/config_fit.yaml", "--ckpt_path=runs/gr/checkpoints/best.ckpt") == 0


def test_failed_start_leaves_no_log_folder(in_trained, tmp_path, capsys):
    """Set-up fails after the logger made its folder (a bundle of 40 items, a corpus of 41)."""
    failing = [*RETRIEVER, "--data.init_args.num_items=41", "--trainer.max_epochs=1"]
    assert grcm("fit", *failing, f"--trainer.default_root_dir={tmp_path / 'new'}") == 2
    assert "rebuild the bundle" in capsys.readouterr().err
    assert not (tmp_path / "new").exists(), "nothing is left of a run that never started"
    earlier = tmp_path / "old" / "logs" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "metrics.csv").write_text("epoch,val/recall@1\n0,0.5\n")
    assert grcm("fit", *failing, f"--trainer.default_root_dir={tmp_path / 'old'}") == 2
    assert sorted(p.name for p in (tmp_path / "old" / "logs").iterdir()) == ["version_0"]
    assert (earlier / "metrics.csv").is_file(), "an earlier run's logs stay"


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "tensors_only", "pickled_object", "tokenizer"])
def test_unloadable_checkpoint_is_one_line_suggesting_last_ckpt(in_trained, tmp_path, capsys, kind):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(in_trained / "runs/gr/checkpoints/last.ckpt", folder / "last.ckpt")
    bad = folder / "epoch=0-step=3.ckpt"
    marker = tmp_path / "unpickled"
    if kind == "truncated":
        bad.write_bytes((folder / "last.ckpt").read_bytes()[:4096])
    elif kind == "text":
        bad.write_text("this is not a checkpoint\n")
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "tensors_only":
        torch.save({"weight": torch.zeros(2)}, bad)
    elif kind == "pickled_object":
        torch.save({"state_dict": {}, "payload": Unpickled(str(marker))}, bad)
    else:
        bad = in_trained / "runs/hk/checkpoints/last.ckpt"
    assert grcm("test", *RETRIEVER, f"--ckpt_path={bad}") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"grcm: error: --ckpt_path={bad}"), err
    assert "last.ckpt" in err and "weights_only" not in err and "Traceback" not in err
    assert not marker.exists(), "checkpoints are loaded with weights_only=True: nothing is unpickled"
    if kind == "tokenizer":
        assert "is a checkpoint of ACETokenizer, but the config's model is GenerativeRetriever" in err


def test_unreadable_dense_checkpoint_of_two_stage_is_one_line(in_trained, tmp_path, capsys):
    bad = tmp_path / "dense.ckpt"
    bad.write_text("not a checkpoint\n")
    assert grcm(
        "test", *RETRIEVER, "--ckpt_path=runs/gr/checkpoints/best.ckpt",
        "--trainer.callbacks+=grcm.rerank.two_stage.TwoStageEvaluation", f"--trainer.callbacks.dense_checkpoint={bad}",
    ) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"grcm: error: dense_checkpoint={bad}: cannot be loaded"), err
    assert "weights_only" not in err


class Unpickled:
    """Unpickling it would create ``path`` (what a weights_only=False load of a foreign file would run)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_restore_on_wordpiece_vocabulary_test_and_resumed_fit(in_trained, capsys):
    """The restore crash: splits emptied by the restored vocabulary (KeyError 'test' / 'train')."""
    ckpt = "runs/gr/checkpoints/last.ckpt"
    assert grcm("test", *RETRIEVER, f"--ckpt_path={ckpt}") == 0
    assert grcm("validate", *RETRIEVER, f"--ckpt_path={ckpt}") == 0
    before = torch.load(in_trained / ckpt, map_location="cpu", weights_only=True)
    assert grcm("fit", *RETRIEVER, f"--ckpt_path={ckpt}", "--trainer.max_epochs=2") == 0
    resumed = torch.load(in_trained / ckpt, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 2 * before["global_step"] > 0, "the resumed fit trained one more epoch"
    assert "query_tokenizer" in resumed["SyntheticDataModule"], "the trained vocabulary travels with the checkpoint"
    assert "error" not in capsys.readouterr().err


def test_second_fit_into_an_occupied_run_directory_is_refused(in_trained, capsys):
    before = (in_trained / "runs/gr/checkpoints/best.ckpt").stat().st_mtime_ns
    assert grcm("fit", *RETRIEVER, "--trainer.max_epochs=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds" in err and "--trainer.default_root_dir" in err
    assert "--overwrite=true" in err and "Traceback" not in err
    assert (in_trained / "runs/gr/checkpoints/best.ckpt").stat().st_mtime_ns == before, "nothing was replaced"
    # a tokenizer run refuses the same way (its bundle and checkpoints are there)
    assert grcm("fit", *TOKENIZER, "--trainer.default_root_dir=runs/hk") == 2
    assert "already holds" in capsys.readouterr().err


def test_overwrite_replaces_a_run_when_asked(in_trained, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(in_trained / "runs" / "hk", target)
    (target / "checkpoints" / "stale.ckpt").write_text("old")
    assert grcm("fit", *TOKENIZER, f"--trainer.default_root_dir={target}", "--overwrite=true") == 0
    assert not (target / "checkpoints" / "stale.ckpt").exists() and (target / "checkpoints" / "last.ckpt").is_file()


def test_safe_overrides_apply_with_ckpt_path(in_trained):
    ckpt = "runs/gr/checkpoints/best.ckpt"
    assert grcm(
        "test", *RETRIEVER, f"--ckpt_path={ckpt}", "--model.init_args.beam_size=3",
        "--model.init_args.constrained=false", "--model.init_args.bundle_dir=./runs/hk/bundle",
    ) == 0
    hparams = last_logged_hparams(in_trained / "runs" / "gr")
    assert hparams["beam_size"] == 3 and hparams["constrained"] is False
    assert hparams["bundle_dir"] == "./runs/hk/bundle"
    assert grcm("test", *RETRIEVER, f"--ckpt_path={ckpt}") == 0
    restored = last_logged_hparams(in_trained / "runs" / "gr")
    assert restored["beam_size"] == 4 and restored["constrained"] is True, "without overrides the checkpoint's values"


@pytest.mark.parametrize("argument", ["--model.init_args.d_model=32", "--model.init_args.lr=0.5", "--model.fusion=none"])
def test_unsafe_overrides_are_refused_naming_the_argument(in_trained, capsys, argument):
    assert grcm("test", *RETRIEVER, "--ckpt_path=runs/gr/checkpoints/best.ckpt", argument) == 2
    err = capsys.readouterr().err.strip()
    name = argument.split("=")[0].split(".")[-1]
    assert err.count("\n") == 0 and f"--model.init_args.{name}=" in err and "cannot change" in err


def test_bundle_with_other_sids_is_refused(in_trained, tmp_path, capsys):
    from grcm.tokenizers.bundle import SIDBundle

    bundle = SIDBundle.load(in_trained / "runs/hk/bundle")
    bundle.codes = bundle.codes.flip(0).clone()
    bundle.save(tmp_path / "other")
    assert grcm("test", *RETRIEVER, "--ckpt_path=runs/gr/checkpoints/best.ckpt",
                f"--model.init_args.bundle_dir={tmp_path / 'other'}") == 2
    assert "its SIDs differ" in capsys.readouterr().err


def test_predict_writes_ranked_items_per_query(in_trained):
    assert grcm("predict", *RETRIEVER, "--ckpt_path=runs/gr/checkpoints/best.ckpt") == 0
    assert grcm("predict", *RETRIEVER, "--ckpt_path=runs/gr/checkpoints/best.ckpt") == 0
    first = in_trained / "runs/gr/predictions/best.jsonl"
    assert first.is_file() and first.with_name("best-v1.jsonl").is_file(), "a second predict never replaces the first"
    records = [json.loads(line) for line in first.read_text().splitlines()]
    from grcm.tokenizers.bundle import SIDBundle

    item_ids = SIDBundle.load(in_trained / "runs/hk/bundle").item_ids
    assert len(records) == 40, "one line per test query (one test caption per item)"
    for record in records:
        assert record["query"] and len(record["gold"]) == 1
        assert len(record["items"]) == len(set(record["items"])) == len(record["scores"]) > 0
        assert set(record["items"]) <= set(item_ids)
        assert record["scores"] == sorted(record["scores"], reverse=True)


def test_missing_checkpoint_is_one_line(in_trained, capsys):
    assert grcm("test", *RETRIEVER, "--ckpt_path=runs/gr/checkpoints/nope.ckpt") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.ckpt: no such checkpoint" in err and "best.ckpt" in err


def test_feature_dim_differing_from_checkpoint_is_one_line(in_trained, capsys):
    args = [a.replace("feature_dim=16", "feature_dim=24") for a in RETRIEVER]
    assert grcm("test", *args, "--ckpt_path=runs/gr/checkpoints/best.ckpt") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "feature_dim=16" in err and "feature_dim=24" in err
