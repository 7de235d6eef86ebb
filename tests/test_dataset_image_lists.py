"""Karpathy image-list files (COCO's Up-Down lists, Flickr30K's Multi30K image_splits) with captions from caption files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from grcm.cli import main
from grcm.data.corpus import CorpusError
from grcm.data.datasets import read_captions

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VAL_NOTICE = "no validation split; fit will hold out part of train for validation (data.init_args.val_from_train)"



def coco_line(image_id: int, part: str) -> str:
    return f"{part}2014/COCO_{part}2014_{image_id:012d}.jpg {image_id}\n"


def write_coco_captions(path: Path, captions: dict[int, list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    annotations = [{"image_id": image, "id": 1000 * image + k, "caption": text}
                   for image, texts in captions.items() for k, text in enumerate(texts)]
    images = [{"id": image, "file_name": f"COCO_x_{image:012d}.jpg"} for image in captions]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))


def test_coco_image_lists_of_every_split_with_coco_caption_files(tmp_path):
    splits = tmp_path / "coco_splits"
    splits.mkdir()
    (splits / "karpathy_train_images.txt").write_text(coco_line(9, "train") + coco_line(25, "train") + coco_line(42, "val"))
    (splits / "karpathy_val_images.txt").write_text(coco_line(73, "val"))
    (splits / "karpathy_test_images.txt").write_text(coco_line(74, "val") + coco_line(391895, "val"))
    write_coco_captions(tmp_path / "annotations/captions_train2014.json",
                        {25: [f"b{k}" for k in range(5)], 9: [f"a {k}  caption" for k in range(7)]})
    write_coco_captions(tmp_path / "annotations/captions_val2014.json",
                        {391895: ["t0", "t1"], 42: ["r0"], 73: ["v0", "v1"], 74: ["u0"]})
    coco = read_captions("coco", tmp_path)
    assert coco.splits == ("train", "val", "test")
    assert coco.item_ids == ["9", "25", "42", "73", "74", "391895"]  # list order, restval images on the train list
    assert coco.captions_by_item("train") == {"9": [f"a {k} caption" for k in range(5)], "25": [f"b{k}" for k in range(5)],
                                      "42": ["r0"]}
    assert coco.captions_by_item("val") == {"73": ["v0", "v1"]} and coco.captions_by_item("test") == {"74": ["u0"], "391895": ["t0", "t1"]}
    # without the val2014 caption file the val and test lists have no captions: prepare names the file to add
    (tmp_path / "annotations/captions_val2014.json").unlink()
    np.save(tmp_path / "f.npy", np.ones((6, 4), dtype=np.float32))
    (tmp_path / "ids.txt").write_text("".join(coco_line(i, "val").split()[0] + "\n" for i in (9, 25, 42, 73, 74, 391895)))
    with pytest.raises(CorpusError, match=r"split 'val' would have no captions.*karpathy_val_images.txt: 1 of 1"):
        from grcm.data.datasets import prepare_dataset

        prepare_dataset("coco", tmp_path, tmp_path / "f.npy", tmp_path / "ids.txt", tmp_path / "corpus")


def test_coco_image_list_alone_names_the_caption_files(tmp_path, capsys):
    (tmp_path / "karpathy_val_images.txt").write_text(coco_line(73, "val"))
    (tmp_path / "karpathy_test_images.txt").write_text(coco_line(74, "val"))
    write_coco_captions(tmp_path / "captions_val2014.json", {74: ["u0"]})  # covers the test image only
    coco = read_captions("coco", tmp_path)
    assert coco.splits == ("val", "test") and coco.item_ids == ["73", "74"]
    assert any("karpathy_train_images.txt (or dataset_coco.json) not found" in note for note in coco.notes)
    (tmp_path / "captions_val2014.json").unlink()
    with pytest.raises(SystemExit):
        main(["prepare", "coco", "--annotation-dir", str(tmp_path), "--features", "f.npy", "--feature-ids", "i.txt",
              "--out", str(tmp_path / "corpus")])
    err = capsys.readouterr().err
    assert "grcm: error: coco: no captions were read" in err and "captions_{train,val}2014.json" in err


def test_real_coco_karpathy_test_list_with_a_caption_file(tmp_path):
    image_list = SHARED_DATA / "coco" / "karpathy_test_images.txt"
    if not image_list.is_file():
        pytest.skip(f"real Karpathy image list not available at {image_list}")
    shutil.copy(image_list, tmp_path / image_list.name)
    lines = image_list.read_text().splitlines()
    ids = [int(line.split()[1]) for line in lines]
    write_coco_captions(tmp_path / "annotations" / "captions_val2014.json",
                        {image: [f"image {image} caption {k}" for k in range(6)] for image in reversed(ids)})
    coco = read_captions("coco", tmp_path)
    assert coco.splits == ("test",) and coco.item_ids[:2] == ["253964", "350334"] and len(coco.item_ids) == 5000
    assert coco.counts()["captions"] == {"train": 0, "val": 0, "test": 25000}
    assert coco.captions_by_item("test")["253964"] == [f"image 253964 caption {k}" for k in range(5)]
    assert any(VAL_NOTICE in note for note in coco.notes)


def write_flickr_lists(folder: Path, splits: dict[str, list[str]]) -> None:
    (folder / "image_splits").mkdir(parents=True, exist_ok=True)
    for prefix, images in splits.items():
        (folder / f"image_splits/{prefix}_images.txt").write_text("".join(f"{image}\n" for image in images))


def test_flickr30k_image_lists_with_the_release_token_file(tmp_path):
    write_flickr_lists(tmp_path, {"train": ["1.jpg", "2.jpg"], "val": ["3.jpg"], "test_2016": ["4.jpg"]})
    token = "".join(f"{image}#{k}\tdog &amp; cat {image} {k} \n" for image in ("4.jpg", "2.jpg", "1.jpg", "3.jpg")
                    for k in range(5))
    (tmp_path / "results_20130124.token").write_text(token + "9.jpg#0\tnot listed\n")
    flickr = read_captions("flickr30k", tmp_path)
    assert flickr.item_ids == ["1.jpg", "2.jpg", "3.jpg", "4.jpg"]
    assert flickr.captions_by_item("train")["2.jpg"] == [f"dog & cat 2.jpg {k}" for k in range(5)]
    assert flickr.counts()["captions"] == {"train": 10, "val": 5, "test": 5}
    (tmp_path / "results_20130124.token").write_text("1.jpg caption without a tab\n")
    with pytest.raises(CorpusError, match=r"results_20130124.token: line 1 is not '<file>#<k><TAB><caption>'"):
        read_captions("flickr30k", tmp_path)


def test_flickr30k_reads_the_splits_that_have_a_list(tmp_path):
    write_flickr_lists(tmp_path, {"train": ["1.jpg", "2.jpg"], "test_2016": ["4.jpg"]})
    (tmp_path / "raw").mkdir()
    for prefix, images in (("train", ["1.jpg", "2.jpg"]), ("test_2016", ["4.jpg"])):
        for k in range(1, 6):
            (tmp_path / f"raw/{prefix}.{k}.en").write_text("".join(f"{image} caption {k}\n" for image in images))
    flickr = read_captions("flickr30k", tmp_path)
    assert flickr.splits == ("train", "test") and flickr.counts()["captions"] == {"train": 10, "val": 0, "test": 5}
    assert any("image_splits/val_images.txt not found" in note and VAL_NOTICE in note for note in flickr.notes)
    with pytest.raises(CorpusError, match=r"image_splits/val_images.txt not found, but split 'val' was asked"):
        read_captions("flickr30k", tmp_path, splits=("val",))


def test_real_multi30k_test_list_with_a_token_file(tmp_path):
    image_list = SHARED_DATA / "flickr30k" / "multi30k_task2" / "image_splits" / "test_2016_images.txt"
    if not image_list.is_file():
        pytest.skip(f"real Multi30K image list not available at {image_list}")
    write_flickr_lists(tmp_path, {})
    shutil.copy(image_list, tmp_path / "image_splits" / image_list.name)
    images = image_list.read_text().split()
    (tmp_path / "results_20130124.token").write_text(
        "".join(f"{image}#{k}\tcaption {k} of {image}\n" for image in images for k in range(5)))
    flickr = read_captions("flickr30k", tmp_path)
    assert flickr.splits == ("test",) and flickr.item_ids == images and len(images) == 1000
    assert flickr.captions_by_item("test")[images[0]] == [f"caption {k} of {images[0]}" for k in range(5)]
