"""Runs through the ``grcm`` command: restore on a trained (wordpiece) vocabulary, run directories,
command-line overrides with ``--ckpt_path`` applied or refused, ``grcm predict`` output.

One tiny pipeline (hierarchical K-Means tokenizer -> generative retriever on a wordpiece vocabulary)
is trained once per module and shared by the tests.
"""

from __future__ import annotations

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
    """A folder holding runs/hk (tokenizer + bundle) and runs/gr (retriever trained 1 epoch, wordpiece)."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert grcm("fit", *TOKENIZER, "--trainer.default_root_dir=runs/hk") == 0
        assert grcm("fit", *RETRIEVER, "--trainer.max_epochs=1") == 0
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
    assert (run / "logs" / "version_0" / "config.yaml").is_file()
    assert (in_trained / "runs" / "hk" / "bundle").is_dir(), "the tokenizer bundle follows default_root_dir"


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
