"""The ``grcm`` command line: help, a real short fit from an experiment config, overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grcm.cli import GrcmCLI, main

ROOT = Path(__file__).resolve().parents[1]
DUAL_TOWER = str(ROOT / "experiments" / "synthetic" / "dual_tower.yaml")
SMALL = [
    "--data.init_args.num_items=120",
    "--data.init_args.feature_dim=32",
    "--model.init_args.embed_dim=32",
    "--model.init_args.text_width=32",
    "--model.init_args.text_layers=1",
    "--trainer.enable_progress_bar=false",
]


def test_fit_help_lists_model_and_data_options():
    result = subprocess.run([sys.executable, "-m", "grcm", "fit", "--help"], capture_output=True, text=True, check=True)
    for option in ("--model", "--data", "--trainer.max_epochs", "--model.help", "--data.help"):
        assert option in result.stdout
    model_help = subprocess.run(
        [sys.executable, "-m", "grcm", "fit", "--model.help", "grcm.rerank.dual_tower.DualTower"],
        capture_output=True, text=True, check=True,
    )
    assert "--model.lr" in model_help.stdout and "--model.embed_dim" in model_help.stdout


def test_fit_one_epoch_from_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative run paths land in the temporary folder
    main(["fit", "-c", DUAL_TOWER, *SMALL, "--trainer.max_epochs=1", "--trainer.limit_val_batches=1"])
    assert (tmp_path / "runs/synthetic/dual_tower/checkpoints/last.ckpt").is_file(), "fit writes a checkpoint"
    assert list(tmp_path.rglob("config_fit.yaml")), "the resolved config is saved with the run, named by its command"


def test_links_and_dotted_overrides(tmp_path):
    cli = GrcmCLI(args=["-c", DUAL_TOWER, *SMALL, "--model.lr=3e-4", f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert cli.model.hparams.lr == pytest.approx(3e-4)
    assert cli.model.hparams.feature_dim == 32  # linked from data.feature_dim
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size == 512  # dual_tower.yaml's compact_vocab_size


def test_print_config_resolves(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", DUAL_TOWER, "--model.lr=5e-4", "--print_config"])
    printed = capsys.readouterr().out
    assert "class_path: grcm.rerank.dual_tower.DualTower" in printed and "lr: 0.0005" in printed
