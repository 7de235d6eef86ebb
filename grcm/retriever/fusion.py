"""Cross-attention blocks that let the SID decoder read the query encoder.

Three interchangeable blocks share one call signature::

    block(y, encoder_layers, key_padding_mask) -> (B, Q, d)

with ``y`` the (already layer-normalised) decoder states (B, Q, d),
``encoder_layers`` the outputs of all S encoder layers, each (B, T, d), and
``key_padding_mask`` (B, T) bool with True marking *padding* (the convention of
``nn.MultiheadAttention``).

- :class:`StandardCrossAttention` (``fusion="none"``): ordinary cross-attention
  to the last encoder layer.
- :class:`CoarseFusion` (ACE): ``Z = W[E_1, ..., E_S] + b`` over the
  feature-concatenated layer outputs, ``G(Y, Z) = (1/S) * sigmoid(Attn(W_q Y, W_k Z, W_v Z))``.
- :class:`FineFusion` (ACE): ``L(Y, E) = sum_i alpha_i * Attn_i(Y, E_i)`` with
  element-wise gates ``alpha_i = sigmoid(W_i [Y, Attn_i(Y, E_i)] + b_i)``; every
  encoder layer has its own attention and gate.
- :class:`CoarseToFineFusion` (``fusion="ace"``): ``G + L``.

How the result enters the decoder layer: the fused output ``G + L`` takes the
place of the cross-attention sub-layer output, i.e. the decoder layer computes
``y = y + Dropout(block(LayerNorm(y), E))`` (pre-LN residual), and that ``y``
(after the feed-forward sub-layer) is the input of the next decoder layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

FUSION_CHOICES = ("ace", "none")


def _check_layers(encoder_layers: Sequence[Tensor], expected: int, block: str) -> None:
    if len(encoder_layers) != expected:
        raise ValueError(
            f"{block} was built for {expected} encoder layer outputs but received {len(encoder_layers)}; "
            "build it with num_encoder_layers equal to the encoder depth."
        )


class StandardCrossAttention(nn.Module):
    """Plain multi-head cross-attention to the last encoder layer (``fusion="none"``).

    Args:
        d_model: model width d.
        num_heads: attention heads (must divide ``d_model``).
        num_encoder_layers: S, accepted for a uniform constructor; only ``E_S`` is read.
        dropout: dropout on the attention weights.
    """

    def __init__(self, d_model: int, num_heads: int, num_encoder_layers: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_encoder_layers = num_encoder_layers
        self.attention = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)

    def forward(self, y: Tensor, encoder_layers: Sequence[Tensor], key_padding_mask: Tensor | None) -> Tensor:
        """Attend from ``y`` (B, Q, d) to ``encoder_layers[-1]`` (B, T, d); returns (B, Q, d)."""
        _check_layers(encoder_layers, self.num_encoder_layers, type(self).__name__)
        memory = encoder_layers[-1]
        out, _ = self.attention(y, memory, memory, key_padding_mask=key_padding_mask, need_weights=False)
        return out


class CoarseFusion(nn.Module):
    """ACE coarse fusion over all encoder layers at once.

    ``Z = W [E_1, ..., E_S] + b`` (concatenation along features, (B, T, S*d) -> (B, T, d)),
    then ``G = sigmoid(MultiheadAttention(Y, Z, Z)) / S``, so every entry of the
    output lies in ``(0, 1/S)``. The attention's own ``W_q, W_k, W_v`` (and output
    projection) are those of ``nn.MultiheadAttention``.
    """

    def __init__(self, d_model: int, num_heads: int, num_encoder_layers: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_encoder_layers = num_encoder_layers
        self.merge = nn.Linear(num_encoder_layers * d_model, d_model)
        self.attention = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)

    def forward(self, y: Tensor, encoder_layers: Sequence[Tensor], key_padding_mask: Tensor | None) -> Tensor:
        """``y`` (B, Q, d), S tensors (B, T, d), mask (B, T) True=pad -> (B, Q, d) in (0, 1/S)."""
        _check_layers(encoder_layers, self.num_encoder_layers, type(self).__name__)
        merged = self.merge(torch.cat(list(encoder_layers), dim=-1))
        attended, _ = self.attention(y, merged, merged, key_padding_mask=key_padding_mask, need_weights=False)
        return torch.sigmoid(attended) / self.num_encoder_layers


class FineFusion(nn.Module):
    """ACE fine fusion: gated sum of per-layer cross-attentions.

    For each encoder layer i: ``A_i = Attn_i(Y, E_i)`` and
    ``alpha_i = sigmoid(W_i [Y, A_i] + b_i)`` (element-wise, (B, Q, d));
    the output is ``sum_i alpha_i * A_i``.
    """

    def __init__(self, d_model: int, num_heads: int, num_encoder_layers: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_encoder_layers = num_encoder_layers
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
            for _ in range(num_encoder_layers)
        )
        self.gates = nn.ModuleList(nn.Linear(2 * d_model, d_model) for _ in range(num_encoder_layers))

    def forward(
        self,
        y: Tensor,
        encoder_layers: Sequence[Tensor],
        key_padding_mask: Tensor | None,
        return_gates: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``y`` (B, Q, d), S tensors (B, T, d), mask (B, T) True=pad -> (B, Q, d).

        With ``return_gates=True`` also returns the gates ``alpha`` stacked as (S, B, Q, d).
        """
        _check_layers(encoder_layers, self.num_encoder_layers, type(self).__name__)
        fused = torch.zeros_like(y)
        gates = []
        for attention, gate, memory in zip(self.attentions, self.gates, encoder_layers):
            attended, _ = attention(y, memory, memory, key_padding_mask=key_padding_mask, need_weights=False)
            alpha = torch.sigmoid(gate(torch.cat([y, attended], dim=-1)))
            fused = fused + alpha * attended
            gates.append(alpha)
        if return_gates:
            return fused, torch.stack(gates)
        return fused


class CoarseToFineFusion(nn.Module):
    """ACE coarse-to-fine fusion (``fusion="ace"``): ``CoarseFusion + FineFusion``."""

    def __init__(self, d_model: int, num_heads: int, num_encoder_layers: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.coarse = CoarseFusion(d_model, num_heads, num_encoder_layers, dropout)
        self.fine = FineFusion(d_model, num_heads, num_encoder_layers, dropout)

    def forward(self, y: Tensor, encoder_layers: Sequence[Tensor], key_padding_mask: Tensor | None) -> Tensor:
        """``y`` (B, Q, d), S tensors (B, T, d), mask (B, T) True=pad -> (B, Q, d)."""
        return self.coarse(y, encoder_layers, key_padding_mask) + self.fine(y, encoder_layers, key_padding_mask)


def build_cross_block(
    fusion: str, d_model: int, num_heads: int, num_encoder_layers: int, dropout: float = 0.1
) -> nn.Module:
    """The decoder's cross block for ``fusion`` in ``FUSION_CHOICES`` ("ace" or "none")."""
    if fusion == "ace":
        return CoarseToFineFusion(d_model, num_heads, num_encoder_layers, dropout)
    if fusion == "none":
        return StandardCrossAttention(d_model, num_heads, num_encoder_layers, dropout)
    raise ValueError(f"fusion must be one of {FUSION_CHOICES}, got {fusion!r}.")
