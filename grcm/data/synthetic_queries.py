"""Deterministic generated queries for the synthetic corpus (the stand-in for ACE §3.3's generated queries).

A captioning model looks at an item and, prompted for different perspectives, writes extra training
queries. The synthetic corpus knows every item's attributes, so this generator plays that model:
for each item it writes queries from *perspectives* (which attribute slots a query mentions) that
include slots and combinations the item's captions never use (captions describe only 1-3 of the
item's salient aspects, never the colour alone or the time of day with the subject). Wording comes
from the same synonym lists, in query-style templates. Every query is a function of
``(num_items, seed, per_item)`` only; queries equal to any val/test caption of the corpus, or to one
of the item's own train captions, are never emitted.
"""

from __future__ import annotations

import numpy as np

from grcm.data.corpus import Corpus
from grcm.data.synthetic import SLOT_TABLES, SLOTS, SyntheticConfig, _sample_attributes

SOURCE = "synthetic"
# Slots a query mentions, most informative first; the i-th query of an item uses perspective i (mod).
PERSPECTIVES: tuple[tuple[str, ...], ...] = (
    ("subject", "action", "scene"),
    ("colour", "subject", "scene"),
    ("subject", "action", "style"),
    ("colour", "subject", "action"),
    ("action", "scene", "time"),
    ("subject", "scene", "time"),
    ("colour", "subject", "style"),
    ("subject", "action", "scene", "time"),
    ("action", "scene", "style"),
    ("colour", "subject", "action", "scene", "style"),
)
_LEADS = ("", "", "find ", "show me ", "clip of ", "video with ")
_MAX_TRIES = 8


def _word(slot: str, value: int, rng: np.random.Generator) -> str:
    words = SLOT_TABLES[slot].synonyms[value]
    return words[rng.integers(0, len(words))]


def _query(values: dict[str, int], slots: tuple[str, ...], rng: np.random.Generator) -> str:
    """One query mentioning exactly ``slots`` of an item whose slot values are ``values``."""
    words: list[str] = []
    if "subject" in slots:
        colour = f"{_word('colour', values['colour'], rng)} " if "colour" in slots else ""
        words.append(f"a {colour}{_word('subject', values['subject'], rng)}")
    elif "colour" in slots:
        words.append(f"something {_word('colour', values['colour'], rng)}")
    elif "action" in slots:
        words.append(("someone", "something", "a figure")[rng.integers(0, 3)])
    if "action" in slots:
        words.append(_word("action", values["action"], rng))
    if "scene" in slots:
        words.append(_word("scene", values["scene"], rng))
    if "time" in slots:
        words.append(_word("time", values["time"], rng))
    if "style" in slots:
        style = _word("style", values["style"], rng)
        if rng.random() < 0.5:
            words.insert(0, f"{style} of")
        else:
            words.append(f"in {style}")
    else:
        words.insert(0, _LEADS[rng.integers(0, len(_LEADS))].strip())
    return " ".join(" ".join(words).split())


def generate_synthetic_queries(
    corpus: Corpus, per_item: int, seed: int = 0, **overrides
) -> tuple[np.ndarray, list[str]]:
    """Generated training queries for the synthetic corpus built with the same arguments.

    Args:
        corpus: ``generate_synthetic_corpus(num_items, ..., seed, **overrides)`` (its captions are
            excluded from the output; its item count fixes the attributes).
        per_item: queries per item (each from the next perspective of :data:`PERSPECTIVES`).
        seed, **overrides: the corpus's seed and :class:`~grcm.data.synthetic.SyntheticConfig` overrides.

    Returns:
        ``item_index`` (E,) int64 and ``texts`` (E strings), E <= ``per_item * num_items`` (a query
        that cannot be made distinct within a few tries is dropped).
    """
    if per_item < 0:
        raise ValueError(f"per_item must be >= 0, got {per_item}.")
    config = SyntheticConfig(num_items=corpus.num_items, feature_dim=corpus.feature_dim, seed=seed, **overrides)
    attributes = _sample_attributes(config, np.random.default_rng(config.seed))
    held_out = {corpus.caption_text[i] for i in np.flatnonzero(corpus.caption_split != "train")}
    own: dict[int, set[str]] = {}
    for i in np.flatnonzero(corpus.caption_split == "train"):
        own.setdefault(int(corpus.caption_item[i]), set()).add(corpus.caption_text[i])
    rng = np.random.default_rng([config.seed, 2])
    items: list[int] = []
    texts: list[str] = []
    for item in range(corpus.num_items):
        values = dict(zip(SLOTS, attributes[item].tolist()))
        seen = set(own.get(item, ()))
        for q in range(per_item):
            slots = PERSPECTIVES[q % len(PERSPECTIVES)]
            for _ in range(_MAX_TRIES):
                text = _query(values, slots, rng)
                if text not in held_out and text not in seen:
                    seen.add(text)
                    items.append(item)
                    texts.append(text)
                    break
    return np.asarray(items, dtype=np.int64), texts
