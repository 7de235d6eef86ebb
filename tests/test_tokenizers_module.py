"""ACETokenizer end to end on a small synthetic corpus: fit, bundle, checkpoint export, ablations, plot."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from threadpoolctl import threadpool_limits

from grcm.data.datamodules import SyntheticDataModule
from grcm.tokenizers.bundle import SIDBundle
from grcm.tokenizers.export import export_bundle
from grcm.tokenizers.module import ACETokenizer
from grcm.tokenizers.plot import plot_coarse_tokens

SMALL = dict(
    coarse_codebook_size=8,
    codebook_size=16,
    latent_dim=8,
    hidden_dims=(32, 16),
    lr=1e-3,
    warmup_epochs=1,
    health_pairs=300,
)


@pytest.fixture(scope="module")
def datamodule() -> SyntheticDataModule:
    return SyntheticDataModule(
        serve="items", num_items=300, feature_dim=32, batch_size=100, eval_batch_size=300
    )


def _fit(datamodule, root: Path, max_epochs: int = 2, **overrides) -> tuple[ACETokenizer, L.Trainer]:
    L.seed_everything(0, verbose=False)
    model = ACETokenizer(
        feature_dim=datamodule.feature_dim, bundle_dir=str(root / "sids"), **{**SMALL, **overrides}
    )
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=datamodule)
    return model, trainer


def test_fit_writes_a_unique_bundle_that_a_checkpoint_reproduces(datamodule, tmp_path: Path):
    model, trainer = _fit(datamodule, tmp_path)
    bundle = SIDBundle.load(tmp_path / "sids")
    corpus = datamodule.corpus
    assert bundle.item_ids == corpus.item_ids
    assert bundle.codes.shape == (300, 4)
    assert bundle.config["level_names"] == ["coarse", "fine_1", "fine_2", "unique"]
    assert bundle.vocab_sizes[:3] == [8, 16, 16]
    assert bundle.vocab_sizes[3] == int(bundle.codes[:, 3].max()) + 1
    assert len({tuple(row) for row in bundle.codes.tolist()}) == 300
    assert bundle.feature_checksum == corpus.feature_checksum()
    assert set(bundle.codebooks) == {"coarse", "fine_1", "fine_2"}
    assert bundle.codebooks["fine_1"].shape == (16, 8)
    # health in the bundle agrees with the codes it describes
    prefix = bundle.codes[:, :3]
    assert bundle.health["num_unique_prefixes"] == len(torch.unique(prefix, dim=0))
    assert bundle.health["level1_utilisation"] == len(torch.unique(prefix[:, 1])) / 16
    assert bundle.health["largest_bucket"] == bundle.vocab_sizes[3]
    assert bundle.health["recon_mse"] > 0
    for key in ("sid/level0_utilisation", "sid/gini", "sid/collision_rate", "sid/prefix0_same_similarity"):
        assert key in trainer.callback_metrics
    # the checkpoint alone reproduces the SIDs
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    exported = export_bundle(checkpoint, datamodule, tmp_path / "exported")
    assert torch.equal(exported.codes, bundle.codes)
    assert torch.equal(SIDBundle.load(tmp_path / "exported").codes, bundle.codes)
    # a second run with the same seed gives the same SIDs
    _fit(datamodule, tmp_path / "again")
    assert torch.equal(SIDBundle.load(tmp_path / "again" / "sids").codes, bundle.codes)
    # the coarse token is the nearest K-Means centroid of the raw feature
    features = torch.from_numpy(corpus.features)
    nearest = torch.cdist(features, model.coarse.centroids).argmin(-1)
    assert torch.equal(bundle.codes[:, 0], nearest)


@pytest.mark.parametrize(
    ("overrides", "levels", "prefix_vocab"),
    [
        (dict(coarse_token=False), ["fine_1", "fine_2", "unique"], [16, 16]),
        (dict(fine_tokens="hierarchical_kmeans"), ["coarse", "fine_1", "fine_2", "unique"], [8, 16, 16]),
        (dict(num_fine_levels=1, codebook_size=32), ["coarse", "fine_1", "unique"], [8, 32]),
        (
            dict(num_fine_levels=3, unique_token=False, rotation_trick=True),
            ["coarse", "fine_1", "fine_2", "fine_3"],
            [8, 16, 16, 16],
        ),
    ],
)
def test_ablations_produce_valid_bundles(datamodule, tmp_path: Path, overrides, levels, prefix_vocab):
    _fit(datamodule, tmp_path, max_epochs=1, **overrides)
    bundle = SIDBundle.load(tmp_path / "sids")
    assert bundle.config["level_names"] == levels
    assert bundle.vocab_sizes[: len(prefix_vocab)] == prefix_vocab
    assert bundle.codes.shape == (300, len(levels))
    unique_rows = len({tuple(row) for row in bundle.codes.tolist()})
    if overrides.get("unique_token", True):
        assert unique_rows == 300
    else:
        assert unique_rows == bundle.health["num_unique_prefixes"]


def test_unfitted_tokenizer_refuses_to_encode():
    model = ACETokenizer(feature_dim=4, **SMALL)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.encode(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="fine_tokens"):
        ACETokenizer(feature_dim=4, fine_tokens="pq")


def test_plot_coarse_tokens_writes_a_png(datamodule, tmp_path: Path):
    _fit(datamodule, tmp_path, max_epochs=1, fine_tokens="hierarchical_kmeans", num_fine_levels=1)
    features = datamodule.corpus.features
    with threadpool_limits(limits=1):  # OpenMP t-SNE on a shared 2-core machine
        for method in ("pca", "tsne"):
            out = plot_coarse_tokens(
                tmp_path / "sids", features, tmp_path / f"{method}.png", method=method, max_points=60
            )
            assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="do not match"):
        plot_coarse_tokens(tmp_path / "sids", features * 2, tmp_path / "bad.png")


def test_docs_cite_the_papers_identifier_size_and_length_tables():
    """ACE's Table 4 varies the identifier size (codebook size), Table 5 the identifier length."""
    import grcm.tokenizers.module as tokenizer_module

    root = Path(__file__).resolve().parents[1]
    texts = {
        "grcm/tokenizers/module.py": tokenizer_module.__doc__,
        "experiments/synthetic/ace_tokenizer.yaml": (root / "experiments/synthetic/ace_tokenizer.yaml").read_text(),
    }
    for name, text in texts.items():
        flat = " ".join(text.split())
        assert "identifier size, Table 4" in flat or "identifier size (Table 4)" in flat, name
        assert "identifier length, Table 5" in flat or "identifier length (Table 5)" in flat, name
        assert "length, Table 4" not in flat and "length (Table 4)" not in flat, name
