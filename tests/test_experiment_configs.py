"""Every method has a config on every real dataset, and each one parses (``--print_config``)."""

from pathlib import Path

import pytest
import yaml

from grcm.cli import main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DATASETS = ("msrvtt", "msvd", "flickr30k", "coco", "clotho", "audiocaps")
METHODS = ("dual_tower", "ace_tokenizer", "ace_retriever", "two_stage")
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
