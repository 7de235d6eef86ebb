"""Every method has a config on every real dataset, and each one parses (``--print_config``)."""

from pathlib import Path

import pytest
import yaml

from grcm.cli import main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DATASETS = ("msrvtt", "msvd", "flickr30k", "coco", "clotho", "audiocaps")
METHODS = ("dual_tower", "ace_tokenizer", "ace_retriever", "two_stage", "grdr")
REAL_LANGUAGE = sorted((EXPERIMENTS / "real_language").glob("*.yaml"))


@pytest.mark.parametrize("config", [EXPERIMENTS / d / f"{m}.yaml" for d in DATASETS for m in METHODS] + REAL_LANGUAGE,
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_parses(config, capsys):
    assert config.is_file(), f"{config} is missing"
    subcommand = "test" if config.stem in ("two_stage", "zero_shot_minilm") else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    root = printed["trainer"]["default_root_dir"]
    assert root.startswith("runs/") and config.parent.name in root
    logger = printed["trainer"]["logger"]
    assert logger["init_args"]["save_dir"] == root  # interpolation resolved: each run writes under its own folder


@pytest.mark.parametrize("dataset", DATASETS)
def test_grdr_validates_once_the_schedule_is_done(dataset):
    """SIDs change until the last phase: max_epochs and the validation interval are the schedule's length."""
    from grcm.retriever.phases import build_schedule

    config = yaml.safe_load((EXPERIMENTS / dataset / "grdr.yaml").read_text())
    args = config["model"]["init_args"]
    phases = build_schedule(args["num_levels"], args.get("schedule", "joint"), args["pretrain_epochs"],
                            args["main_epochs"], args["fit_epochs"])
    assert config["trainer"]["max_epochs"] == config["trainer"]["check_val_every_n_epoch"] == phases[-1].end
    ace = yaml.safe_load((EXPERIMENTS / dataset / "ace_retriever.yaml").read_text())
    assert config["data"] == ace["data"]  # same corpus, DataModule and batch settings as the ACE retriever
