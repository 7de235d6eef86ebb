"""Residual vector quantisation with the RQ-VAE losses of ACE/TIGER.

    r_0 = z,  v_m = argmin_j ||r_{m-1} - e_m^j||,  r_m = r_{m-1} - e_m^{v_m},  Q(z) = sum_m e_m^{v_m}
    codebook_loss   = sum_m ||sg[r_{m-1}] - e_m^{v_m}||^2
    commitment_loss = sum_m ||r_{m-1} - sg[e_m^{v_m}]||^2

(squared errors averaged over batch and dimensions); the decoder sees
z + sg[Q(z) - z] (straight-through) or, with ``rotation_trick``,
vector-quantize-pytorch's rotation-trick transform of z onto Q(z).

The nearest-code search is a plain matmul argmin rather than
vector-quantize-pytorch's ``ResidualVQ``: that class's learnable-codebook loss
weighs the codebook and commitment terms equally (no beta), its per-level
straight-through sum scales the encoder gradient by M, its K-Means
initialisation sees one batch and its DDP synchronisation is fixed when the
module is built (before Lightning starts the process group), and its
assignment of 100k latents measured about 4x slower. Codebooks are
initialised by K-Means over the residuals of all items, level by level, and
dead codes are restarted from item residuals (``restart_dead_codes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to

from grcm.tokenizers.kmeans import fit_kmeans
from grcm.tokenizers.unique_token import assign_unique_tokens


@dataclass
class QuantizerOutput:
    """Result of one residual quantisation pass over a batch of B latents of dim d, M levels."""

    quantized: torch.Tensor  # (B, d): Q(z) in value, gradient passed to z (straight-through or rotation)
    codes: torch.Tensor  # (B, M) long: v_1..v_M
    code_vectors: torch.Tensor  # (M, B, d): e_m^{v_m}, differentiable w.r.t. the codebooks
    codebook_loss: torch.Tensor  # scalar
    commitment_loss: torch.Tensor  # scalar


class ResidualQuantizer(nn.Module):
    """M-level residual quantiser of d-dim latents with M separate codebooks of C codes.

    Args:
        dim: latent dimension d.
        num_levels: number of codebooks M.
        codebook_size: codes per codebook C.
        rotation_trick: pass gradients to z with the rotation trick
            (Fifty et al. 2024, arXiv:2410.06424) instead of the straight-through estimator.
    """

    def __init__(self, dim: int, num_levels: int = 2, codebook_size: int = 128, rotation_trick: bool = False):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1; got {num_levels}")
        self.dim = dim
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.rotation_trick = rotation_trick
        self.codebooks = nn.Parameter(torch.randn(num_levels, codebook_size, dim) / dim**0.5)

    @torch.no_grad()
    def set_codebook(self, level: int, vectors: torch.Tensor) -> None:
        """Overwrite codebook ``level`` with vectors (C, d)."""
        self.codebooks[level].copy_(vectors.to(self.codebooks))

    @torch.no_grad()
    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Codes of latents z (B, d) -> (B, M) long: the nearest code of each residual, level by level."""
        residual = z.detach().to(self.codebooks.dtype)
        codebooks = self.codebooks.detach()
        codes = []
        for codebook in codebooks:
            # ||r - e||^2 = ||r||^2 - 2 r.e + ||e||^2; ||r||^2 is the same for every code.
            nearest = (codebook.pow(2).sum(-1) - 2.0 * residual @ codebook.T).argmin(dim=-1)
            codes.append(nearest)
            residual = residual - codebook[nearest]
        return torch.stack(codes, dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors e_m^{v_m}: codes (B, M) -> (M, B, d), differentiable w.r.t. the codebooks."""
        return torch.stack([self.codebooks[level][codes[:, level]] for level in range(self.num_levels)])

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Q = sum_m e_m^{v_m}: codes (B, M) -> (B, d)."""
        return self.lookup(codes).sum(dim=0)

    @staticmethod
    def residuals(z: torch.Tensor, code_vectors: torch.Tensor) -> torch.Tensor:
        """Residual before each level, r_0..r_{M-1}: z (B, d), code_vectors (M, B, d) -> (M, B, d).

        Earlier code vectors enter detached, so a level's commitment gradient reaches z only.
        """
        previous = torch.cumsum(code_vectors.detach(), dim=0) - code_vectors.detach()
        return z.unsqueeze(0) - previous

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise z (B, d) and compute the codebook and commitment losses."""
        codes = self.quantize(z)
        code_vectors = self.lookup(codes)
        residuals = self.residuals(z, code_vectors)
        codebook_loss = z.new_zeros(())
        commitment_loss = z.new_zeros(())
        for level in range(self.num_levels):
            codebook_loss = codebook_loss + F.mse_loss(code_vectors[level], residuals[level].detach())
            commitment_loss = commitment_loss + F.mse_loss(residuals[level], code_vectors[level].detach())
        total = code_vectors.detach().sum(dim=0)
        if self.rotation_trick:
            quantized = rotate_to(z, total)
        else:
            quantized = z + (total - z).detach()
        return QuantizerOutput(quantized, codes, code_vectors, codebook_loss, commitment_loss)

    @torch.no_grad()
    def init_from_data(self, z: torch.Tensor, *, seed: int = 0, num_iters: int = 25) -> torch.Tensor:
        """K-Means-initialise every codebook on the residuals of z (N, d), level by level.

        Returns the codes of z under the new codebooks (N, M).
        """
        z = z.detach().float()
        for level in range(self.num_levels):
            residual = z - self.lookup(self.quantize(z))[:level].sum(dim=0)
            centroids = fit_kmeans(residual, self.codebook_size, seed=seed + level, num_iters=num_iters)
            self.set_codebook(level, torch.from_numpy(centroids))
        return self.quantize(z)

    @torch.no_grad()
    def restart_dead_codes(
        self,
        z: torch.Tensor,
        *,
        min_usage: int = 1,
        generator: torch.Generator | None = None,
        max_rounds: int = 4,
    ) -> dict[int, torch.Tensor]:
        """Move codes used by fewer than ``min_usage`` of the latents z (N, d) onto item residuals.

        Level by level, each dead code is replaced by the residual r_{m-1} of
        an item drawn (without replacement) with probability proportional to
        its squared quantisation error at that level, so badly served regions
        get codes first. Items are only drawn from codes that keep at least
        ``max(min_usage, 1)`` items; a moved code can still capture the last
        items of a neighbour, so up to ``max_rounds`` rounds run per level.
        Returns {level: LongTensor of the distinct restarted code ids}.
        """
        z = z.detach().float()
        restarted: dict[int, torch.Tensor] = {}
        for level in range(self.num_levels):
            moved = [self._restart_level(z, level, min_usage, generator)]
            while len(moved) < max_rounds and moved[-1].numel() > 0:
                moved.append(self._restart_level(z, level, min_usage, generator))
            restarted[level] = torch.unique(torch.cat(moved))
        return restarted

    def _restart_level(
        self, z: torch.Tensor, level: int, min_usage: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """One restart round of codebook ``level`` over latents z (N, d); returns the moved code ids."""
        keep_at_least = max(min_usage, 1)
        codes = self.quantize(z)
        vectors = self.lookup(codes)
        residual = z - vectors[:level].sum(dim=0)
        nearest = codes[:, level]
        usage = torch.bincount(nearest, minlength=self.codebook_size)
        dead = (usage < min_usage).nonzero(as_tuple=True)[0]
        error = (residual - vectors[level]).pow(2).sum(-1)
        weight = (error * (usage[nearest] > keep_at_least)).cpu()
        num_draws = min(dead.numel(), int((weight > 0).sum()))
        if num_draws == 0:
            return torch.zeros(0, dtype=torch.long)
        drawn = torch.multinomial(weight, num_draws, replacement=False, generator=generator).to(z.device)
        source = nearest[drawn]
        earlier_from_source = assign_unique_tokens(source.unsqueeze(1)).to(z.device)
        drawn = drawn[earlier_from_source < usage[source] - keep_at_least]
        dead = dead[: drawn.numel()]
        new_code = self.codebooks[level].detach().clone()
        new_code[dead] = residual[drawn].to(new_code)
        self.set_codebook(level, new_code)
        return dead.cpu()
