"""GRDR's ``view_target``: the SID loss over all of an item's views (marginal likelihood or hard EM)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grcm.errors import GrcmError
from grcm.retriever.grdr import GRDRRetriever
from grcm.retriever.grdr.losses import multi_view_sid_loss, view_sid_nll
from grcm.retriever.grdr.sid_loss import batch_sid_loss

B, V, LEVELS, K = 5, 3, 2, 8


def _sid_loss(module, batch, codes, routes):
    """The module's SID loss of a batch under its own ``view_target`` (what its training step computes)."""
    hparams = module.hparams
    return batch_sid_loss(module.model, batch["input_ids"], batch["attention_mask"], codes, routes,
                          hparams.view_target, hparams.num_levels, hparams.label_smoothing)


def _module(**kwargs) -> GRDRRetriever:
    args = dict(vocab_size=40, feature_dim=16, num_views=V, num_levels=LEVELS, codebook_size=K, d_model=16,
                tokenizer_hidden=16, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=32, dropout=0.0,
                label_smoothing=0.0)
    args.update(kwargs)
    torch.manual_seed(0)
    return GRDRRetriever(**args)


def _batch():
    generator = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1, 40, (B, 6), generator=generator),
             "attention_mask": torch.ones(B, 6, dtype=torch.bool)}
    codes = torch.randint(0, K, (B, V, LEVELS), generator=generator)
    return batch, codes


def _routed_view_nll(module: GRDRRetriever, batch, codes: torch.Tensor) -> torch.Tensor:
    """(B, V): each view's SID NLL from the single-view path (view v teacher-forced alone), summed over levels."""
    columns = []
    for view in range(V):
        logits = module.model(batch["input_ids"], batch["attention_mask"], codes[:, view])
        columns.append(sum(F.cross_entropy(logits[level], codes[:, view, level], reduction="none")
                           for level in range(LEVELS)))
    return torch.stack(columns, 1)


def test_marginal_loss_is_minus_logsumexp_of_the_view_nlls_and_best_is_their_minimum():
    nll = torch.tensor([[1.0, 2.0, 5.0], [0.3, 0.3, 4.0]], requires_grad=True)
    loss, best = multi_view_sid_loss(nll, levels=2, view_target="marginal")
    torch.testing.assert_close(loss, -torch.logsumexp(-nll.detach(), 1).mean() / 2)
    assert best.tolist() == [0, 0]
    loss.backward()
    posterior = torch.softmax(-nll.detach(), 1) / (2 * 2)  # d loss / d nll: each view by its posterior
    torch.testing.assert_close(nll.grad, posterior)
    assert (nll.grad > 0).all()  # every view of every query is trained
    nll.grad = None
    hard, _ = multi_view_sid_loss(nll, levels=2, view_target="best")
    torch.testing.assert_close(hard, torch.tensor((1.0 + 0.3) / 2 / 2))
    hard.backward()
    assert (nll.grad != 0).sum(1).tolist() == [1, 1]  # hard EM trains one view per query


def test_view_sid_nll_sums_each_views_cross_entropy_over_levels():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(B, V, K, generator=generator) for _ in range(LEVELS)]
    targets = torch.randint(0, K, (B, V, LEVELS), generator=generator)
    nll = view_sid_nll(logits, targets, label_smoothing=0.0)
    expected = -sum(logits[level].log_softmax(-1).gather(-1, targets[..., level, None]).squeeze(-1)
                    for level in range(LEVELS))
    torch.testing.assert_close(nll, expected)


@pytest.mark.parametrize("view_target", ["marginal", "best"])
def test_the_modules_multi_view_loss_decodes_every_views_sid_as_the_single_view_path_does(view_target):
    module = _module(view_target=view_target)
    batch, codes = _batch()
    routes = torch.zeros(B, dtype=torch.long)
    loss, exact = _sid_loss(module, batch, codes, routes)
    nll = _routed_view_nll(module, batch, codes)  # each view alone: row b * V + v must be view v of query b
    expected = (-torch.logsumexp(-nll, 1) if view_target == "marginal" else nll.min(1).values).mean() / LEVELS
    torch.testing.assert_close(loss, expected)
    assert exact.shape == (B,)
    routed = _module(view_target="routed")
    routed_loss, _ = _sid_loss(routed, batch, codes, routes)
    torch.testing.assert_close(routed_loss, nll[:, 0].mean() / LEVELS)  # routed trains view 0 only
    assert not torch.allclose(loss, routed_loss)


def test_marginal_gradient_reaches_every_views_target_code():
    """The decoder's level-0 input embedding of each view's first code gets gradient: every view's SID is
    teacher-forced. Under ``routed`` only the routed view's code does."""
    batch, codes = _batch()
    codes[:, :, 0] = torch.arange(V)  # view v's first code is v for every query
    for view_target, trained in (("marginal", set(range(V))), ("routed", {0})):
        module = _module(view_target=view_target, shared_codebook=False)
        loss, _ = _sid_loss(module, batch, codes, torch.zeros(B, dtype=torch.long))
        loss.backward()
        grad = module.model.code_embeddings[0].weight.grad  # (K, d): only codes fed as prefixes get gradient
        assert {code for code in range(K) if grad[code].abs().sum() > 0} == trained


def test_one_view_marginal_equals_routed_and_bad_values_are_refused():
    batch, codes = _batch()
    codes = codes[:, :1]
    routes = torch.zeros(B, dtype=torch.long)
    marginal, _ = _sid_loss(_module(num_views=1, view_target="marginal"), batch, codes, routes)
    routed, _ = _sid_loss(_module(num_views=1, view_target="routed"), batch, codes, routes)
    torch.testing.assert_close(marginal, routed)
    with pytest.raises(GrcmError, match="view_target"):
        _module(view_target="soft")
