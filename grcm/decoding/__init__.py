"""Trie-constrained decoding of semantic IDs: a flat-tensor trie and an exact batched beam search."""

from grcm.decoding.beam import (
    BeamConstraint,
    BeamSearchOutput,
    DecodingError,
    RankedItems,
    StepFn,
    TrieConstraint,
    beam_search,
    beams_to_items,
    beams_to_scored_items,
    constrained_beam_search,
    stable_topk,
)
from grcm.decoding.sid_table import sid_table_dtype, sid_table_nbytes
from grcm.decoding.trie import SIDTrie
from grcm.decoding.trie_levels import TrieLevel

__all__ = [
    "BeamConstraint",
    "BeamSearchOutput",
    "DecodingError",
    "RankedItems",
    "SIDTrie",
    "StepFn",
    "TrieConstraint",
    "TrieLevel",
    "beam_search",
    "beams_to_items",
    "beams_to_scored_items",
    "constrained_beam_search",
    "sid_table_dtype",
    "sid_table_nbytes",
    "stable_topk",
]
