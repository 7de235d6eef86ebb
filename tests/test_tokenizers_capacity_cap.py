"""Capacity-capped SID assignment and FORGE's SID-quality metrics, against independent computations."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from grcm.data.datamodules import SyntheticDataModule
from grcm.tokenizers.bundle import SIDBundle
from grcm.tokenizers.capacity_cap import capacity_capped_codes
from grcm.tokenizers.health import gini_coefficient
from grcm.tokenizers.module import ACETokenizer
from grcm.tokenizers.sid_quality import sid_quality


def _random_case(seed: int, num_items: int = 60, parents: int = 6, codes: int = 16, dim: int = 3):
    """One quantised level under a fixed first column: (prefix (N, 2), latents (N, d), codebooks (1, K, d))."""
    generator = torch.Generator().manual_seed(seed)
    codebooks = torch.randn(1, codes, dim, generator=generator)
    # crowd the items around a few codes so that SIDs overflow
    latents = codebooks[0, torch.randint(0, 4, (num_items,), generator=generator)]
    latents = latents + 0.4 * torch.randn(num_items, dim, generator=generator)
    parent = torch.randint(0, parents, (num_items, 1), generator=generator)
    nearest = torch.cdist(latents, codebooks[0]).argmin(dim=1, keepdim=True)
    return torch.cat([parent, nearest], dim=1), latents, codebooks


def _reference(prefix: torch.Tensor, latents: torch.Tensor, codebooks: torch.Tensor, capacity: int) -> torch.Tensor:
    """Per-item loop, one quantised level: keep the best quantised `capacity` per SID; the rest, best quantised
    first, take the nearest code with room under their parent."""
    rows = [tuple(r) for r in prefix.tolist()]
    distance = [[float(((latents[i] - code) ** 2).sum()) for code in codebooks[0]] for i in range(len(rows))]
    own = [distance[i][rows[i][-1]] for i in range(len(rows))]
    members: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(rows):
        members.setdefault(row, []).append(i)
    counts: Counter = Counter()
    result = [list(r) for r in rows]
    overflow = []
    for sid, items in members.items():
        ranked = sorted(items, key=lambda i: (own[i], i))
        counts[sid] = min(len(ranked), capacity)
        overflow += ranked[capacity:]
    for i in sorted(overflow, key=lambda i: (own[i], i)):
        for code in sorted(range(len(distance[i])), key=lambda c: (distance[i][c], c)):
            sid = (*rows[i][:-1], code)
            if counts[sid] < capacity:
                counts[sid] += 1
                result[i][-1] = code
                break
    return torch.tensor(result)


@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_cap_matches_a_per_item_reference_and_keeps_every_item(capacity: int):
    prefix, latents, codebooks = _random_case(seed=capacity)
    capped = capacity_capped_codes(prefix, latents, codebooks, capacity)
    assert torch.equal(capped, _reference(prefix, latents, codebooks, capacity))
    sizes = Counter(tuple(r) for r in capped.tolist())
    assert max(sizes.values()) <= capacity  # cap respected
    assert sum(sizes.values()) == len(prefix)  # no item lost
    assert torch.equal(capped[:, :-1], prefix[:, :-1])  # items move within their parent prefix only
    assert (capped != prefix).any()  # the case does overflow


def test_overflow_goes_to_the_nearest_free_code_and_the_best_quantised_items_stay():
    codebooks = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])  # one level, 1-d codes at 0, 1, 2, 3
    latents = torch.tensor([[1.3], [0.9], [1.45], [2.0], [1.0]])
    prefix = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 2], [1, 1]])  # item 4: another parent, own SID
    assert capacity_capped_codes(prefix, latents, codebooks, 3).tolist() == prefix.tolist()  # nothing moves
    # capacity 1: item 1 (error 0.01) keeps (0, 1); item 0 (0.09) is placed before item 2 (0.2025):
    # its codes by distance 1, 2, 0, 3 -> 2 is held by item 3 -> code 0; item 2's are 1, 2, 0, 3 too, and
    # 0 is now taken -> code 3
    assert capacity_capped_codes(prefix, latents, codebooks, 1).tolist() == [[0, 0], [0, 1], [0, 3], [0, 2], [1, 1]]
    # capacity 2: items 1 and 0 stay, item 2 moves to its next-nearest code 2 (one place left there)
    assert capacity_capped_codes(prefix, latents, codebooks, 2).tolist() == [[0, 1], [0, 1], [0, 2], [0, 2], [1, 1]]


def test_a_full_parent_backs_off_to_the_nearest_free_code_one_level_up():
    codebooks = torch.tensor([[[0.0], [10.0]], [[0.0], [1.0]]])  # level 1 codes 0, 10; level 2 codes 0, 1
    latents = torch.tensor([[0.1], [0.9], [0.2], [0.15]])
    prefix = torch.tensor([[5, 0, 0], [5, 0, 1], [5, 0, 0], [6, 0, 0]])  # column 0 (coarse) is never changed
    capped = capacity_capped_codes(prefix, latents, codebooks, 1)
    # item 2 overflows (0, 0); (0, 1) is full too, so level 1 takes its next code 10 and level 2 the nearest
    # to 0.2 - 10 = -9.8: code 0
    assert capped.tolist() == [[5, 0, 0], [5, 0, 1], [5, 1, 0], [6, 0, 0]]


def test_two_quantised_levels_with_full_parents_keep_the_cap_and_every_item():
    generator = torch.Generator().manual_seed(5)
    codebooks = torch.randn(2, 4, 2, generator=generator)  # 4 x 4 fine SIDs under each coarse code
    latents = 0.3 * torch.randn(50, 2, generator=generator)  # crowded near the origin: parents overflow
    first = torch.cdist(latents, codebooks[0]).argmin(1)
    second = torch.cdist(latents - codebooks[0][first], codebooks[1]).argmin(1)
    coarse = torch.arange(50) % 4
    prefix = torch.stack([coarse, first, second], dim=1)
    capped = capacity_capped_codes(prefix, latents, codebooks, 1)
    assert len({tuple(r) for r in capped.tolist()}) == 50  # every item kept, each on its own SID
    assert torch.equal(capped[:, 0], coarse)
    assert (capped[:, 1] != prefix[:, 1]).any()  # some items had to leave their full parent
    unmoved = (capped == prefix).all(dim=1)
    # an item keeps its SID exactly when it is its SID's best quantised item
    error = (latents - codebooks[0][first] - codebooks[1][second]).pow(2).sum(1)
    for i in range(50):
        same = [j for j in range(50) if prefix[j].tolist() == prefix[i].tolist()]
        best = min(same, key=lambda j: (float(error[j]), j))
        assert bool(unmoved[i]) == (best == i)


def test_more_items_than_the_quantised_sids_hold_is_an_error_naming_the_fix():
    prefix = torch.zeros(5, 2, dtype=torch.long)
    codebooks = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="raise sid_capacity"):
        capacity_capped_codes(prefix, torch.randn(5, 3), codebooks, capacity=2)
    with pytest.raises(ValueError, match="sid_capacity must be >= 1"):
        capacity_capped_codes(prefix, torch.randn(5, 3), codebooks, capacity=0)


def test_sid_quality_against_direct_counts():
    rng = np.random.default_rng(0)
    codes = torch.from_numpy(rng.integers(0, [4, 3, 2], size=(60, 3)))
    vocab = [5, 3, 2]
    quality = sid_quality(codes, vocab)
    rows = [tuple(r) for r in codes.tolist()]
    for depth in range(3):
        buckets = Counter(r[: depth + 1] for r in rows)
        assert quality[f"final_prefix{depth}_collision_rate"] == pytest.approx(1 - len(buckets) / 60)
        sizes = np.array(sorted(buckets.values()), dtype=float)
        pairwise = np.abs(sizes[:, None] - sizes[None, :]).sum() / (2 * len(sizes) ** 2 * sizes.mean())
        assert quality[f"final_prefix{depth}_gini"] == pytest.approx(pairwise)
    for level in range(3):
        assert quality[f"final_level{level}_utilisation"] == pytest.approx(len(set(codes[:, level].tolist())) / vocab[level])
    assert quality["final_collision_rate"] == quality["final_prefix2_collision_rate"]
    assert quality["final_max_items_per_sid"] == max(Counter(rows).values())
    assert gini_coefficient(np.array([1, 1, 1])) == 0.0


def test_ace_tokenizer_capacity_one_gives_unique_sids_without_a_counter(tmp_path: Path):
    datamodule = SyntheticDataModule(serve="items", num_items=300, feature_dim=32, batch_size=100,
                                     eval_batch_size=300)
    small = dict(coarse_codebook_size=4, codebook_size=16, latent_dim=8, hidden_dims=(32, 16), lr=1e-3,
                 warmup_epochs=1, health_pairs=200)
    bundles = {}
    for name, flags in {"plain": dict(unique_token=False), "capped": dict(unique_token=False, sid_capacity=1)}.items():
        L.seed_everything(0, verbose=False)
        model = ACETokenizer(feature_dim=32, bundle_dir=str(tmp_path / name), **small, **flags)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, default_root_dir=str(tmp_path),
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            enable_checkpointing=False)
        trainer.fit(model, datamodule=datamodule)
        bundles[name] = (SIDBundle.load(tmp_path / name), dict(trainer.callback_metrics))
    plain, capped = bundles["plain"][0], bundles["capped"][0]
    assert plain.health["final_collision_rate"] > 0.05  # 4 x 16 x 16 SIDs for 300 items: some collide
    assert capped.codes.shape == plain.codes.shape == (300, 3)  # no counter level
    assert len({tuple(r) for r in capped.codes.tolist()}) == 300
    assert capped.health["final_collision_rate"] == 0.0
    moved = (capped.codes != plain.codes).any(dim=1)
    assert torch.equal(capped.codes[:, 0], plain.codes[:, 0])  # the coarse K-Means token never moves
    assert bool(moved.any())
    assert capped.health["capacity_moved_fraction"] == pytest.approx(float(moved.float().mean()))
    assert float(bundles["capped"][1]["sid/capacity_moved_fraction"]) == pytest.approx(float(moved.float().mean()))
    assert "sid/final_gini" in bundles["plain"][1]


def test_capacity_needs_rqvae_fine_tokens():
    with pytest.raises(ValueError, match="fine_tokens: rqvae"):
        ACETokenizer(feature_dim=8, fine_tokens="hierarchical_kmeans", sid_capacity=1)
