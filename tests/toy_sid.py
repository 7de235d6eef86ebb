"""A toy SID bundle shared by the retriever tests: 12 two-level prefixes, the last level numbers items within one.

Not a test module (pytest collects ``test_*.py`` only); test files import it by name, since pytest puts
``tests/`` on ``sys.path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from grcm.data.datamodules import SyntheticDataModule
from grcm.retriever.module import GenerativeRetriever
from grcm.tokenizers.bundle import SIDBundle

#: Level sizes for 50 items: 50 of the 60 code combinations are valid SIDs.
TOY_SID_VOCABS = [4, 3, 5]


def toy_codes(num_items: int) -> torch.Tensor:
    """(N, 3) codes: the first two levels take 12 prefixes, the last one numbers items within a prefix."""
    index = torch.arange(num_items)
    return torch.stack([index % 4, (index // 4) % 3, index // 12], dim=1)


def save_toy_bundle(item_ids: Sequence[str], directory: str | Path, vocab_sizes: Sequence[int] = TOY_SID_VOCABS,
                    feature_dim: int = 16, with_metadata: bool = True) -> str:
    """Save a bundle of :func:`toy_codes` for ``item_ids`` under ``directory``; returns its path.

    ``with_metadata`` adds a coarse codebook ``(4, feature_dim)`` and level names, as a tokenizer writes them.
    """
    extras = dict(codebooks={"coarse": torch.randn(4, feature_dim)}, config={"level_names": ["a", "b", "unique"]},
                  health={}) if with_metadata else {}
    bundle = SIDBundle(item_ids=list(item_ids), codes=toy_codes(len(item_ids)), vocab_sizes=list(vocab_sizes),
                       **extras)
    return str(bundle.save(Path(directory)))


def toy_datamodule(num_items: int = 50, eval_batch_size: int = 64) -> SyntheticDataModule:
    """A set-up synthetic corpus of ``num_items`` items with 16-d features, for the toy bundle's retrievers."""
    datamodule = SyntheticDataModule(num_items=num_items, feature_dim=16, batch_size=32,
                                     eval_batch_size=eval_batch_size)
    datamodule.setup()
    return datamodule


def toy_retriever(bundle_dir: str, datamodule: SyntheticDataModule, **overrides) -> GenerativeRetriever:
    """A seeded small ACE retriever (d_model 32, 1 + 1 layers, beam 12) over ``bundle_dir``; ``overrides`` win."""
    torch.manual_seed(0)
    args = dict(bundle_dir=bundle_dir, vocab_size=datamodule.vocab_size, pad_token_id=datamodule.pad_token_id,
                d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, max_query_len=32,
                beam_size=12)
    args.update(overrides)
    return GenerativeRetriever(**args)
