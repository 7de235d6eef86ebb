"""``grcm prepare`` on small annotation folders: empty splits, unused feature rows, absent split files, id hints.

Each case is a command a user types; failures must be one ``grcm: error:`` line naming the file and the fix,
and nothing may be written; successes print the items and captions of every split.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from grcm.cli import main
from grcm.data.corpus import load_corpus

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NOTICE = "no validation split; fit will hold out part of train for validation (data.init_args.val_from_train)"


def prepare(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``grcm prepare args``; exit status, stdout and stderr (with Lightning's stale-handler noise removed)."""
    try:
        main(["prepare", *args])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    err = re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n", "", captured.err, flags=re.S)
    return code, captured.out, err


def error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("grcm: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def write_clotho(folder: Path, splits: dict[str, int]) -> list[str]:
    """Clotho caption CSVs with ``splits[official name]`` rows each (CRLF, quoted commas); the item ids."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for official, rows in splits.items():
        with open(folder / f"clotho_captions_{official}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)  # csv's default line end is CRLF, as in the Zenodo files
            writer.writerow(["file_name", *(f"caption_{k}" for k in range(1, 6))])
            for row in range(rows):
                name = f"{official[:3]} clip, {row}.wav"
                writer.writerow([name, *(f"sound {row} of {official} number {k}" for k in range(5))])
                ids.append(f"{official}/{name}")
    return ids


def write_features(folder: Path, ids: list[str]) -> tuple[str, str]:
    np.save(folder / "f.npy", np.random.default_rng(0).standard_normal((len(ids), 4)).astype(np.float32))
    (folder / "ids.txt").write_text("".join(f"{item}\n" for item in ids), encoding="utf-8")
    return str(folder / "f.npy"), str(folder / "ids.txt")


def args(annotations: Path, features: tuple[str, str], out: Path, *extra: str) -> list[str]:
    return ["--annotation-dir", str(annotations), "--features", features[0], "--feature-ids", features[1],
            "--out", str(out), *extra]


def test_clotho_without_validation_csv_prepares_with_a_notice_and_prints_split_counts(tmp_path, capsys):
    ids = write_clotho(tmp_path / "clotho", {"development": 4, "evaluation": 3})
    code, out, err = prepare(capsys, "clotho", *args(tmp_path / "clotho", write_features(tmp_path, ids),
                                                     tmp_path / "corpus"))
    assert code == 0, err
    assert f"clotho_captions_validation.csv not found in {tmp_path / 'clotho'}: {NOTICE}" in err
    assert err.startswith("grcm: notice: ")
    assert out.strip() == (
        f"grcm prepare: wrote {tmp_path / 'corpus'}: 7 items (train 4 items / 20 captions, val 0 items / 0 captions, "
        "test 3 items / 15 captions), 0 unused feature rows, 0 items skipped for lack of features"
    )
    corpus = load_corpus(tmp_path / "corpus")
    assert corpus.item_ids == ids and corpus.caption_split.tolist() == ["train"] * 20 + ["test"] * 15
    report = json.loads((tmp_path / "corpus" / "preparation.json").read_text())
    assert report["splits"] == ["train", "test"] and report["warnings"] == []
    # asking for the validation split by name still needs its file
    code, _, err = prepare(capsys, "clotho", *args(tmp_path / "clotho", write_features(tmp_path, ids),
                                                   tmp_path / "again", "--splits", "train", "val", "test"))
    assert code == 2 and "clotho_captions_validation.csv not found, but split 'val' was asked" in error_line(err)


def test_split_with_no_captions_fails_unless_allowed(tmp_path, capsys):
    ids = write_clotho(tmp_path / "clotho", {"development": 0, "evaluation": 3})  # a header-only development CSV
    features = write_features(tmp_path, ids)
    code, out, err = prepare(capsys, "clotho", *args(tmp_path / "clotho", features, tmp_path / "corpus"))
    line = error_line(err)
    assert code == 2 and out == "" and not (tmp_path / "corpus").exists()
    assert "split 'train' would have no captions" in line
    assert str(tmp_path / "clotho" / "clotho_captions_development.csv") in line
    assert "--splits test" in line and "--allow-empty" in line
    code, out, err = prepare(capsys, "clotho", *args(tmp_path / "clotho", features, tmp_path / "corpus",
                                                     "--allow-empty"))
    assert code == 0 and "grcm: warning: clotho: split 'train' would have no captions" in err
    assert "train 0 items / 0 captions" in out and "test 3 items / 15 captions" in out
    assert json.loads((tmp_path / "corpus" / "preparation.json").read_text())["warnings"]


def test_skipping_every_item_of_a_split_is_an_empty_split(tmp_path, capsys):
    ids = write_clotho(tmp_path / "clotho", {"development": 3, "evaluation": 2})
    features = write_features(tmp_path, ids[3:])  # features of the evaluation clips only
    code, _, err = prepare(capsys, "clotho", *args(tmp_path / "clotho", features, tmp_path / "corpus",
                                                   "--skip-missing"))
    line = error_line(err)
    assert code == 2 and "split 'train' would have no captions: all 3 of its captioned items have no feature row" in line


def test_unused_feature_rows_fail_with_the_id_format_and_an_example(tmp_path, capsys):
    ids = write_clotho(tmp_path / "clotho", {"development": 3, "evaluation": 2})
    features = write_features(tmp_path, [*ids, "development/not in the csv.wav", "evaluation/nor this.wav"])
    code, out, err = prepare(capsys, "clotho", *args(tmp_path / "clotho", features, tmp_path / "corpus"))
    line = error_line(err)
    assert code == 2 and not (tmp_path / "corpus").exists()
    assert "2 of 7 feature rows would be unused: 2 match no item" in line and "'development/not in the csv.wav'" in line
    assert "clotho feature ids look like <development|validation|evaluation>/<file_name>" in line
    assert f"first item is {ids[0]!r}" in line and "--keep-uncaptioned" in line and "--allow-empty" in line
    code, out, err = prepare(capsys, "clotho", *args(tmp_path / "clotho", features, tmp_path / "corpus",
                                                     "--allow-empty"))
    assert code == 0 and "grcm: warning:" in err and "2 unused feature rows" in out
    assert load_corpus(tmp_path / "corpus").item_ids == ids
    code, out, _ = prepare(capsys, "clotho", *args(tmp_path / "clotho", features, tmp_path / "kept",
                                                   "--keep-uncaptioned"))
    assert code == 0 and "7 items" in out and "2 uncaptioned kept" in out and "0 unused feature rows" in out


def test_feature_ids_without_the_split_folder_get_the_format_hint(tmp_path, capsys):
    ids = write_clotho(tmp_path / "clotho", {"development": 2, "evaluation": 2})
    features = write_features(tmp_path, [item.split("/", 1)[1] for item in ids])  # file names only
    code, _, err = prepare(capsys, "clotho", *args(tmp_path / "clotho", features, tmp_path / "corpus"))
    line = error_line(err)
    assert code == 2 and "no feature row for item 'development/dev clip, 0.wav'" in line
    assert "e.g. development/Birds in the park.wav" in line
    # two clips of the same file name in two splits, named without the split folder: one key
    (tmp_path / "dup.txt").write_text("dev clip, 0.wav\nfolder/dev clip, 0.wav\n", encoding="utf-8")
    np.save(tmp_path / "dup.npy", np.zeros((2, 4), dtype=np.float32))
    code, _, err = prepare(capsys, "clotho", *args(tmp_path / "clotho", (str(tmp_path / "dup.npy"),
                                                   str(tmp_path / "dup.txt")), tmp_path / "corpus"))
    line = error_line(err)
    assert "both name item 'dev clip, 0'" in line and "<development|validation|evaluation>/<file_name>" in line


def test_real_clotho_development_and_evaluation_prepare_without_splits(tmp_path, capsys):
    clotho = SHARED_DATA / "clotho"
    if not (clotho / "clotho_captions_development.csv").is_file():
        pytest.skip(f"real Clotho CSVs not available at {clotho}")
    ids = []
    for official in ("development", "evaluation"):
        with open(clotho / f"clotho_captions_{official}.csv", newline="", encoding="utf-8") as handle:
            ids += [f"{official}/{row['file_name']}" for row in csv.DictReader(handle)]
    code, out, err = prepare(capsys, "clotho", *args(clotho, write_features(tmp_path, ids), tmp_path / "corpus"))
    assert code == 0, err
    assert NOTICE in err
    assert "4884 items (train 3839 items / 19195 captions, val 0 items / 0 captions, test 1045 items / 5225" in out
