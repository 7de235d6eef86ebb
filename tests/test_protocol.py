"""Protocol checks: which evaluation items have training queries, and what set-up says about it."""

import numpy as np
import pytest

from grcm.data import CorpusDataModule, CorpusError, save_corpus
from grcm.data.corpus import Corpus
from grcm.data.protocol import QueryCoverage


def _corpus(train_items, test_items, num_items=6) -> Corpus:
    rows = [(i, f"train caption {n} of item {i}", "train") for n, i in enumerate(train_items)]
    rows += [(i, f"test caption {n} of item {i}", "test") for n, i in enumerate(test_items)]
    rows += [(i, f"val caption of item {i}", "val") for i in sorted(set(test_items))]
    rng = np.random.default_rng(0)
    return Corpus(
        name="toy",
        modality="image",
        item_ids=[f"item{i}" for i in range(num_items)],
        features=rng.normal(size=(num_items, 8)).astype(np.float32),
        caption_item=np.array([r[0] for r in rows]),
        caption_text=[r[1] for r in rows],
        caption_split=np.array([r[2] for r in rows]),
    )


def test_coverage_counts_items_and_queries_independently():
    corpus = _corpus(train_items=[0, 1, 2, 2], test_items=[2, 3, 3, 4])
    coverage = QueryCoverage.of(corpus, corpus.caption_item[corpus.caption_split == "train"])
    assert coverage.uncovered("test").tolist() == [3, 4]
    assert coverage.setting("test") == "mixed"
    assert coverage.eval_query_share["test"] == pytest.approx(1 / 4)  # only the query of item 2
    assert _coverage_setting(_corpus([0, 1], [0, 1])) == "transductive"
    assert _coverage_setting(_corpus([0, 1], [2, 3])) == "inductive"


def _coverage_setting(corpus):
    return QueryCoverage.of(corpus, corpus.caption_item[corpus.caption_split == "train"]).setting("test")


def test_inductive_corpus_warns_or_fails_at_setup_with_the_fix(tmp_path):
    save_corpus(_corpus(train_items=[0, 1], test_items=[2, 3]), tmp_path / "c")
    with pytest.warns(UserWarning, match="no training queries.*generate-queries"):
        CorpusDataModule(str(tmp_path / "c")).setup("fit")
    with pytest.raises(CorpusError, match="2 of 2 test items.*transductive_holdout"):
        CorpusDataModule(str(tmp_path / "c"), uncovered_items="error").setup("fit")
    quiet = CorpusDataModule(str(tmp_path / "c"), uncovered_items="ignore")
    quiet.setup("fit")
    assert quiet.coverage.setting("test") == "inductive"


def test_transductive_holdout_moves_extra_test_captions_into_training(tmp_path):
    save_corpus(_corpus(train_items=[0, 1], test_items=[2, 2, 2, 3, 3]), tmp_path / "c")
    dm = CorpusDataModule(str(tmp_path / "c"), uncovered_items="error", transductive_holdout=1)
    dm.setup("fit")  # no error: items 2 and 3 now have training queries
    assert dm.coverage.setting("test") == "transductive"
    test_rows = dm.corpus.captions_of_split("test")
    assert sorted(dm.corpus.caption_item[test_rows].tolist()) == [2, 3]
    train_text = {dm.corpus.caption_text[i] for i in dm.corpus.captions_of_split("train")}
    assert not train_text & {dm.corpus.caption_text[i] for i in test_rows}
