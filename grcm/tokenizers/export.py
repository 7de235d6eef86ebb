"""Write a SID bundle from a trained tokenizer checkpoint (``grcm sids``)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from grcm.tokenizers.bundle import BundleError, SIDBundle
from grcm.tokenizers.module import ACETokenizer


def load_tokenizer(checkpoint_path: str | os.PathLike, map_location: str = "cpu") -> ACETokenizer:
    """Load a trained ACETokenizer checkpoint (tensors only, ``weights_only=True``)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
        where = f"{path.parent} holds {', '.join(found)}" if found else "train one with grcm fit first"
        raise BundleError(f"--ckpt_path={path}: tokenizer checkpoint not found; {where}.")
    try:
        model = ACETokenizer.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 -- a checkpoint of another model or a broken file
        raise BundleError(
            f"--ckpt_path={path}: not an ACETokenizer checkpoint ({type(error).__name__}); pass the tokenizer "
            "run's <run dir>/checkpoints/last.ckpt."
        ) from error
    if not bool(model.fitted):
        raise BundleError(f"--ckpt_path={path} holds an ACETokenizer whose K-Means was never fitted; train it with grcm fit")
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
    if corpus.feature_dim != model.hparams.feature_dim:
        raise BundleError(
            f"--ckpt_path={checkpoint_path} tokenizes {model.hparams.feature_dim}-d item features but corpus "
            f"{corpus.name!r} has {corpus.feature_dim}-d features; use the config (and data overrides) the "
            "tokenizer was trained with."
        )
    bundle = model.build_bundle(corpus.item_ids, corpus.features)
    bundle.save(bundle_dir)
    return bundle
