"""GRDR's multi-view recipe: view routing consistent across items, separation of one item's views, per-view
K-Means, stable levels (frozen earlier codebooks, detached residual, the newest codebook's update scale) and
the per-epoch view health."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grcm.retriever.grdr import GRDRRetriever
from grcm.retriever.grdr.training import view_separation_terms
from grcm.tokenizers.kmeans import fit_kmeans
from grcm.tokenizers.multiview import (
    MultiViewTokenizer,
    multiview_health,
    view_code_slices,
    view_latent_cosine,
    view_margin_loss,
)
from grcm.tokenizers.query_routing import (
    assign_groups,
    cluster_routes,
    facet_routes,
    matched_routes,
    route_facet_coherence,
)

V, E = 4, 16


def _faceted_queries(num_items: int = 30, per_facet: int = 3, seed: int = 0):
    """Queries of items that each have the same V facets (unit directions), listed in a per-item random order.

    Query = item vector + facet direction + noise. Returns embeddings (Q, E), items (Q,), facets (Q,)."""
    rng = np.random.default_rng(seed)
    facets = np.linalg.qr(rng.normal(size=(E, E)))[0][:V] * 2.0  # V orthogonal facet directions
    embeddings, items, facet_of = [], [], []
    for item in range(num_items):
        base = rng.normal(size=E)
        for facet in rng.permutation(V):  # the first query of an item has a random facet
            for _ in range(per_facet):
                embeddings.append(base + facets[facet] + 0.1 * rng.normal(size=E))
                items.append(item)
                facet_of.append(facet)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings, np.asarray(items), np.asarray(facet_of)


def _consistent(routes: np.ndarray, facets: np.ndarray) -> bool:
    """Whether one view <-> facet map holds for every query of every item."""
    pairs = set(zip(facets.tolist(), routes.tolist()))
    return len(pairs) == V and len({f for f, _ in pairs}) == V and len({r for _, r in pairs}) == V


def test_matched_routing_gives_each_facet_one_view_across_items_where_first_query_does_not():
    embeddings, items, facets = _faceted_queries()
    groups = cluster_routes(embeddings, items, V, seed=0)  # = routing first_query
    # the per-item clustering finds the facets, but numbers them per item: view g is no facet in particular
    assert all(len(set(groups[facets == f][items[facets == f] == i])) == 1 for f in range(V) for i in range(30))
    assert not _consistent(groups, facets)
    routes, prototypes = facet_routes(embeddings, items, groups, V, seed=0)
    assert _consistent(routes, facets)
    assert prototypes.shape == (V, E)
    for item in range(30):  # one-to-one: an item's V groups on V distinct views
        assert sorted(set(routes[items == item].tolist())) == list(range(V))
    assert route_facet_coherence(embeddings, items, routes, V) > 0.5
    assert route_facet_coherence(embeddings, items, groups, V) < 0.2


def test_rematching_follows_the_view_latents_and_keeps_an_items_views_distinct():
    embeddings, items, facets = _faceted_queries(num_items=12, seed=1)
    groups = cluster_routes(embeddings, items, V, seed=0)
    queries = torch.from_numpy(embeddings)
    rng = np.random.default_rng(2)
    # view v of every item holds facet sigma(v) (a fixed permutation), plus its item's mean query
    sigma = rng.permutation(V)
    facet_means = np.stack([embeddings[facets == f].mean(0) for f in range(V)])
    item_means = np.stack([embeddings[items == i].mean(0) for i in range(12)])
    latents = torch.from_numpy(item_means[:, None, :] + 3 * (facet_means[sigma] - facet_means.mean(0))[None])
    routes = matched_routes(queries, torch.from_numpy(items), torch.from_numpy(groups), latents.float())
    view_of_facet = np.argsort(sigma)
    assert routes.tolist() == view_of_facet[facets].tolist()
    # two groups closest to the same view still get distinct views (the second-best one)
    assert sorted(assign_groups(np.array([[0.9, 0.8, 0.0, 0.0], [0.95, 0.1, 0.0, 0.0]])).tolist()) == [0, 1]
    assert assign_groups(np.array([[0.9, 0.8, 0.0, 0.0], [0.95, 0.1, 0.0, 0.0]])).tolist() == [1, 0]


def test_view_margin_gradient_pushes_one_items_views_apart_and_spares_pairs_below_the_margin():
    torch.manual_seed(0)
    close = F.normalize(torch.randn(1, 1, 8) + 0.2 * torch.randn(5, 3, 8), dim=-1).requires_grad_(True)
    loss = view_margin_loss(close, margin=0.1)
    loss.backward()
    with torch.no_grad():
        stepped = close - 5.0 * close.grad  # the mean over 5 items x 3 pairs makes each gradient small
    for item in range(5):  # every item's views moved apart
        assert view_latent_cosine(stepped[item : item + 1]) < view_latent_cosine(close[item : item + 1].detach()) - 0.01
    # a pair below the margin costs nothing and gets no gradient
    apart = torch.eye(3).reshape(1, 3, 3).requires_grad_(True)
    view_margin_loss(apart, margin=0.1).backward()
    assert float(apart.grad.abs().sum()) == 0.0
    # other items do not count: the term is per item, not over the batch
    one_item = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert float(view_margin_loss(torch.cat([one_item, -one_item]), margin=0.0)) == 0.0
    # view_cosine: mean over an item's pairs, independently computed
    latents = torch.randn(6, 3, 8)
    pairs = [F.cosine_similarity(latents[:, a], latents[:, b], dim=-1) for a, b in ((0, 1), (0, 2), (1, 2))]
    assert view_latent_cosine(latents) == pytest.approx(float(torch.stack(pairs).mean()), abs=1e-6)


def test_separation_terms_add_the_weighted_margin_to_the_chosen_losses():
    tokenizer = MultiViewTokenizer(feature_dim=4, num_views=2, num_levels=1, codebook_size=4, latent_dim=4)
    latents = F.normalize(torch.randn(3, 2, 4), dim=-1)
    parts, total = view_separation_terms(tokenizer, latents, None, torch.arange(3), torch.zeros(3, dtype=torch.long),
                                         "none", 0.1, margin=-1.0, margin_weight=2.0)
    assert set(parts) == {"view_margin"}
    assert float(total) == pytest.approx(2.0 * float(view_margin_loss(latents, -1.0)))
    with pytest.raises(ValueError, match="guidance"):
        view_separation_terms(tokenizer, latents, None, torch.arange(3), torch.zeros(3, dtype=torch.long),
                              "infonce", 0.1, 0.0, 0.0)


def test_per_view_kmeans_fills_one_slice_of_codes_per_view():
    torch.manual_seed(0)
    tokenizer = MultiViewTokenizer(feature_dim=12, num_views=3, num_levels=2, codebook_size=10, latent_dim=6,
                                   hidden_dim=16)
    features = torch.randn(150, 12)
    assert view_code_slices(10, 3) == [(0, 4), (4, 7), (7, 10)]
    tokenizer.init_level(features, 0, seed=5, per_view=True)
    with torch.no_grad():
        latents = tokenizer.view_latents(features)
    for view, (start, stop) in enumerate(view_code_slices(10, 3)):
        expected = fit_kmeans(latents[:, view], stop - start, seed=5 + view)
        assert torch.allclose(tokenizer.codebooks[0].data[start:stop], torch.from_numpy(expected))
    codes = tokenizer.encode(features, 1)[..., 0]
    health = multiview_health(tokenizer.encode(features, 1), [10])
    distinct_first = [len(set(row.tolist())) < 3 for row in codes]
    assert health["duplicate_level0_item_fraction"] == pytest.approx(float(np.mean(distinct_first)))


def test_detached_residual_keeps_later_levels_from_training_the_encoder():
    torch.manual_seed(0)
    features = torch.randn(20, 8)
    for detach in (False, True):
        tokenizer = MultiViewTokenizer(feature_dim=8, num_views=2, num_levels=2, codebook_size=4, latent_dim=4,
                                       hidden_dim=8, detach_residual=detach)
        out = tokenizer.quantize(tokenizer.view_latents(features), 2)
        level1 = tokenizer.code_logits(out.residuals[1], 1).logsumexp(-1).sum()
        level1.backward()
        encoder_grad = sum(float(p.grad.abs().sum()) for p in tokenizer.view_encoders.parameters()
                           if p.grad is not None)
        codebook0_grad = tokenizer.codebooks[0].grad
        if detach:
            assert encoder_grad == 0.0 and codebook0_grad is None
        else:
            assert encoder_grad > 0.0 and float(codebook0_grad.abs().sum()) > 0.0


def _module(multiplier: float) -> GRDRRetriever:
    torch.manual_seed(0)
    return GRDRRetriever(vocab_size=20, feature_dim=8, num_views=2, num_levels=2, codebook_size=4, d_model=8,
                         tokenizer_hidden=8, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=16,
                         pretrain_epochs=0, main_epochs=1, fit_epochs=1, new_codebook_lr_multiplier=multiplier)


def test_the_newest_codebook_update_is_scaled_and_nothing_else():
    updates = []
    for multiplier in (1.0, 10.0):
        module = _module(multiplier)
        module.apply_phase(module.phases[0])  # main, level 0: codebook 0 is the newest (epoch 0 without trainer)
        before = {name: p.detach().clone() for name, p in module.named_parameters()}
        optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
        for param in module.parameters():
            param.grad = torch.ones_like(param) if param.requires_grad else None
        module.optimizer_step(0, 0, optimizer, None)
        updates.append({name: p.detach() - before[name] for name, p in module.named_parameters()})
    newest = "tokenizer.codebooks.0"
    assert torch.allclose(updates[1][newest], 10 * updates[0][newest])
    assert float(updates[0][newest].abs().sum()) > 0
    for name in updates[0]:
        if name != newest:
            assert torch.equal(updates[0][name], updates[1][name]), name
