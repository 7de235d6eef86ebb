"""Errors a user can cause reach the terminal as one line naming the file/argument and the fix.

Each case from the field: a truncated or garbage ``features.npy`` (once wrapped in jsonargparse's
Union message), a non-UTF-8 CSV, a duplicated item id (once reported as a different, missing id),
MSR-VTT prepared without ``MSRVTT_data.json`` (once an empty training split found at fit time),
bad config keys and abbreviated options; ``--debug`` / ``GRCM_DEBUG=1`` bring the traceback back.
Missing checkpoints and feature dimensions differing from a checkpoint: tests/test_cli_runs.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grcm.cli import main, user_error_of
from grcm.data.corpus import CorpusError, save_corpus
from grcm.data.synthetic import generate_synthetic_corpus

ROOT = Path(__file__).resolve().parents[1]
MSVD = str(ROOT / "experiments" / "msvd" / "dual_tower.yaml")
TINY_MODEL = [
    "--model.init_args.text_backbone=scratch", "--model.init_args.embed_dim=8", "--model.init_args.text_width=8",
    "--model.init_args.text_layers=1", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
]


def one_line_error(capsys, *args: str) -> str:
    """Run ``grcm args``; assert exit status 2 and a single ``grcm: error:`` line without traceback; return it."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    # Lightning's log handler may still hold an earlier test's closed stderr; the logging module's
    # complaint about that ("--- Logging error ---" ... "Arguments: ...") is not grcm's output
    err = re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", capsys.readouterr().err, flags=re.S)
    errors = [line for line in err.splitlines() if line.startswith("grcm: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "good"
    save_corpus(generate_synthetic_corpus(30, 8, 0), root)
    return root


def broken_copy(corpus_dir: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(corpus_dir, target)
    return target


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_bad_features_file_names_the_file(corpus_dir, tmp_path, capsys, monkeypatch, damage):
    monkeypatch.chdir(tmp_path)
    corpus = broken_copy(corpus_dir, tmp_path, damage)
    raw = (corpus / "features.npy").read_bytes()
    (corpus / "features.npy").write_bytes(b"\x00garbage" * 40 if damage == "garbage" else raw[: len(raw) // 2])
    line = one_line_error(capsys, "fit", "-c", MSVD, f"--data.init_args.corpus_dir={corpus}", *TINY_MODEL)
    assert f"{corpus}/features.npy" in line and "numpy.save" in line
    assert "Union" not in line


def test_non_utf8_captions_name_the_file_and_byte(corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = broken_copy(corpus_dir, tmp_path, "latin1")
    with open(corpus / "captions.csv", "ab") as handle:
        handle.write("item00,caf\xe9 cr\xe8me,train\n".encode("latin-1"))
    line = one_line_error(capsys, "fit", "-c", MSVD, f"--data.init_args.corpus_dir={corpus}", *TINY_MODEL)
    assert "captions.csv: not UTF-8 (byte 0xe9" in line and "UTF-8" in line


def test_duplicated_id_is_reported_as_the_duplicate(corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = broken_copy(corpus_dir, tmp_path, "dup")
    ids = (corpus / "item_ids.txt").read_text().splitlines()
    duplicated, lost = ids[3], ids[4]
    ids[4] = duplicated  # a copy-paste slip: line 5 repeats line 4, item `lost` vanishes
    (corpus / "item_ids.txt").write_text("\n".join(ids) + "\n")
    line = one_line_error(capsys, "fit", "-c", MSVD, f"--data.init_args.corpus_dir={corpus}", *TINY_MODEL)
    assert f"item id {duplicated!r} occurs on lines 4 and 5" in line and lost not in line


def write_msrvtt(annotations: Path, encoding: str = "utf-8") -> None:
    annotations.mkdir(parents=True)
    test = "key,vid_key,video_id,sentence\n" + "".join(f"ret{n},msr{n},video{n},a man sings {n}\n" for n in range(3))
    (annotations / "MSRVTT_JSFUSION_test.csv").write_bytes(test.replace("sings 0", "sings caf\xe9").encode(encoding))
    (annotations / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"video{n}\n" for n in range(3, 9)))


def test_msrvtt_without_data_json_fails_at_prepare_time(tmp_path, capsys):
    write_msrvtt(tmp_path / "msrvtt")
    np.save(tmp_path / "f.npy", np.zeros((9, 4), dtype=np.float32))
    (tmp_path / "ids.txt").write_text("".join(f"video{n}\n" for n in range(9)))
    line = one_line_error(
        capsys, "prepare", "msrvtt", "--annotation-dir", str(tmp_path / "msrvtt"), "--features", str(tmp_path / "f.npy"),
        "--feature-ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "corpus"),
    )
    assert "no training captions" in line and "--msrvtt-data-json" in line and "--splits test" in line
    assert not (tmp_path / "corpus").exists()


def test_non_utf8_annotation_csv_at_prepare_time(tmp_path, capsys):
    write_msrvtt(tmp_path / "msrvtt", encoding="latin-1")
    line = one_line_error(
        capsys, "prepare", "msrvtt", "--annotation-dir", str(tmp_path / "msrvtt"), "--features", "f.npy",
        "--feature-ids", "ids.txt", "--out", str(tmp_path / "corpus"), "--splits", "test",
    )
    assert "MSRVTT_JSFUSION_test.csv: not UTF-8" in line


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--model.init_args.embed_dimm=3", "Option 'embed_dimm' is not accepted"),
        # a prefix of an option is a typo, never that option (argparse's abbreviation matching is off)
        ("--trainer.max_epoch=1", "unrecognized arguments: --trainer.max_epoch; did you mean --trainer.max_epochs?"),
        ("--overwr=true", "did you mean --overwrite?"),
    ],
)
def test_bad_config_keys_are_one_line(tmp_path, capsys, monkeypatch, override, expected):
    monkeypatch.chdir(tmp_path)
    # --print_config: a parser that took the typo would print and exit 0 instead of training for minutes
    line = one_line_error(capsys, "fit", "-c", str(ROOT / "experiments/synthetic/dual_tower.yaml"), override,
                          "--print_config")
    assert expected in line and "help" in line


def test_debug_shows_the_traceback(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = broken_copy(corpus_dir, tmp_path, "dbg")
    (corpus / "features.npy").write_bytes(b"junk")
    with pytest.raises(Exception) as raised:  # the original exception, with the CorpusError in its chain
        main(["--debug", "fit", "-c", MSVD, f"--data.init_args.corpus_dir={corpus}"])
    assert isinstance(user_error_of(raised.value), CorpusError) and "features.npy" in str(user_error_of(raised.value))
    monkeypatch.setenv("GRCM_DEBUG", "1")
    with pytest.raises(Exception) as raised:
        main(["fit", "-c", MSVD, f"--data.init_args.corpus_dir={corpus}"])
    assert not isinstance(raised.value, SystemExit)


def test_console_script_prints_one_line(corpus_dir, tmp_path):
    """The real command line: stderr ends in the one error line, no traceback anywhere."""
    corpus = broken_copy(corpus_dir, tmp_path, "cli")
    (corpus / "features.npy").write_bytes(b"junk")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRCM_DEBUG": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "grcm", "fit", "-c", MSVD, f"--data.init_args.corpus_dir={corpus}"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"grcm: error: {corpus}/features.npy")
