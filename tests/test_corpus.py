"""Corpus schema: on-disk round trip and errors that name the file, the item id and the fix."""

from __future__ import annotations

import numpy as np
import pytest

from grcm.data.corpus import Corpus, CorpusError, load_corpus, save_corpus


def _tiny_corpus(num_items: int = 4, dim: int = 3) -> Corpus:
    rng = np.random.default_rng(0)
    return Corpus(
        name="tiny",
        modality="image",
        item_ids=[f"img{i}" for i in range(num_items)],
        features=rng.standard_normal((num_items, dim)).astype(np.float32),
        caption_item=np.array([0, 1, 2, 3, 0], dtype=np.int64),
        caption_text=["a cat, sitting", 'a "quoted" dog', "a car", "a tree", "another cat"],
        caption_split=np.array(["train", "train", "val", "test", "test"]),
        extra_item=np.array([1], dtype=np.int64),
        extra_text=["generated query about a dog"],
    )


@pytest.mark.parametrize("feature_format", ["npy", "safetensors"])
def test_round_trip_keeps_everything(tmp_path, feature_format):
    corpus = _tiny_corpus()
    save_corpus(corpus, tmp_path, feature_format=feature_format)
    loaded = load_corpus(tmp_path)
    assert loaded.item_ids == corpus.item_ids
    np.testing.assert_array_equal(np.asarray(loaded.features), corpus.features)
    assert loaded.caption_text == corpus.caption_text
    np.testing.assert_array_equal(loaded.caption_item, corpus.caption_item)
    np.testing.assert_array_equal(loaded.caption_split, corpus.caption_split)
    assert loaded.extra_text == corpus.extra_text and loaded.extra_item.tolist() == [1]
    assert loaded.feature_checksum() == corpus.feature_checksum()


def test_caption_of_item_without_features_names_the_id(tmp_path):
    save_corpus(_tiny_corpus(), tmp_path)
    with open(tmp_path / "captions.csv", "a", encoding="utf-8") as handle:
        handle.write("ghost_item,a caption of nothing,train\n")
    with pytest.raises(CorpusError, match=r"captions\.csv.*'ghost_item'.*no features"):
        load_corpus(tmp_path)


def test_nan_feature_row_names_the_id(tmp_path):
    corpus = _tiny_corpus()
    corpus.features[2, 1] = np.nan
    with pytest.raises(CorpusError, match=r"'img2'.*NaN or inf"):
        save_corpus(corpus, tmp_path)
    # the same check fires on load when the file on disk is bad
    corpus.features[2, 1] = 0.0
    save_corpus(corpus, tmp_path)
    features = np.load(tmp_path / "features.npy")
    features[3, 0] = np.inf
    np.save(tmp_path / "features.npy", features)
    with pytest.raises(CorpusError, match=r"'img3'"):
        load_corpus(tmp_path)


def test_other_schema_errors(tmp_path):
    corpus = _tiny_corpus()
    corpus.item_ids[1] = "img0"
    with pytest.raises(CorpusError, match="'img0' occurs more than once"):
        corpus.validate()
    save_corpus(_tiny_corpus(), tmp_path)
    (tmp_path / "item_ids.txt").write_text("img0\nimg1\n")
    with pytest.raises(CorpusError, match="2 ids but the feature file has 4 rows"):
        load_corpus(tmp_path)
    save_corpus(_tiny_corpus(), tmp_path)
    (tmp_path / "captions.csv").write_text("item_id,text,split\nimg0,hello,training\n")
    with pytest.raises(CorpusError, match="row 2 has split 'training'"):
        load_corpus(tmp_path)
    with pytest.raises(CorpusError, match="corpus.json"):
        load_corpus(tmp_path / "missing")


def test_crlf_captions_are_accepted(tmp_path):
    save_corpus(_tiny_corpus(), tmp_path)
    text = (tmp_path / "captions.csv").read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    (tmp_path / "captions.csv").write_bytes(text)
    assert load_corpus(tmp_path).caption_text[1] == 'a "quoted" dog'
