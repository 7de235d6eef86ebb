"""The synthetic corpus's vocabulary: attribute slots, their categories and values, and caption synonyms.

:data:`VOCABULARY` maps slot -> category -> value -> synonyms (the first synonym is the canonical
name). :data:`SLOT_TABLES` flattens each slot into value indices with their category
(``category_of`` ``(V,)``), which is how :mod:`grcm.data.synthetic` draws attributes and builds the
hierarchical concept vectors; :data:`SLOT_WEIGHTS` says how strongly each slot shapes an item's
features, :data:`ASPECTS` which slots a caption or a token can describe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# slot -> category -> value -> synonyms (first is canonical)
VOCABULARY: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "subject": {
        "animal": {
            "dog": ("dog", "puppy", "hound"),
            "cat": ("cat", "kitten", "house cat"),
            "horse": ("horse", "pony", "stallion"),
            "bird": ("bird", "parrot", "small bird"),
            "cow": ("cow", "calf", "cattle"),
            "bear": ("bear", "grizzly", "brown bear"),
        },
        "person": {
            "man": ("man", "guy", "gentleman"),
            "woman": ("woman", "lady", "young woman"),
            "child": ("child", "kid", "little kid"),
            "girl": ("girl", "young girl", "teenage girl"),
            "boy": ("boy", "young boy", "teenage boy"),
            "athlete": ("athlete", "sportsman", "player"),
        },
        "vehicle": {
            "car": ("car", "sedan", "automobile"),
            "truck": ("truck", "lorry", "pickup truck"),
            "bicycle": ("bicycle", "bike", "cycle"),
            "motorcycle": ("motorcycle", "motorbike", "scooter"),
            "boat": ("boat", "small boat", "sailboat"),
            "train": ("train", "locomotive", "railway train"),
        },
    },
    "colour": {
        "warm": {
            "red": ("red", "crimson", "scarlet"),
            "orange": ("orange", "amber", "tangerine"),
            "yellow": ("yellow", "golden", "mustard"),
        },
        "cool": {
            "blue": ("blue", "navy", "azure"),
            "green": ("green", "emerald", "olive"),
            "purple": ("purple", "violet", "lilac"),
        },
        "neutral": {
            "black": ("black", "dark", "jet black"),
            "white": ("white", "pale", "snow white"),
            "brown": ("brown", "chocolate", "tan"),
            "gray": ("gray", "grey", "silver"),
        },
    },
    "action": {
        "motion": {
            "running": ("running", "sprinting", "jogging"),
            "jumping": ("jumping", "leaping", "hopping"),
            "swimming": ("swimming", "paddling", "wading"),
            "climbing": ("climbing", "scrambling up", "ascending"),
            "racing": ("racing", "speeding", "rushing"),
        },
        "social": {
            "playing": ("playing", "having fun", "messing around"),
            "dancing": ("dancing", "twirling", "grooving"),
            "eating": ("eating", "feeding", "munching"),
            "fighting": ("fighting", "wrestling", "scuffling"),
        },
        "rest": {
            "sitting": ("sitting", "resting", "lounging"),
            "sleeping": ("sleeping", "napping", "dozing"),
            "standing": ("standing", "waiting", "standing still"),
            "watching": ("watching", "looking around", "staring"),
        },
    },
    "scene": {
        "nature": {
            "beach": ("on a beach", "by the sea", "on the sand"),
            "forest": ("in a forest", "among trees", "in the woods"),
            "mountain": ("on a mountain", "on a hillside", "up a mountain"),
            "field": ("in a field", "on a meadow", "on the grass"),
            "river": ("by a river", "near a stream", "at a riverbank"),
            "snow": ("in the snow", "on a snowy slope", "in deep snow"),
        },
        "urban": {
            "street": ("on a street", "on a busy road", "in traffic"),
            "park": ("in a park", "in a city park", "in a playground"),
            "market": ("at a market", "at a bazaar", "among market stalls"),
            "bridge": ("on a bridge", "under a bridge", "crossing a bridge"),
            "station": ("at a station", "on a platform", "at a train station"),
        },
        "indoor": {
            "kitchen": ("in a kitchen", "at the stove", "in a small kitchen"),
            "living room": ("in a living room", "on a sofa", "in a lounge"),
            "gym": ("in a gym", "at the gym", "in a fitness studio"),
            "stage": ("on a stage", "at a concert", "under stage lights"),
            "office": ("in an office", "at a desk", "in a workplace"),
        },
    },
    "time": {
        "light": {
            "morning": ("in the morning", "at dawn", "early in the day"),
            "noon": ("at noon", "in bright daylight", "on a sunny day"),
        },
        "dark": {
            "sunset": ("at sunset", "at dusk", "in the evening light"),
            "night": ("at night", "in the dark", "late at night"),
        },
        "weather": {
            "rain": ("in the rain", "on a rainy day", "during a storm"),
            "fog": ("in the fog", "on a misty day", "in thick fog"),
        },
    },
    "style": {
        "camera": {
            "close-up": ("close-up shot", "close up view", "tight close-up"),
            "aerial": ("aerial footage", "drone shot", "view from above"),
            "handheld": ("shaky handheld footage", "handheld camera", "amateur video"),
        },
        "edit": {
            "slow motion": ("slow motion clip", "slowed down footage", "slow-mo video"),
            "time-lapse": ("time-lapse", "sped up footage", "fast-forward clip"),
            "black and white": ("black and white film", "monochrome footage", "grayscale clip"),
        },
    },
}
SLOTS: tuple[str, ...] = tuple(VOCABULARY)
# How strongly each slot shapes the item's features (subject and scene dominate what a sensor sees).
SLOT_WEIGHTS: dict[str, float] = {
    "subject": 1.0,
    "colour": 0.55,
    "action": 0.8,
    "scene": 0.9,
    "time": 0.45,
    "style": 0.35,
}
ASPECTS: tuple[str, ...] = ("subject", "action", "scene", "style")
# The slots shown by each aspect's token (captions attach the colour to the subject, the time to the scene).
ASPECT_TOKEN_SLOTS: dict[str, tuple[str, ...]] = {
    "subject": ("subject", "colour"),
    "action": ("action",),
    "scene": ("scene", "time"),
    "style": ("style",),
}


@dataclass(frozen=True)
class _SlotTable:
    """Flattened values of one slot: ``names[v]`` belongs to category ``category_of[v]``."""

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    category_of: np.ndarray  # (V,)
    num_categories: int


def _slot_tables() -> dict[str, _SlotTable]:
    tables = {}
    for slot, categories in VOCABULARY.items():
        names, synonyms, category_of = [], [], []
        for c, values in enumerate(categories.values()):
            for name, words in values.items():
                names.append(name)
                synonyms.append(words)
                category_of.append(c)
        tables[slot] = _SlotTable(tuple(names), tuple(synonyms), np.asarray(category_of), len(categories))
    return tables


SLOT_TABLES = _slot_tables()
