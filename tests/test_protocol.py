"""Protocol checks: which evaluation items have training queries, and what set-up says about it."""

from types import SimpleNamespace

import numpy as np
import pytest

from grcm.data import CorpusDataModule, CorpusError, save_corpus
from grcm.data.corpus import Corpus
from grcm.data.protocol import QueryCoverage


def _corpus(train_items, test_items, num_items=6) -> Corpus:
    rows = [(i, f"train caption {n} of item {i}", "train") for n, i in enumerate(train_items)]
    rows += [(i, f"test caption {n} of item {i}", "test") for n, i in enumerate(test_items)]
    rows += [(i, f"val caption of item {i}", "val") for i in sorted(set(test_items))]
    return _toy_corpus(rows, num_items)


def _toy_corpus(rows, num_items: int) -> Corpus:
    """A corpus of ``num_items`` items with random 8-d features and ``(item, text, split)`` caption rows."""
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


def _split_corpus(rows, num_items=6) -> Corpus:
    """A toy corpus from ``(item, split)`` rows; caption text names the row."""
    return _toy_corpus([(item, f"{split} caption {n} of item {item}", split) for n, (item, split) in enumerate(rows)],
                       num_items)


class _Retriever:
    """Stands for a generative retriever: the SID-retrieval interface ``needs_training_queries`` looks for."""

    def trie_sources(self):
        return ()

    def index_table(self):
        return None


def _attach(dm, module, limit_val_batches=1.0):
    dm.trainer = SimpleNamespace(lightning_module=module, limit_val_batches=limit_val_batches, global_rank=0)
    return dm


def test_transductive_holdout_covers_the_validation_split_too(tmp_path):
    rows = [(0, "train"), (1, "train")] + [(2, "val")] * 3 + [(3, "val")] * 2 + [(4, "test")] * 3
    save_corpus(_split_corpus(rows), tmp_path / "c")
    dm = CorpusDataModule(str(tmp_path / "c"), uncovered_items="error", transductive_holdout=1)
    dm.setup("fit")  # no error: the val items 2, 3 and the test item 4 now have training queries
    assert dm.coverage.setting("val") == dm.coverage.setting("test") == "transductive"
    val_rows = dm.corpus.captions_of_split("val")
    assert sorted(dm.corpus.caption_item[val_rows].tolist()) == [2, 3], "k = 1 val caption per val item"
    train_text = {dm.corpus.caption_text[i] for i in dm.corpus.captions_of_split("train")}
    assert len(train_text) == 2 + 3 + 2 and not train_text & {dm.corpus.caption_text[i] for i in val_rows}


def test_fix_text_does_not_repeat_an_option_already_set(tmp_path):
    rows = [(0, "train"), (1, "train"), (2, "val"), (3, "test"), (3, "test")]
    save_corpus(_split_corpus(rows), tmp_path / "c")
    with pytest.raises(CorpusError) as error:
        CorpusDataModule(str(tmp_path / "c"), uncovered_items="error", transductive_holdout=1).setup("fit")
    message = str(error.value)
    assert "1 of 1 val items" in message and "transductive_holdout=1 is set" in message
    assert "transductive_holdout=<k>" not in message and "val_from_train" in message


def test_generative_fit_refuses_a_val_split_without_training_queries(tmp_path):
    rows = [(0, "train"), (0, "train"), (1, "train"), (2, "val"), (3, "val"), (0, "test")]
    save_corpus(_split_corpus(rows), tmp_path / "c")
    dm = _attach(CorpusDataModule(str(tmp_path / "c"), uncovered_items="ignore"), _Retriever())
    with pytest.raises(CorpusError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert "\n" not in message and "none of the 2 val items" in message and "best.ckpt" in message
    assert "transductive_holdout" in message and "val_from_train" in message and "limit_val_batches=0" in message
    # a dense model, evaluation stages and a fit without validation are not refused
    _attach(CorpusDataModule(str(tmp_path / "c"), uncovered_items="ignore"), object()).setup("fit")
    _attach(CorpusDataModule(str(tmp_path / "c"), uncovered_items="ignore"), _Retriever()).setup("test")
    _attach(CorpusDataModule(str(tmp_path / "c"), uncovered_items="ignore"), _Retriever(), 0).setup("fit")
    # held-out training captions are a val split the retriever can answer
    covered = _attach(CorpusDataModule(str(tmp_path / "c"), uncovered_items="ignore", val_from_train=1),
                      _Retriever())
    covered.setup("fit")
    assert covered.coverage.setting("val") == "transductive"


def test_corpus_without_val_split_validates_on_held_out_training_captions(tmp_path, capsys):
    # 40 items with 3 training captions, 40 with one; 5% of the 80 training items = 4 val queries
    rows = [(i, "train") for i in range(40) for _ in range(3)] + [(i, "train") for i in range(40, 80)]
    rows += [(i, "test") for i in range(80)]
    save_corpus(_split_corpus(rows, num_items=80), tmp_path / "c")
    dm = CorpusDataModule(str(tmp_path / "c"), uncovered_items="ignore", split_seed=3)
    dm.setup("fit")
    notice = capsys.readouterr().err
    assert notice.startswith("grcm: notice: ") and notice.count("\n") == 1
    assert "no val captions" in notice and "val_from_train=0.05" in notice and "limit_val_batches=0" in notice
    val = dm.corpus.captions_of_split("val")
    items = dm.corpus.caption_item[val]
    assert len(val) == 4 and len(set(items.tolist())) == 4 and (items < 40).all(), "multi-caption items first"
    assert dm.coverage.setting("val") == "transductive", "every val item keeps training captions"
    train = dm.corpus.captions_of_split("train")
    assert len(train) == 160 - 4 and not set(val.tolist()) & set(train.tolist())
    assert len(dm.val_dataloader().dataset) == 4
    again = CorpusDataModule(str(tmp_path / "c"), uncovered_items="ignore", split_seed=3)
    again.setup("fit")
    assert np.array_equal(again.corpus.captions_of_split("val"), val), "the draw is seeded by split_seed"
    skipped = _attach(CorpusDataModule(str(tmp_path / "c"), uncovered_items="ignore"), object(), 0)
    skipped.setup("fit")
    assert len(skipped.corpus.captions_of_split("train")) == 160, "no validation: nothing held out"


def test_val_from_train_counts_replace_the_val_split(tmp_path, capsys):
    rows = [(i, "train") for i in range(4)] + [(i, "train") for i in range(4)] + [(5, "val"), (4, "test")]
    save_corpus(_split_corpus(rows), tmp_path / "c")
    dm = CorpusDataModule(str(tmp_path / "c"), uncovered_items="ignore", val_from_train=3)
    dm.setup("fit")
    assert "its 1 val captions are set aside" in capsys.readouterr().err
    val_items = dm.corpus.caption_item[dm.corpus.captions_of_split("val")]
    assert len(val_items) == 3 and 5 not in val_items.tolist()
    assert "val caption" not in " ".join(dm.corpus.caption_text[i] for i in dm.corpus.captions_of_split("train"))
    with pytest.raises(CorpusError, match="only 8 training captions"):
        CorpusDataModule(str(tmp_path / "c"), val_from_train=8).setup("fit")
    with pytest.raises(ValueError, match="val_from_train"):
        CorpusDataModule(str(tmp_path / "c"), val_from_train=0)


def test_missing_corpus_names_grcm_prepare_and_corpus_dir(tmp_path):
    with pytest.raises(CorpusError) as error:
        CorpusDataModule(str(tmp_path / "nowhere"))
    message = str(error.value)
    assert "grcm prepare <dataset>" in message and "data.init_args.corpus_dir" in message
    assert "see grcm/data/corpus.py" not in message
