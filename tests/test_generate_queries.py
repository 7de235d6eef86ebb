"""``grcm generate-queries``: perspective prompts, de-duplication, per-item cap, resume, tiny random BLIP."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from grcm.cli import main
from grcm.data.corpus import Corpus, load_corpus, save_corpus
from grcm.queries.generate import generate_queries


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 24), (90 * i, 20, 120)).save(folder / f"item{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


class FakeCaptioner:
    """Returns near-duplicates (case/punctuation) so de-duplication and the cap can be checked exactly."""

    def __init__(self):
        self.calls = 0

    def __call__(self, batch, prompt):
        self.calls += 1
        return [f"{prompt} thing" if n % 2 else f"{prompt.upper()} thing!" for n in range(len(batch))]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_dedup_cap_report_and_resume(images, tmp_path):
    out = tmp_path / "extra_queries.csv"
    prompts = ["a photo of", "the action is", "The action is.", "the scene is"]
    report = generate_queries(images, out, "fake", prompts=prompts, max_per_item=2, batch_size=1, chunk_size=2,
                              captioner=FakeCaptioner(), progress=False)
    rows = _rows(out)
    assert list(rows[0]) == ["item_id", "text", "source"]
    by_item = {}
    for row in rows:
        by_item.setdefault(row["item_id"], []).append(row["text"])
    assert sorted(by_item) == ["item0", "item1", "item2"]
    for texts in by_item.values():
        assert texts == ["A PHOTO OF thing!", "THE ACTION IS thing!"]  # third prompt duplicates the second; cap 2
    assert report["failed"] == 1 and report["failed_files"][0]["file"].endswith("broken.jpg")
    assert rows[0]["source"] == "fake|a photo of"

    class Refuse:
        def __call__(self, batch, prompt):
            raise AssertionError("finished chunks were captioned again")

    again = generate_queries(images, out, "fake", prompts=prompts, max_per_item=2, batch_size=1, chunk_size=2,
                             captioner=Refuse(), progress=False)
    assert again["queries"] == len(rows)


def test_tiny_random_blip_writes_extra_queries_a_corpus_loads(images, tmp_path):
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "the", "dog", "cat", "red", "runs"]
    model_dir = tmp_path / "blip"
    text = dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=40, encoder_hidden_size=16, bos_token_id=2, sep_token_id=3, pad_token_id=0,
                eos_token_id=3)
    vision = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, projection_dim=12)).save_pretrained(
        model_dir)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})).save_pretrained(model_dir)
    out = tmp_path / "corpus" / "extra_queries.csv"
    main(["generate-queries", str(images), "--model", str(model_dir), "--out", str(out), "--prompt", "a picture of",
          "--prompt", "the dog", "--max-per-item", "3", "--no-progress"])
    rows = _rows(out)
    assert rows and {r["item_id"] for r in rows} <= {"item0", "item1", "item2"}
    assert all(r["source"].startswith("blip|") for r in rows)
    report = json.loads((tmp_path / "corpus" / "extra_queries.csv.report.json").read_text())
    assert report["failed"] == 1

    corpus = Corpus("toy", "image", ["item0", "item1", "item2"], np.eye(3, dtype=np.float32),
                    np.array([0, 1, 2]), ["x", "y", "z"], np.array(["train", "train", "test"]))
    save_corpus(corpus, tmp_path / "corpus")
    loaded = load_corpus(tmp_path / "corpus")  # keeps the generated file beside captions.csv
    assert len(loaded.extra_text) == len(rows)
