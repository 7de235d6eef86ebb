"""RQ-VAE: MLP encoder -> residual quantiser -> symmetric MLP decoder (ACE/CART fine tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grcm.tokenizers.residual_quantizer import ResidualQuantizer


def build_mlp(dims: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers through ``dims`` with ELU (and optional dropout) between them, none after the last."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(dims) - 2:
            layers.append(nn.ELU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


@dataclass
class RQVAEOutput:
    """One RQ-VAE pass over a batch of B inputs of dim D with M codebooks."""

    reconstruction: torch.Tensor  # (B, D)
    codes: torch.Tensor  # (B, M) long
    reconstruction_loss: torch.Tensor  # scalar, mean squared error
    codebook_loss: torch.Tensor  # scalar, sum over levels of ||sg[r] - e||^2
    commitment_loss: torch.Tensor  # scalar, sum over levels of ||r - sg[e]||^2

    def total_loss(self, alpha: float, beta: float) -> torch.Tensor:
        """L_recon + alpha * (codebook + beta * commitment)."""
        return self.reconstruction_loss + alpha * (self.codebook_loss + beta * self.commitment_loss)


class RQVAE(nn.Module):
    """Residual-quantised autoencoder producing M fine tokens per input vector.

    Args:
        input_dim: D, dimension of the vectors to tokenize (item embeddings or their K-Means residuals).
        latent_dim: d, dimension of the quantised latent (paper: 64).
        hidden_dims: encoder hidden widths (paper: 512, 256, 128); the decoder mirrors them.
        num_levels: M codebooks (paper: 2).
        codebook_size: C codes per codebook (paper: 128).
        rotation_trick: rotation-trick gradients instead of straight-through.
        dropout: dropout between hidden layers.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 64,
        hidden_dims: Sequence[int] = (512, 256, 128),
        num_levels: int = 2,
        codebook_size: int = 128,
        rotation_trick: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = list(hidden_dims)
        self.encoder = build_mlp([input_dim, *hidden, latent_dim], dropout)
        self.decoder = build_mlp([latent_dim, *reversed(hidden), input_dim], dropout)
        self.quantizer = ResidualQuantizer(latent_dim, num_levels, codebook_size, rotation_trick)

    def forward(self, x: torch.Tensor) -> RQVAEOutput:
        """Encode, quantise and decode x (B, D)."""
        z = self.encoder(x)
        quantized = self.quantizer(z)
        reconstruction = self.decoder(quantized.quantized)
        return RQVAEOutput(
            reconstruction=reconstruction,
            codes=quantized.codes,
            reconstruction_loss=F.mse_loss(reconstruction, x),
            codebook_loss=quantized.codebook_loss,
            commitment_loss=quantized.commitment_loss,
        )

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of x (B, D) -> (B, M) long, without updating anything."""
        return self.quantizer.quantize(self.encoder(x))

    @torch.no_grad()
    def reconstruct_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Decoder output for codes (B, M) -> (B, D)."""
        return self.decoder(self.quantizer.decode_codes(codes))
