"""Write a SID bundle from a trained tokenizer checkpoint (``grcm sids``)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from grcm.tokenizers.bundle import SIDBundle
from grcm.tokenizers.module import ACETokenizer


def load_tokenizer(checkpoint_path: str | os.PathLike, map_location: str = "cpu") -> ACETokenizer:
    """Load a trained ACETokenizer checkpoint (tensors only, ``weights_only=True``)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer checkpoint {path} not found; train one with grcm fit first")
    model = ACETokenizer.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    if not bool(model.fitted):
        raise ValueError(
            f"{path} holds an ACETokenizer whose K-Means was never fitted; train it with grcm fit"
        )
    return model.eval()


def export_bundle(
    checkpoint_path: str | os.PathLike,
    datamodule: L.LightningDataModule,
    bundle_dir: str | os.PathLike,
) -> SIDBundle:
    """Encode every item of ``datamodule.corpus`` with the checkpoint's tokenizer and save the bundle.

    Calls ``datamodule.setup("predict")`` when the corpus is not loaded yet. Returns the saved bundle.
    """
    model = load_tokenizer(checkpoint_path)
    if getattr(datamodule, "corpus", None) is None:
        datamodule.setup("predict")
    corpus = datamodule.corpus
    bundle = model.build_bundle(corpus.item_ids, corpus.features)
    bundle.save(bundle_dir)
    return bundle
