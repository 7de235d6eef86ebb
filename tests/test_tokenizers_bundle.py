"""SID bundle: save/load round trip, atomic replacement and clear errors for corrupt bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from grcm.data.synthetic import generate_synthetic_corpus
from grcm.tokenizers.bundle import BundleError, SIDBundle, feature_checksum


def _bundle(n: int = 12) -> SIDBundle:
    generator = torch.Generator().manual_seed(0)
    features = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    ids = [f"item-{i}" for i in range(n)]
    return SIDBundle(
        item_ids=ids,
        codes=torch.stack([torch.randint(0, 3, (n,), generator=generator), torch.arange(n) % 5], dim=1),
        vocab_sizes=[3, 5],
        codebooks={"coarse": torch.randn(3, 4, generator=generator)},
        config={"level_names": ["coarse", "unique"], "hidden_dims": (8, 4)},
        feature_checksum=feature_checksum(ids, features),
        health={"gini": 0.25, "level0_utilisation": 1.0, "prefix1_same_similarity": float("nan")},
    )


def test_round_trip_keeps_everything(tmp_path: Path):
    bundle = _bundle()
    bundle.save(tmp_path / "sids")
    loaded = SIDBundle.load(tmp_path / "sids")
    assert loaded.item_ids == bundle.item_ids
    assert torch.equal(loaded.codes, bundle.codes) and loaded.codes.dtype == torch.long
    assert loaded.vocab_sizes == [3, 5]
    torch.testing.assert_close(loaded.codebooks["coarse"], bundle.codebooks["coarse"])
    assert loaded.config == {"level_names": ["coarse", "unique"], "hidden_dims": [8, 4]}
    assert loaded.health == {"gini": 0.25, "level0_utilisation": 1.0, "prefix1_same_similarity": None}
    assert loaded.feature_checksum == bundle.feature_checksum


def test_save_replaces_an_existing_bundle_atomically(tmp_path: Path):
    _bundle(12).save(tmp_path / "sids")
    _bundle(7).save(tmp_path / "sids")
    assert SIDBundle.load(tmp_path / "sids").num_items == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sids"]


def test_feature_checksum_matches_the_corpus_and_detects_other_features():
    corpus = generate_synthetic_corpus(num_items=50, feature_dim=8, seed=0)
    checksum = feature_checksum(corpus.item_ids, corpus.features)
    assert checksum == corpus.feature_checksum()
    bundle = SIDBundle(corpus.item_ids, torch.zeros(50, 1, dtype=torch.long), [1], feature_checksum=checksum)
    bundle.check_features(corpus.features)
    with pytest.raises(BundleError, match="do not match"):
        bundle.check_features(corpus.features + 1e-3)
    with pytest.raises(BundleError, match="49 feature rows"):
        bundle.check_features(corpus.features[:49])


def test_invalid_bundles_are_rejected_on_construction():
    ids = ["a", "b"]
    with pytest.raises(BundleError, match="outside"):
        SIDBundle(ids, torch.tensor([[0], [3]]), [3])
    with pytest.raises(BundleError, match="2 code rows"):
        SIDBundle(["a"], torch.tensor([[0], [1]]), [3])
    with pytest.raises(BundleError, match="not unique"):
        SIDBundle(["a", "a"], torch.tensor([[0], [1]]), [3])
    with pytest.raises(BundleError, match="vocab sizes"):
        SIDBundle(ids, torch.tensor([[0], [1]]), [3, 3])


def _corrupt(directory: Path, case: str) -> None:
    if case == "missing_codes":
        (directory / "codes.safetensors").unlink()
    elif case == "bad_json":
        (directory / "meta.json").write_text("{not json")
    elif case == "old_version":
        meta = json.loads((directory / "meta.json").read_text())
        meta["format_version"] = 0
        (directory / "meta.json").write_text(json.dumps(meta))
    elif case == "other_format":
        (directory / "meta.json").write_text(json.dumps({"format": "something-else"}))
    elif case == "tampered_codes":
        save_file({"codes": torch.zeros(12, 2, dtype=torch.long)}, str(directory / "codes.safetensors"))
    elif case == "truncated_codes":
        data = (directory / "codes.safetensors").read_bytes()
        (directory / "codes.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "wrong_ids":
        (directory / "item_ids.json").write_text(json.dumps(["x"] * 3))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_codes", "codes.safetensors is missing"),
        ("bad_json", "meta.json is not valid JSON"),
        ("old_version", "format_version 0 is not supported"),
        ("other_format", "is not a grcm-sid-bundle"),
        ("tampered_codes", "does not match its checksum"),
        ("truncated_codes", "corrupt"),
        ("wrong_ids", "inconsistent"),
    ],
)
def test_corrupt_bundles_raise_clear_errors(tmp_path: Path, case: str, message: str):
    directory = tmp_path / "sids"
    _bundle().save(directory)
    _corrupt(directory, case)
    with pytest.raises(BundleError, match=message):
        SIDBundle.load(directory)


def test_missing_directory(tmp_path: Path):
    with pytest.raises(BundleError, match="no SID bundle directory"):
        SIDBundle.load(tmp_path / "nowhere")
