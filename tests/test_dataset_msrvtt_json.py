"""MSR-VTT captions as lists of ``{"video", "caption"}`` records (JSON arrays and JSON Lines), detected by content."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from grcm.cli import main
from grcm.data.corpus import CorpusError, load_corpus
from grcm.data.datasets import read_captions

SHARED_MSRVTT = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrvtt"



def write_json_layout(folder: Path) -> None:
    """A 9k-style train list as JSON Lines (one caption list among strings) and a 1k-style test list as a JSON array."""
    folder.mkdir(parents=True, exist_ok=True)
    train = [{"video": f"video{n}.mp4", "caption": f"train clip  {n} take {k}", "duration": 10.0}
             for n in range(4) for k in range(2)]
    train.append({"video": "video4.mp4", "caption": ["a list caption", "another one"]})
    (folder / "msrvtt_ret_train9k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    test = [{"video": f"video{n}.mp4", "caption": f"test query {n}"} for n in (90, 91, 92)]
    (folder / "msrvtt_test1k.json").write_text(json.dumps(test, indent=2), encoding="utf-8")


def test_json_train_and_test_lists_without_the_csvs(tmp_path):
    write_json_layout(tmp_path)
    captions = read_captions("msrvtt", tmp_path)
    assert captions.item_ids == [f"video{n}" for n in (0, 1, 2, 3, 4, 90, 91, 92)]
    assert captions.captions_by_item("train")["video1"] == ["train clip 1 take 0", "train clip 1 take 1"]
    assert captions.captions_by_item("train")["video4"] == ["a list caption", "another one"]
    assert captions.captions_by_item("test") == {f"video{n}": [f"test query {n}"] for n in (90, 91, 92)}
    assert captions.captions_by_item("val") == captions.captions_by_item("test")  # validation="test", as with the JSFusion CSV
    assert captions.counts()["captions"] == {"train": 10, "val": 3, "test": 3}


def test_json_array_and_json_lines_read_alike(tmp_path):
    write_json_layout(tmp_path / "lines")
    array = tmp_path / "array"
    array.mkdir()
    records = [json.loads(line) for line in (tmp_path / "lines/msrvtt_ret_train9k.jsonl").read_text().splitlines()]
    (array / "msrvtt_ret_train9k.json").write_text(json.dumps(records))
    test = json.loads((tmp_path / "lines/msrvtt_test1k.json").read_text())
    (array / "msrvtt_ret_test1k.jsonl").write_bytes("".join(json.dumps(r) + "\r\n" for r in test).encode())
    a, b = read_captions("msrvtt", tmp_path / "lines"), read_captions("msrvtt", array)
    assert a.item_ids == b.item_ids and a.caption_text == b.caption_text
    assert a.caption_split.tolist() == b.caption_split.tolist()


def test_json_train_captions_for_the_csv_train_list(tmp_path):
    write_json_layout(tmp_path)
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo1\nvideo3\nvideo7\n")
    captions = read_captions("msrvtt", tmp_path, validation="none")
    assert captions.items_of_split("train") == ["video1", "video3"] and "video7" in captions.item_ids
    assert any("1 training video(s) have no captions" in note for note in captions.notes)
    assert captions.splits == ("train", "test")


def test_test_only_json_prepares_without_splits_and_bad_records_are_named(tmp_path, capsys):
    write_json_layout(tmp_path / "msrvtt")
    (tmp_path / "msrvtt" / "msrvtt_ret_train9k.jsonl").unlink()
    ids = ["video90.mp4", "video91.mp4", "video92.mp4"]
    np.save(tmp_path / "f.npy", np.ones((3, 4), dtype=np.float32))
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    common = ["prepare", "msrvtt", "--annotation-dir", str(tmp_path / "msrvtt"), "--features", str(tmp_path / "f.npy"),
              "--feature-ids", str(tmp_path / "ids.txt"), "--out"]
    main([*common, str(tmp_path / "corpus")])
    captured = capsys.readouterr()
    assert "train 0 items / 0 captions, val 3 items / 3 captions, test 3 items / 3 captions" in captured.out
    assert "no training split" in captured.err
    assert load_corpus(tmp_path / "corpus").item_ids == ["video90", "video91", "video92"]

    (tmp_path / "msrvtt" / "msrvtt_ret_train9k.jsonl").write_text(
        '{"video": "video0.mp4", "caption": "fine"}\n{"video": "video1.mp4"}\n')
    with pytest.raises(SystemExit) as exit_:
        main([*common, str(tmp_path / "again")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "msrvtt_ret_train9k.jsonl: line 2 is not a {\"video\": <file name>, \"caption\"" in err
    (tmp_path / "msrvtt" / "msrvtt_ret_train9k.jsonl").unlink()
    (tmp_path / "msrvtt" / "msrvtt_test1k.json").rename(tmp_path / "msrvtt" / "msrvtt_1ka.json")
    with pytest.raises(CorpusError, match=r"\['msrvtt_1ka.json'\] hold \{video, caption\} records: put 'test'"):
        read_captions("msrvtt", tmp_path / "msrvtt")
    (tmp_path / "msrvtt" / "msrvtt_ret_train9k.jsonl").write_text('{"video": "v.mp4", "caption": "a"}\n{oops\n')
    with pytest.raises(CorpusError, match="line 2 is not JSON"):
        read_captions("msrvtt", tmp_path / "msrvtt")


def test_real_grdr_record_file_as_a_test_list(tmp_path):
    addition = SHARED_MSRVTT / "msrvtt_ret_train_addition.json"
    if not addition.is_file() or not (SHARED_MSRVTT / "MSRVTT_JSFUSION_test.csv").is_file():
        pytest.skip(f"real MSR-VTT files not available at {SHARED_MSRVTT}")
    shutil.copy(addition, tmp_path / "msrvtt_test_20_captions.json")
    captions = read_captions("msrvtt", tmp_path, validation="none")
    jsfusion = [line.split(",")[2] for line in (SHARED_MSRVTT / "MSRVTT_JSFUSION_test.csv").read_text().splitlines()[1:]]
    assert set(captions.item_ids) == set(jsfusion) and captions.item_ids[0] == "video7960"
    assert captions.counts()["captions"] == {"train": 0, "val": 0, "test": 20000}
    entries = json.loads(addition.read_text())
    assert captions.captions_by_item("test")["video7960"] == [
        " ".join(e["caption"].split()) for e in entries if e["video"] == "video7960.mp4"
    ]
    # beside the CSVs, the same file named as GRDR names it is the transductive source, not a train list
    shared = read_captions("msrvtt", SHARED_MSRVTT, transductive=True, validation="none")
    assert shared.items_of_split("train") == shared.items_of_split("test") and len(shared.items_of_split("test")) == 1000
