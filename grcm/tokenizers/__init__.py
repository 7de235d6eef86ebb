"""Semantic-ID tokenizers: item embeddings -> SIDs (k, v_1..v_M, u) and the SID bundle artifact.

- ``module.ACETokenizer``: the ACE/CART coarse-fine tokenizer (LightningModule) and its ablations.
- ``bundle.SIDBundle``: codes, codebooks, config, checksum and health of one tokenizer run.
- ``export.export_bundle`` / ``plot.plot_coarse_tokens``: bundle from a checkpoint, PCA/t-SNE PNG.
"""

from grcm.tokenizers.bundle import BundleError, SIDBundle

__all__ = ["BundleError", "SIDBundle"]
