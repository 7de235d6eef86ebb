"""Residual quantisation maths, checked against a brute-force loop written here."""

from __future__ import annotations

import math

import pytest
import torch

from grcm.tokenizers.residual_quantizer import ResidualQuantizer
from grcm.tokenizers.rqvae import RQVAE
from grcm.tokenizers.schedule import warmup_inverse_sqrt


def _quantizer(dim: int = 6, levels: int = 3, size: int = 10, seed: int = 0, **kwargs) -> ResidualQuantizer:
    torch.manual_seed(seed)
    quantizer = ResidualQuantizer(dim, levels, size, **kwargs)
    for level in range(levels):
        quantizer.set_codebook(level, torch.randn(size, dim) / (level + 1))
    return quantizer


def _brute_force(z: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Reference RQ: per item, per level, scan every code for the smallest squared distance."""
    codes = torch.zeros(z.shape[0], codebooks.shape[0], dtype=torch.long)
    residuals = []
    residual = z.clone()
    for level, codebook in enumerate(codebooks):
        residuals.append(residual.clone())
        for item in range(z.shape[0]):
            distances = [float(((residual[item] - code) ** 2).sum()) for code in codebook]
            codes[item, level] = min(range(len(distances)), key=distances.__getitem__)
        residual = residual - codebook[codes[:, level]]
    return codes, residuals


def test_codes_are_the_argmin_of_each_residual():
    quantizer = _quantizer()
    z = torch.randn(40, 6)
    expected_codes, _ = _brute_force(z, quantizer.codebooks.detach())
    assert torch.equal(quantizer.quantize(z), expected_codes)


def test_residuals_subtract_the_chosen_codes_level_by_level():
    quantizer = _quantizer()
    z = torch.randn(25, 6)
    codes, expected = _brute_force(z, quantizer.codebooks.detach())
    residuals = quantizer.residuals(z, quantizer.lookup(codes))
    for level in range(3):
        torch.testing.assert_close(residuals[level], expected[level])


def test_quantized_value_is_the_sum_of_selected_codes():
    quantizer = _quantizer()
    z = torch.randn(30, 6)
    output = quantizer(z)
    codebooks = quantizer.codebooks.detach()
    manual = sum(codebooks[level][output.codes[:, level]] for level in range(3))
    torch.testing.assert_close(output.quantized, manual)
    torch.testing.assert_close(quantizer.decode_codes(output.codes), manual)


def test_losses_match_the_paper_terms():
    quantizer = _quantizer()
    z = torch.randn(16, 6)
    output = quantizer(z)
    codes, residuals = _brute_force(z, quantizer.codebooks.detach())
    expected = sum(
        ((residuals[level] - quantizer.codebooks.detach()[level][codes[:, level]]) ** 2).mean()
        for level in range(3)
    )
    torch.testing.assert_close(output.codebook_loss, expected)
    torch.testing.assert_close(output.commitment_loss, expected)


def test_straight_through_gradient_is_identity_and_losses_route_gradients():
    quantizer = _quantizer()
    z = torch.randn(12, 6, requires_grad=True)
    weights = torch.randn(12, 6)
    (quantizer(z).quantized * weights).sum().backward()
    torch.testing.assert_close(z.grad, weights)
    assert all(p.grad is None for p in quantizer.parameters())

    z.grad = None
    quantizer(z).codebook_loss.backward()
    assert z.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in quantizer.parameters())

    quantizer.zero_grad(set_to_none=True)
    quantizer(z).commitment_loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in quantizer.parameters())


def test_rotation_trick_keeps_the_value_and_passes_a_gradient():
    quantizer = _quantizer(rotation_trick=True)
    z = torch.randn(12, 6, requires_grad=True)
    output = quantizer(z)
    torch.testing.assert_close(output.quantized, quantizer.decode_codes(output.codes))
    output.quantized.sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert not torch.allclose(z.grad, torch.ones_like(z.grad))


def test_kmeans_init_beats_random_codebooks_and_uses_every_code():
    torch.manual_seed(1)
    centres = torch.randn(8, 4) * 5
    z = centres[torch.arange(400) % 8] + 0.1 * torch.randn(400, 4)
    quantizer = ResidualQuantizer(4, num_levels=2, codebook_size=8)
    random_error = (z - quantizer.decode_codes(quantizer.quantize(z))).pow(2).mean()
    codes = quantizer.init_from_data(z, seed=0)
    kmeans_error = (z - quantizer.decode_codes(codes)).pow(2).mean()
    assert kmeans_error < 0.05 * random_error
    assert len(torch.unique(codes[:, 0])) == 8
    # level 1 is fitted on what level 0 leaves, so it lowers the error further.
    level0_only = (z - quantizer.codebooks[0][codes[:, 0]]).pow(2).mean()
    assert kmeans_error < level0_only
    assert len(torch.unique(codes[:, 1])) == 8


def test_dead_code_restart_revives_every_code_without_killing_others():
    torch.manual_seed(2)
    z = torch.randn(300, 4)
    quantizer = ResidualQuantizer(4, num_levels=2, codebook_size=16)
    quantizer.init_from_data(z, seed=0)
    far = quantizer.codebooks[0].clone()
    far[[3, 7, 11]] = 1e3
    quantizer.set_codebook(0, far)
    assert len(torch.unique(quantizer.quantize(z)[:, 0])) == 13
    restarted = quantizer.restart_dead_codes(z, generator=torch.Generator().manual_seed(0))
    assert restarted[0].tolist() == [3, 7, 11]
    codes = quantizer.quantize(z)
    assert len(torch.unique(codes[:, 0])) == 16 and len(torch.unique(codes[:, 1])) == 16
    untouched = [c for c in range(16) if c not in (3, 7, 11)]
    torch.testing.assert_close(quantizer.codebooks[0][untouched], far[untouched])


def test_rqvae_shapes_and_reconstruction_loss():
    torch.manual_seed(0)
    model = RQVAE(input_dim=20, latent_dim=5, hidden_dims=(16, 8), num_levels=2, codebook_size=7)
    x = torch.randn(9, 20)
    output = model(x)
    assert output.reconstruction.shape == (9, 20) and output.codes.shape == (9, 2)
    torch.testing.assert_close(output.reconstruction_loss, ((output.reconstruction - x) ** 2).mean())
    torch.testing.assert_close(model.reconstruct_from_codes(output.codes), output.reconstruction.detach())
    total = output.total_loss(alpha=2.0, beta=0.5)
    torch.testing.assert_close(
        total, output.reconstruction_loss + 2.0 * (output.codebook_loss + 0.5 * output.commitment_loss)
    )
    assert torch.equal(model.encode_codes(x), output.codes)


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0, 0.01), (5, 0.01 + 0.99 * 0.5), (10, 1.0), (40, 0.5)],
)
def test_warmup_then_inverse_sqrt(epoch: int, expected: float):
    assert math.isclose(warmup_inverse_sqrt(epoch, warmup_epochs=10, start_factor=0.01), expected)
