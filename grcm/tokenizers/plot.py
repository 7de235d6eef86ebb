"""2-D map of the items coloured by their coarse token (ACE Fig. 5), as a PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from grcm.io import atomic_path
from grcm.tokenizers.bundle import SIDBundle


def project_2d(features: np.ndarray, method: Literal["pca", "tsne"] = "pca", seed: int = 0) -> np.ndarray:
    """Project features (N, D) to (N, 2) with scikit-learn's PCA or t-SNE."""
    x = np.asarray(features, dtype=np.float32)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
    raise ValueError(f"method must be 'pca' or 'tsne'; got {method!r}")


def plot_coarse_tokens(
    bundle_dir: str | os.PathLike,
    features: np.ndarray | torch.Tensor,
    out_png: str | os.PathLike,
    method: Literal["pca", "tsne"] = "pca",
    max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """Scatter the items of a SID bundle in 2-D, coloured by their first SID token; writes ``out_png``.

    ``features`` (N, D) are the corpus features in the bundle's item order (checked against the
    bundle's checksum). At most ``max_points`` items, drawn with ``seed``, are shown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bundle = SIDBundle.load(bundle_dir)
    bundle.check_features(features)
    n = bundle.num_items
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, max_points), replace=False))
    points = project_2d(np.asarray(features[rows]), method, seed)
    token = bundle.codes[torch.from_numpy(rows), 0].numpy()
    level_name = (bundle.config.get("level_names") or ["level 0"])[0]

    figure, axis = plt.subplots(figsize=(7, 7), dpi=120)
    # one hue per token, shuffled so that neighbouring token ids do not get similar colours
    vocab = int(bundle.vocab_sizes[0])
    hue = np.random.default_rng(seed).permutation(vocab)[token] / max(vocab - 1, 1)
    axis.scatter(points[:, 0], points[:, 1], c=hue, cmap="nipy_spectral", vmin=0, vmax=1, s=6, linewidths=0)
    axis.set_title(
        f"{len(rows)} items by {level_name} token ({method.upper()}, {len(np.unique(token))} tokens)"
    )
    axis.set_xticks([])
    axis.set_yticks([])
    figure.tight_layout()
    out = Path(out_png)
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return out
