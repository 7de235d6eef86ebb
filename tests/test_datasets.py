"""Benchmark readers on the real annotation files in shared/data, and the feature join that builds a corpus.

Counts are checked against the published split sizes and against direct reads of the files.
"""

from __future__ import annotations

import csv
import gzip
import html
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from grcm.data.corpus import CorpusError, load_corpus
from grcm.data.datamodules import CorpusDataModule
from grcm.data.datasets import DATASET_READERS, build_corpus, get_reader, prepare_dataset
from grcm.data.datasets.audiocaps import audiocaps_feature_key
from grcm.data.datasets.clotho import clotho_feature_key
from grcm.data.datasets.coco import coco_feature_key
from grcm.data.datasets.files import media_stem
from grcm.data.datasets.msrvtt import msrvtt_feature_key

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_dir(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real annotation files not available at {path}")
    return path


def read(name: str, **options):
    return DATASET_READERS[name](data_dir(name), **options)



def write_features(
    path: Path, ids: list[str], dim: int = 8, seed: int = 0
) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Random features for ``ids`` (fixed seed); returns the matrix path, the id-file path and id -> row."""
    features = np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "features.npy", features)
    (path / "ids.txt").write_text("".join(f"{item_id}\n" for item_id in ids), encoding="utf-8")
    return path / "features.npy", path / "ids.txt", dict(zip(ids, features))


@pytest.fixture(scope="module")
def msrvtt():
    return read("msrvtt")


@pytest.fixture(scope="module")
def msvd():
    return read("msvd")


@pytest.fixture(scope="module")
def flickr30k():
    return read("flickr30k")


@pytest.fixture(scope="module")
def clotho():
    return read("clotho", splits=("train", "test"))


@pytest.fixture(scope="module")
def audiocaps():
    return read("audiocaps", splits=("train", "test"))


# -- MSR-VTT ------------------------------------------------------------------------------------------------


def test_msrvtt_1k_a_test_and_9k_train_videos(msrvtt):
    root = data_dir("msrvtt")
    rows = list(csv.DictReader(open(root / "MSRVTT_JSFUSION_test.csv", newline="", encoding="utf-8")))
    train = {row["video_id"] for row in csv.DictReader(open(root / "MSRVTT_train.9k.csv", newline=""))}
    test_items = msrvtt.items_of_split("test")
    assert test_items == [row["video_id"] for row in rows] and len(test_items) == 1000
    assert len(train) == 9000 and not train & set(test_items)
    assert set(msrvtt.item_ids) == train | set(test_items) == {f"video{n}" for n in range(10000)}
    assert msrvtt.captions_by_item("test") == {row["video_id"]: [row["sentence"]] for row in rows}
    # 1k-A has no validation split: val repeats the test queries; no training captions without MSRVTT_data.json
    assert msrvtt.captions_by_item("val") == msrvtt.captions_by_item("test")
    assert msrvtt.counts()["captions"]["train"] == 0
    assert any("MSRVTT_data.json" in note for note in msrvtt.notes)


def test_msrvtt_transductive_captions_leave_out_the_test_queries():
    captions = read("msrvtt", transductive=True, validation="none")
    test = captions.captions_by_item("test")
    train = captions.captions_by_item("train")
    assert captions.counts()["captions"]["val"] == 0 and set(train) == set(test)
    entries = json.loads((data_dir("msrvtt") / "msrvtt_ret_train_addition.json").read_text())
    assert len(entries) == 20000

    def letters(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum())

    for video, (query,) in test.items():
        assert letters(query) not in {letters(t) for t in train[video]}
    # every left-out caption equals its video's query: train + left out = all 20,000 captions
    left_out = sum(letters(e["caption"]) == letters(test[e["video"][:-4]][0]) for e in entries)
    assert sum(map(len, train.values())) + left_out == 20000


def test_msrvtt_official_validation_with_user_supplied_data_json(tmp_path):
    sentences = [
        {"video_id": f"video{n}", "caption": f"clip  {n} caption {k}", "sen_id": 2 * n + k}
        for n in range(10000)
        for k in range(2)
    ]
    data_json = tmp_path / "MSRVTT_data.json"
    data_json.write_text(json.dumps({"videos": [], "sentences": sentences}))
    captions = read("msrvtt", msrvtt_data_json=data_json, validation="official")
    counts = captions.counts()
    assert counts["items"] == {"train": 9000 - 497, "val": 497, "test": 1000}
    assert counts["captions"] == {"train": 2 * 8503, "val": 2 * 497, "test": 1000}
    assert set(captions.items_of_split("val")) == {f"video{n}" for n in range(6513, 7010)}
    assert captions.captions_by_item("train")["video0"] == ["clip 0 caption 0", "clip 0 caption 1"]
    with pytest.raises(CorpusError, match="nowhere.json"):
        read("msrvtt", msrvtt_data_json=tmp_path / "nowhere.json")


# -- MSVD ---------------------------------------------------------------------------------------------------


def test_msvd_split_sizes_match_the_lists_and_caption_file(msvd):
    root = data_dir("msvd")
    all_captions = json.loads((root / "captions_msvd.json").read_text())
    counts = msvd.counts()
    assert counts["items"] == {"train": 1200, "val": 100, "test": 670}
    assert counts["captions"] == {"train": 48774, "val": 4290, "test": 27763}
    for split in ("train", "val", "test"):
        listed = (root / f"{split}_list.txt").read_text().split()
        assert msvd.items_of_split(split) == listed
        assert sum(len(all_captions[video]) for video in listed) == counts["captions"][split]
    assert msvd.captions_by_item("test")["eyhzdC936uk_15_27"] == all_captions["eyhzdC936uk_15_27"]


# -- Flickr30K ----------------------------------------------------------------------------------------------


def test_flickr30k_karpathy_splits_five_captions_each(flickr30k):
    counts = flickr30k.counts()
    assert counts["items"] == {"train": 29000, "val": 1014, "test": 1000}
    assert counts["captions"] == {"train": 145000, "val": 5070, "test": 5000}
    assert set(Counter(flickr30k.caption_item.tolist()).values()) == {5}
    task2 = data_dir("flickr30k") / "multi30k_task2"
    assert (
        flickr30k.items_of_split("test") == (task2 / "image_splits/test_2016_images.txt").read_text().split()
    )


def test_flickr30k_decodes_html_entities_and_keeps_line_alignment(flickr30k):
    task2 = data_dir("flickr30k") / "multi30k_task2"
    images = (task2 / "image_splits/train_images.txt").read_text().split()
    raw = [
        gzip.open(task2 / f"raw/train.{k}.en.gz", "rt", encoding="utf-8").read().split("\n")
        for k in range(1, 6)
    ]
    escaped = sum(html.unescape(line) != line for lines in raw for line in lines)
    assert escaped == 82
    train = flickr30k.captions_by_item("train")
    for i in (0, 1234, 28999):
        assert train[images[i]] == [" ".join(html.unescape(lines[i]).split()) for lines in raw]
    assert not any(re.search(r"&(amp|lt|gt|quot|#\d+);", text) for text in flickr30k.caption_text)


def test_flickr30k_test_captions_equal_scan_precomp_order(flickr30k):
    scan = (data_dir("flickr30k") / "f30k_precomp/test_caps.txt").read_text(encoding="utf-8").split("\n")
    assert len(scan) == 5000
    test = flickr30k.captions_by_item("test")
    ours = [text for image in flickr30k.items_of_split("test") for text in test[image]]
    ours, scan = ["".join(t.split()) for t in ours], ["".join(t.split()) for t in scan]
    assert [t.lower() for t in ours] == [t.lower() for t in scan]
    # Multi30K capitalises the first letter of 222 test captions that SCAN's copy keeps lower-case
    assert sum(a != b for a, b in zip(ours, scan)) == 222
    id_mapping = json.loads((data_dir("flickr30k") / "id_mapping.json").read_text())
    assert {id_mapping[str(i)] for i in (25, 34, 51)} <= set(test)


# -- COCO ---------------------------------------------------------------------------------------------------


def test_coco_karpathy_5k_test_in_karpathy_order_with_eccv_image_ids():
    root = data_dir("coco")
    coco = read("coco")
    counts = coco.counts()
    assert counts["items"]["test"] == 5000 and counts["captions"] == {"train": 0, "val": 0, "test": 25000}
    assert coco.item_ids[:4] == ["391895", "60623", "483108", "384213"]
    up_down = {line.split()[1] for line in (root / "karpathy_test_images.txt").read_text().splitlines()}
    assert set(coco.item_ids) == up_down
    lines = (root / "coco_precomp/testall_caps.txt").read_text(encoding="utf-8").split("\n")
    assert [coco.caption_text[i] for i in range(5)] == lines[:5]
    assert coco.caption_item.tolist() == np.repeat(np.arange(5000), 5).tolist()
    image_to_captions = json.loads((root / "original_image_to_caption.json").read_text())
    caption_ids = np.load(root / "coco_test_ids.npy", allow_pickle=False)
    for block in (0, 2500, 4999):
        ids = caption_ids[5 * block : 5 * block + 5].tolist()
        assert sorted(image_to_captions[coco.item_ids[block]]) == sorted(ids)
    assert any("dataset_coco.json" in note for note in coco.notes)


def test_karpathy_json_restval_joins_train_and_keeps_five_captions(tmp_path):
    def image(cocoid, split, n):
        return {
            "cocoid": cocoid,
            "filename": f"COCO_val2014_{cocoid:012d}.jpg",
            "split": split,
            "sentences": [{"raw": f"caption {k} of {cocoid} &amp; more "} for k in range(n)],
        }

    records = [image(1, "train", 5), image(2, "restval", 7), image(3, "val", 5), image(4, "test", 6)]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": records, "dataset": "coco"}))
    coco = DATASET_READERS["coco"](tmp_path)
    assert coco.counts()["items"] == {"train": 2, "val": 1, "test": 1}
    assert coco.counts()["captions"] == {"train": 10, "val": 5, "test": 5}
    assert coco.item_ids == ["1", "2", "3", "4"] and coco.caption_text[0] == "caption 0 of 1 &amp; more"
    (tmp_path / "dataset_flickr30k.json").write_text(
        json.dumps({"images": [dict(r, filename=f"{r['cocoid']}.jpg", split="test") for r in records[:1]]})
    )
    flickr = DATASET_READERS["flickr30k"](tmp_path, karpathy_json=tmp_path / "dataset_flickr30k.json")
    assert flickr.item_ids == ["1.jpg"] and flickr.caption_text[0] == "caption 0 of 1 & more"


# -- Clotho -------------------------------------------------------------------------------------------------


def test_clotho_split_qualified_ids_and_leading_spaces(clotho):
    counts = clotho.counts()
    assert counts["items"] == {"train": 3839, "val": 0, "test": 1045}
    assert counts["captions"] == {"train": 19195, "val": 0, "test": 5225}
    ids = set(clotho.item_ids)
    assert {"development/FREEZER_DOOR_OPEN_CLOSE.wav", "evaluation/FREEZER_DOOR_OPEN_CLOSE.wav"} <= ids
    assert {"development/ typical neighborhood in Porto.wav", "development/ Ambience Birds.wav"} <= ids
    row = next(
        csv.DictReader(
            open(data_dir("clotho") / "clotho_captions_evaluation.csv", newline="", encoding="utf-8")
        )
    )
    evaluation = clotho.captions_by_item("test")
    assert evaluation[f"evaluation/{row['file_name']}"] == [
        " ".join(row[f"caption_{k}"].split()) for k in range(1, 6)
    ]


def test_clotho_reads_crlf_files_like_lf(tmp_path, clotho):
    for split in ("development", "evaluation"):
        source = data_dir("clotho") / f"clotho_captions_{split}.csv"
        (tmp_path / source.name).write_bytes(source.read_bytes().replace(b"\n", b"\r\n"))
    crlf = DATASET_READERS["clotho"](tmp_path, splits=("train", "test"))
    assert crlf.item_ids == clotho.item_ids and crlf.caption_text == clotho.caption_text
    assert not any("\r" in item_id for item_id in crlf.item_ids)
    with pytest.raises(CorpusError, match="clotho_captions_validation.csv not found, but split 'val' was asked"):
        DATASET_READERS["clotho"](tmp_path, splits=("train", "val", "test"))
    detected = DATASET_READERS["clotho"](tmp_path)  # without splits: the CSVs that exist, a notice for the rest
    assert detected.splits == ("train", "test") and detected.caption_text == clotho.caption_text
    assert any(
        "clotho_captions_validation.csv not found" in note and "data.init_args.val_from_train" in note
        for note in detected.notes
    )


# -- AudioCaps ----------------------------------------------------------------------------------------------


def test_audiocaps_clips_from_crlf_csvs(audiocaps):
    counts = audiocaps.counts()
    assert counts["items"] == {"train": 49838, "val": 0, "test": 975}
    assert counts["captions"] == {"train": 49838, "val": 0, "test": 4875}
    assert set(Counter(audiocaps.caption_item[audiocaps.caption_split == "test"].tolist()).values()) == {5}
    assert not set(audiocaps.items_of_split("train")) & set(audiocaps.items_of_split("test"))
    assert not any("\r" in text for text in audiocaps.caption_text)
    raw = (data_dir("audiocaps") / "test.csv").read_bytes()
    assert raw.count(b"\r\n") == 4876
    first = raw.split(b"\r\n")[1].decode().split(",", 3)
    assert audiocaps.captions_by_item("test")[f"{first[1]}_{first[2]}"][0] == first[3]


# -- feature keys -------------------------------------------------------------------------------------------


def test_feature_keys_accept_common_file_naming():
    assert (
        msrvtt_feature_key("MSRVTT/videos/all/video7960.mp4")
        == msrvtt_feature_key("video7960")
        == "video7960"
    )
    assert media_stem("Foo 1.2") == "Foo 1.2" and media_stem(r"C:\clips\Foo 1.2.wav") == "Foo 1.2"
    assert coco_feature_key("val2014/COCO_val2014_000000391895.jpg") == coco_feature_key("391895") == "391895"
    assert coco_feature_key("000000391895.jpg") == "391895"
    key = "7fmOlUlwoNg_20"
    assert audiocaps_feature_key("Y7fmOlUlwoNg_20.000_30.000.wav") == audiocaps_feature_key(key) == key
    assert audiocaps_feature_key("audio/7fmOlUlwoNg_20.wav") == key
    assert audiocaps_feature_key("Yabcdefghij_5") == "Yabcdefghij_5"  # an 11-character id that starts with Y
    assert clotho_feature_key("development/ Ambience Birds.wav") == "development/Ambience Birds"
    assert (
        clotho_feature_key("/data/clotho_audio_development/Ambience Birds.wav")
        == "development/Ambience Birds"
    )
    assert clotho_feature_key("Ambience Birds.wav") == "Ambience Birds"


# -- building corpora ---------------------------------------------------------------------------------------


def test_build_corpus_round_trip_with_renamed_shuffled_feature_rows(tmp_path, msvd):
    rng = np.random.default_rng(0)
    order = rng.permutation(msvd.num_items)
    file_names = [f"YouTubeClips/{msvd.item_ids[i]}.avi" for i in order]
    features_path, ids_path, feature_of = write_features(tmp_path / "features", file_names)
    out = build_corpus(
        msvd, features_path, ids_path, tmp_path / "corpus", feature_key=get_reader("msvd").feature_key
    )
    corpus = load_corpus(out)
    assert corpus.item_ids == msvd.item_ids and corpus.feature_dim == 8
    expected = np.stack([feature_of[f"YouTubeClips/{item_id}.avi"] for item_id in corpus.item_ids])
    np.testing.assert_array_equal(np.asarray(corpus.features), expected)
    assert corpus.caption_text == msvd.caption_text
    assert corpus.caption_item.tolist() == msvd.caption_item.tolist()
    assert corpus.caption_split.tolist() == msvd.caption_split.tolist()
    report = json.loads((out / "preparation.json").read_text())
    assert (
        report["captions"] == {"train": 48774, "val": 4290, "test": 27763} and report["skipped_items"] == []
    )


def test_missing_feature_row_names_the_item_and_skip_missing_drops_it(tmp_path, clotho):
    ids = [item_id for item_id in clotho.item_ids if item_id != "evaluation/Santa Motor.wav"]
    features_path, ids_path, _ = write_features(tmp_path / "features", ids)
    key = get_reader("clotho").feature_key
    with pytest.raises(CorpusError, match=r"'evaluation/Santa Motor.wav'.*skip_missing=True"):
        build_corpus(clotho, features_path, ids_path, tmp_path / "corpus", feature_key=key)
    assert not (tmp_path / "corpus").exists()
    out = build_corpus(
        clotho, features_path, ids_path, tmp_path / "corpus", feature_key=key, skip_missing=True
    )
    report = json.loads((out / "preparation.json").read_text())
    assert report["skipped_items"] == ["evaluation/Santa Motor.wav"]
    assert report["skipped_captions"] == {"train": 0, "val": 0, "test": 5}
    corpus = load_corpus(out)
    assert corpus.num_items == clotho.num_items - 1 and len(corpus.caption_text) == clotho.num_captions - 5
    assert "development/ Ambience Birds.wav" in corpus.item_ids


def test_prepare_audiocaps_test_split_skipping_undownloadable_clips(tmp_path):
    from safetensors.numpy import save_file

    captions = read("audiocaps", splits=("test",))
    available = captions.item_ids[18:]  # 957 of 975 clips, as in WavCaps' own test set
    names = [f"Y{item_id}.000_{int(item_id.rsplit('_', 1)[1]) + 10}.000.wav" for item_id in available]
    features = np.random.default_rng(1).standard_normal((len(names), 4)).astype(np.float16)
    save_file({"embeddings": features}, str(tmp_path / "clap.safetensors"))
    (tmp_path / "clap_ids.txt").write_text("\r\n".join(names) + "\r\n")
    args = ("audiocaps", data_dir("audiocaps"), tmp_path / "clap.safetensors", tmp_path / "clap_ids.txt")
    with pytest.raises(CorpusError, match=captions.item_ids[0]):
        prepare_dataset(*args, tmp_path / "corpus", splits=("test",))
    out = prepare_dataset(*args, tmp_path / "corpus", skip_missing=True, splits=("test",))
    corpus = load_corpus(out)
    assert corpus.item_ids == available and corpus.features.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(corpus.features), features)
    assert (corpus.caption_split == "test").sum() == 957 * 5
    assert len(json.loads((out / "preparation.json").read_text())["skipped_items"]) == 18


def test_keep_uncaptioned_adds_gallery_items_only_when_asked(tmp_path, msrvtt):
    test_videos = msrvtt.items_of_split("test")
    ids = [f"{video}.mp4" for video in test_videos] + ["video0.mp4", "distractor_a.mp4"]
    features_path, ids_path, _ = write_features(tmp_path / "features", ids)
    key = get_reader("msrvtt").feature_key
    # no training captions (no MSRVTT_data.json here); video0 has none and distractor_a names no item: unused rows
    with pytest.raises(CorpusError, match=r"split 'train' would have no captions.*and 1 more problem"):
        build_corpus(msrvtt, features_path, ids_path, tmp_path / "plain", feature_key=key)
    plain = load_corpus(
        build_corpus(msrvtt, features_path, ids_path, tmp_path / "plain", feature_key=key, allow_empty=True)
    )
    assert plain.item_ids == test_videos
    gallery = load_corpus(
        build_corpus(
            msrvtt,
            features_path,
            ids_path,
            tmp_path / "gallery",
            feature_key=key,
            keep_uncaptioned=True,
            allow_empty=True,
        )
    )
    assert gallery.item_ids == ["video0"] + test_videos + ["distractor_a.mp4"]
    assert len(gallery.caption_text) == len(plain.caption_text) == 2000


def test_feature_file_errors_name_the_file_and_the_fix(tmp_path, msvd):
    features_path, ids_path, _ = write_features(tmp_path, msvd.item_ids)
    short_ids = tmp_path / "short.txt"
    short_ids.write_text("".join(f"{item_id}\n" for item_id in msvd.item_ids[:-1]))
    with pytest.raises(CorpusError, match="line i of the id file must name feature row i"):
        build_corpus(msvd, features_path, short_ids, tmp_path / "corpus")
    doubled = tmp_path / "doubled.txt"
    doubled.write_text(
        "".join(f"{item_id}\n" for item_id in [*msvd.item_ids[:-1], msvd.item_ids[0] + ".avi"])
    )
    with pytest.raises(CorpusError, match="both name item"):
        build_corpus(
            msvd, features_path, doubled, tmp_path / "corpus", feature_key=get_reader("msvd").feature_key
        )
    with pytest.raises(ValueError, match="msvd"):
        prepare_dataset("msvdd", data_dir("msvd"), features_path, ids_path, tmp_path / "corpus")


def test_misaligned_multi30k_file_is_reported(tmp_path):
    task2 = data_dir("flickr30k") / "multi30k_task2"
    shutil.copytree(task2 / "image_splits", tmp_path / "image_splits")
    (tmp_path / "raw").mkdir()
    for k in range(1, 6):
        lines = gzip.open(task2 / f"raw/test_2016.{k}.en.gz", "rt", encoding="utf-8").read().split("\n")
        (tmp_path / f"raw/test_2016.{k}.en").write_text(
            "\n".join(lines[: -2 if k == 3 else None]), encoding="utf-8"
        )
    with pytest.raises(CorpusError, match=r"test_2016\.3\.en: 999 lines"):
        DATASET_READERS["flickr30k"](tmp_path, splits=("test",))


def test_prepared_corpus_feeds_the_corpus_datamodule(tmp_path, msvd):
    features_path, ids_path, feature_of = write_features(tmp_path / "features", msvd.items_of_split("val"), dim=6)
    out = prepare_dataset(
        "msvd", data_dir("msvd"), features_path, ids_path, tmp_path / "corpus", splits=("val",)
    )
    data = CorpusDataModule(
        str(out), serve="items", batch_size=64, eval_batch_size=64, query_vocab="wordpiece"
    )
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    assert data.feature_dim == 6 and data.corpus.num_items == 100 and batch["features"].shape == (64, 6)
    val_list = (data_dir("msvd") / "val_list.txt").read_text().split()
    expected = np.stack([feature_of[val_list[i]] for i in batch["item_index"].tolist()])
    np.testing.assert_array_equal(batch["features"].numpy(), expected)
