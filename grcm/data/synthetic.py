"""A seeded synthetic cross-modal corpus: the embedded default for the demo and the tests.

Nothing is downloaded. How it is built (also in docs/data.md, "The synthetic corpus"):

1. **Concepts with a hierarchy.** Six attribute slots (subject, colour, action,
   scene, time, camera style). Each slot's values are grouped into categories
   (e.g. subject -> animal/person/vehicle -> dog, horse, ...). A value's latent
   vector is its category vector plus a smaller value-specific offset, so
   K-Means and residual quantisation find real coarse/fine structure.
2. **Items.** Each item draws one value per slot. Its latent is the weighted sum
   of its values' vectors plus item-specific noise. A fraction of items are
   *near-duplicates*: they copy another item's attributes and differ only by
   noise, so semantic-ID collisions and truly ambiguous queries occur.
3. **Features.** A fixed random two-layer "modality encoder" (tanh MLP) maps the
   latent to a ``feature_dim`` vector; sensor noise is added and rows are
   L2-normalised. Features are float32, row ``i`` belongs to item ``i``.
4. **Aspects and captions.** Each item has 2-4 salient *aspects* (subject,
   action, scene, style). Every caption describes one or two of them with
   synonyms and sentence templates, so several items fit most captions and no
   single ID captures every way an item is described. Captions are split per
   item into train/val/test.
5. **Token features (optional, ``token_features=True``).** Each item also gets
   multi-token features, like the frames of a video: one token per aspect
   (subject with its colour, action, scene with its time of day, camera style),
   each the modality encoder applied to that aspect's latent plus item noise, and
   0..``noise_tokens`` *background* tokens (the encoder applied to a random
   latent: frames that show nothing a caption mentions), in a random order and
   padded to ``T = 4 + noise_tokens``. Every token is L2-normalised. The pooled
   feature of an item is then the L2-normalised **mean of its valid tokens**, so a
   model that reads only pooled features sees the same tokens, averaged. Captions
   and attributes are the same as without tokens; the token draws use their own
   seeded stream, and with ``token_features=False`` (the default) the corpus is
   unchanged.

The generator scales from 1k to 1M items: features are produced in chunks and
:func:`generate_synthetic_features` skips captions entirely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grcm.data.corpus import Corpus
from grcm.data.synthetic_vocabulary import (  # noqa: F401 (re-exported: grcm.data.synthetic.VOCABULARY etc.)
    ASPECT_TOKEN_SLOTS,
    ASPECTS,
    SLOT_TABLES,
    SLOT_WEIGHTS,
    SLOTS,
    VOCABULARY,
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator; the defaults make the corpus the demo and tests use.

    Attributes:
        num_items: corpus size (1k to 1M).
        feature_dim: dimension D of the item features.
        latent_dim: dimension of the concept space before the modality encoder.
        category_scale / value_scale: norm of category vs value-specific latent parts (hierarchy).
        item_noise: item-specific latent noise (items are not pure attribute combinations).
        sensor_noise: noise added after the modality encoder.
        near_duplicate_fraction: share of items copying another item's attributes.
        captions_per_item: train captions per item; one val and one test caption are added.
        token_features: also produce ``(N, T, D)`` token features (one per aspect plus background
            tokens); the pooled features become the mean of the valid tokens (module docstring, step 5).
        noise_tokens: most background tokens per item (each item draws 0..noise_tokens);
            ``T = len(ASPECTS) + noise_tokens``.
        seed: everything is a function of this seed.
    """

    num_items: int = 2000
    feature_dim: int = 256
    latent_dim: int = 64
    category_scale: float = 1.0
    value_scale: float = 0.7
    item_noise: float = 0.35
    sensor_noise: float = 0.05
    near_duplicate_fraction: float = 0.05
    captions_per_item: int = 5
    token_features: bool = False
    noise_tokens: int = 4
    seed: int = 0


def _concept_vectors(config: SyntheticConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per slot, ``(V, latent_dim)`` value vectors = weight * (category vector + value offset)."""
    vectors = {}
    for slot in SLOTS:
        table = SLOT_TABLES[slot]
        unit = 1.0 / np.sqrt(config.latent_dim)
        category = rng.standard_normal((table.num_categories, config.latent_dim)) * unit * config.category_scale
        offset = rng.standard_normal((len(table.names), config.latent_dim)) * unit * config.value_scale
        vectors[slot] = SLOT_WEIGHTS[slot] * (category[table.category_of] + offset)
    return vectors


def _sample_attributes(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """``(N, num_slots)`` value index per slot; near-duplicates copy an earlier item's row."""
    n = config.num_items
    attributes = np.stack([rng.integers(0, len(SLOT_TABLES[s].names), size=n) for s in SLOTS], axis=1)
    num_dups = int(round(config.near_duplicate_fraction * n))
    if num_dups and n > 1:
        copies = rng.choice(np.arange(1, n), size=num_dups, replace=False)
        attributes[copies] = attributes[rng.integers(0, copies)]
    return attributes


class _ModalityEncoder:
    """A fixed random tanh MLP ``(M, latent_dim) -> (M, feature_dim)`` standing in for a frozen encoder.

    It computes in float64 and returns float32: a float32 matrix product's summation order depends on the
    BLAS kernel and its thread count (the corpus differed between 1 and 2 threads on an AMD EPYC), while
    float64 differences stay far below float32 rounding, so the corpus is the same on every machine.
    """

    def __init__(self, latent_dim: int, feature_dim: int, rng: np.random.Generator, hidden: int = 512):
        self.w1 = rng.standard_normal((latent_dim, hidden)) * np.sqrt(2.0 / latent_dim)
        self.w2 = rng.standard_normal((hidden, feature_dim)) / np.sqrt(hidden)

    def __call__(self, latent: np.ndarray) -> np.ndarray:
        return (np.tanh(latent.astype(np.float64) @ self.w1) @ self.w2).astype(np.float32)


def _features(config: SyntheticConfig, attributes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(N, D)`` L2-normalised float32 features, computed in chunks so 1M items fit in memory."""
    vectors = _concept_vectors(config, rng)
    encoder = _ModalityEncoder(config.latent_dim, config.feature_dim, rng)
    out = np.empty((config.num_items, config.feature_dim), dtype=np.float32)
    chunk = 65536
    for start in range(0, config.num_items, chunk):
        rows = attributes[start : start + chunk]
        latent = sum(vectors[slot][rows[:, j]] for j, slot in enumerate(SLOTS))
        latent = latent + rng.standard_normal(latent.shape) * config.item_noise / np.sqrt(config.latent_dim)
        feats = encoder(latent.astype(np.float32))
        feats += rng.standard_normal(feats.shape).astype(np.float32) * config.sensor_noise * feats.std()
        out[start : start + chunk] = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    return out


def _token_chunks(config: SyntheticConfig, attributes: np.ndarray, rng: np.random.Generator, chunk: int = 16384):
    """Yield ``(start, tokens (n, T, D) float32, lengths (n,) int64)`` chunk by chunk (module docstring, step 5).

    The concept vectors and the modality encoder are drawn from ``rng`` exactly as in
    :func:`_features`; token noise, background latents, counts and order come from a separate
    stream seeded by ``[seed, 2]``.
    """
    if config.noise_tokens < 0:
        raise ValueError(f"noise_tokens must be >= 0, got {config.noise_tokens}")
    vectors = _concept_vectors(config, rng)
    encoder = _ModalityEncoder(config.latent_dim, config.feature_dim, rng)
    token_rng = np.random.default_rng([config.seed, 2])
    num_aspects, unit = len(ASPECTS), 1.0 / np.sqrt(config.latent_dim)
    width = num_aspects + config.noise_tokens
    for start in range(0, config.num_items, chunk):
        rows = attributes[start : start + chunk]
        n = len(rows)
        latent = np.empty((n, width, config.latent_dim))
        for a, aspect in enumerate(ASPECTS):
            latent[:, a] = sum(vectors[slot][rows[:, SLOTS.index(slot)]] for slot in ASPECT_TOKEN_SLOTS[aspect])
        latent[:, :num_aspects] += token_rng.standard_normal((n, num_aspects, config.latent_dim)) * config.item_noise * unit
        latent[:, num_aspects:] = token_rng.standard_normal((n, config.noise_tokens, config.latent_dim)) * unit
        lengths = num_aspects + token_rng.integers(0, config.noise_tokens + 1, size=n)
        feats = encoder(latent.reshape(n * width, -1).astype(np.float32))
        feats += token_rng.standard_normal(feats.shape).astype(np.float32) * config.sensor_noise * feats.std()
        feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).reshape(n, width, -1)
        valid = np.arange(width)[None, :] < lengths[:, None]  # (n, T)
        order = np.argsort(np.where(valid, token_rng.random((n, width)), 2.0), axis=1)  # shuffle the valid ones
        tokens = np.take_along_axis(feats, order[:, :, None], axis=1)
        tokens[~valid] = 0.0
        yield start, tokens.astype(np.float32), lengths.astype(np.int64)


def _pooled(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """L2-normalised mean of the valid tokens: ``(n, T, D)``, ``(n,)`` -> ``(n, D)`` float32 (padding is zero)."""
    mean = tokens.sum(axis=1) / lengths[:, None]
    return (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)


def generate_synthetic_features(num_items: int, feature_dim: int = 256, seed: int = 0, **overrides) -> np.ndarray:
    """Item features ``(N, D)`` float32 of the synthetic corpus, without captions (for 1M-item benchmarks).

    Row ``i`` equals ``generate_synthetic_corpus(...).features[i]`` for the same arguments.
    """
    config = SyntheticConfig(num_items=num_items, feature_dim=feature_dim, seed=seed, **overrides)
    rng = np.random.default_rng(config.seed)
    attributes = _sample_attributes(config, rng)
    if not config.token_features:
        return _features(config, attributes, rng)
    out = np.empty((config.num_items, config.feature_dim), dtype=np.float32)
    for start, tokens, lengths in _token_chunks(config, attributes, rng):
        out[start : start + len(tokens)] = _pooled(tokens, lengths)
    return out


_OPENERS = ("", "", "a video of ", "footage showing ", "we see ", "a clip where ")
# probability of describing 1, 2 or 3 of an item's salient aspects in one caption
_ASPECTS_PER_CAPTION = (0.15, 0.55, 0.30)


def _phrase(slot: str, value: int, rng: np.random.Generator) -> str:
    words = SLOT_TABLES[slot].synonyms[value]
    return words[rng.integers(0, len(words))]


def _caption(attributes: np.ndarray, aspects: list[str], rng: np.random.Generator) -> str:
    """One caption composed from 1-3 of the item's salient ``aspects``, with synonyms.

    Subject phrases may carry the colour, scene phrases the time of day, and a
    camera style becomes a prefix ("slow motion clip of ...") or a suffix.
    """
    max_k = min(len(aspects), 3)
    probs = np.asarray(_ASPECTS_PER_CAPTION[:max_k])
    k = 1 + int(rng.choice(max_k, p=probs / probs.sum()))
    chosen = {aspects[i] for i in rng.choice(len(aspects), size=k, replace=False)}
    value = dict(zip(SLOTS, attributes))
    words: list[str] = []
    if "subject" in chosen:
        colour = f"{_phrase('colour', value['colour'], rng)} " if rng.random() < 0.6 else ""
        words.append(f"a {colour}{_phrase('subject', value['subject'], rng)}")
    elif "action" in chosen:
        words.append(("someone", "something", "a figure")[rng.integers(0, 3)])
    if "action" in chosen:
        words.append(("is " if rng.random() < 0.5 else "") + _phrase("action", value["action"], rng))
    if "scene" in chosen:
        if not words:
            words.append(("a view", "a scene", "a place")[rng.integers(0, 3)])
        words.append(_phrase("scene", value["scene"], rng))
        if rng.random() < 0.5:
            words.append(_phrase("time", value["time"], rng))
    if "style" in chosen:
        style = _phrase("style", value["style"], rng)
        if not words:
            words.append(f"a {style}")
        elif rng.random() < 0.5:
            words.insert(0, f"{style} of")
        else:
            words[-1] += ","
            words.append(style)
    else:
        words.insert(0, _OPENERS[rng.integers(0, len(_OPENERS))].strip())
    return " ".join(" ".join(words).split())


def generate_synthetic_corpus(
    num_items: int = 2000, feature_dim: int = 256, seed: int = 0, **overrides
) -> Corpus:
    """Build the synthetic corpus (see the module docstring for how).

    Args:
        num_items: number of items N (1k to 1M).
        feature_dim: feature dimension D.
        seed: the whole corpus is a deterministic function of the arguments.
        **overrides: any other :class:`SyntheticConfig` field.

    Returns:
        A validated :class:`Corpus` with ``N`` items, ``(N, D)`` float32 features and, per item,
        ``captions_per_item`` train captions plus one val and one test caption; with
        ``token_features=True`` also ``(N, T, D)`` token features and their ``(N,)`` lengths.
    """
    config = SyntheticConfig(num_items=num_items, feature_dim=feature_dim, seed=seed, **overrides)
    rng = np.random.default_rng(config.seed)
    attributes = _sample_attributes(config, rng)
    token_features = token_lengths = None
    if config.token_features:
        chunks = list(_token_chunks(config, attributes, rng))
        token_features = np.concatenate([tokens for _, tokens, _ in chunks])
        token_lengths = np.concatenate([lengths for _, _, lengths in chunks])
        features = _pooled(token_features, token_lengths)
    else:
        features = _features(config, attributes, rng)
    caption_rng = np.random.default_rng([config.seed, 1])
    per_item = config.captions_per_item + 2
    splits = np.array(["train"] * config.captions_per_item + ["val", "test"])
    texts: list[str] = []
    for i in range(config.num_items):
        num_aspects = int(caption_rng.integers(2, len(ASPECTS) + 1))
        aspects = [ASPECTS[j] for j in sorted(caption_rng.choice(len(ASPECTS), size=num_aspects, replace=False))]
        texts.extend(_caption(attributes[i], aspects, caption_rng) for _ in range(per_item))
    width = len(str(max(config.num_items - 1, 0)))
    corpus = Corpus(
        name="synthetic",
        modality="video",
        item_ids=[f"item{i:0{width}d}" for i in range(config.num_items)],
        features=features,
        caption_item=np.repeat(np.arange(config.num_items, dtype=np.int64), per_item),
        caption_text=texts,
        caption_split=np.tile(splits, config.num_items),
        token_features=token_features,
        token_lengths=token_lengths,
    )
    return corpus.validate(source="synthetic")


def describe_item(num_items: int, item: int, seed: int = 0, **overrides) -> dict[str, str]:
    """The canonical attribute values of one synthetic item (for docs and debugging)."""
    config = SyntheticConfig(num_items=num_items, seed=seed, **overrides)
    attributes = _sample_attributes(config, np.random.default_rng(config.seed))[item]
    return {slot: SLOT_TABLES[slot].names[v] for slot, v in zip(SLOTS, attributes)}
