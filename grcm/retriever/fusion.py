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
  feature-concatenated layer outputs, ``G(Y, Z) = (1/S) * sigmoid(Attn(W_q Y, W_k Z, W_v Z))`` as
  printed in the paper (``coarse_gate="sigmoid"``), or the self-gating ``(1/S) * A * sigmoid(A)``
  with ``A = Attn(...)`` of the cited reference implementation (``coarse_gate="silu"``).
- :class:`FineFusion` (ACE): ``L(Y, E) = sum_i alpha_i * Attn_i(Y, E_i)`` with
  element-wise gates ``alpha_i = sigmoid(W_i [Y, Attn_i(Y, E_i)] + b_i)``; every
  encoder layer has its own attention and gate.
- :class:`CoarseToFineFusion` (``fusion="ace"``): ``G + L``.

How the result enters the decoder layer: the fused output ``G + L`` takes the
place of the cross-attention sub-layer output, i.e. the decoder layer computes
``y = y + Dropout(block(LayerNorm(y), E))`` (pre-LN residual), and that ``y``
(after the feed-forward sub-layer) is the input of the next decoder layer.

Incremental decoding: the encoder memory does not change while a query's SID
is decoded, so every block splits into ``project_memory(encoder_layers)``
(once per query batch: ACE's merge ``Z = W[E_1..E_S] + b`` and the keys and
values of every cross-attention, a tuple of (B, h, T, d/h) tensors) and
``forward_cached(y, memory, attn_mask)`` (per step: queries, attention, gates).
Both give what ``forward`` gives, in evaluation mode (no dropout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FUSION_CHOICES = ("ace", "none")
COARSE_GATE_CHOICES = ("sigmoid", "silu")


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, d) -> (B, h, T, d/h)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, h, T, d/h) -> (B, T, d)."""
    return x.transpose(1, 2).flatten(-2)


def _in_projection(attention: nn.MultiheadAttention, part: int) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of the query (0), key (1) or value (2) projection of ``attention``."""
    width = attention.embed_dim
    rows = slice(part * width, (part + 1) * width)
    bias = attention.in_proj_bias
    return attention.in_proj_weight[rows], None if bias is None else bias[rows]


def project_keys_values(attention: nn.MultiheadAttention, memory: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values of ``memory`` (B, T, d) under ``attention``'s projections, each (B, h, T, d/h)."""
    keys = F.linear(memory, *_in_projection(attention, 1))
    values = F.linear(memory, *_in_projection(attention, 2))
    return split_heads(keys, attention.num_heads), split_heads(values, attention.num_heads)


def attend_projected(
    attention: nn.MultiheadAttention, y: Tensor, keys: Tensor, values: Tensor, attn_mask: Tensor | None
) -> Tensor:
    """``attention(y, memory, memory)`` from projected keys and values, without dropout.

    Args:
        attention: the ``nn.MultiheadAttention`` whose query and output projections apply.
        y: (B, Q, d) queries.
        keys, values: (B, h, T, d/h) from :func:`project_keys_values`.
        attn_mask: (B, 1, 1, T) bool, True = attend (real token), or None.

    Returns:
        (B, Q, d).
    """
    queries = split_heads(F.linear(y, *_in_projection(attention, 0)), attention.num_heads)
    attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=attn_mask)
    return attention.out_proj(merge_heads(attended))


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

    def project_memory(self, encoder_layers: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """S tensors (B, T, d) -> keys and values of ``E_S``, each (B, h, T, d/h)."""
        _check_layers(encoder_layers, self.num_encoder_layers, type(self).__name__)
        return project_keys_values(self.attention, encoder_layers[-1])

    def forward_cached(self, y: Tensor, memory: Sequence[Tensor], attn_mask: Tensor | None) -> Tensor:
        """``y`` (B, Q, d), ``memory`` from :meth:`project_memory`, mask (B, 1, 1, T) True=attend -> (B, Q, d)."""
        keys, values = memory
        return attend_projected(self.attention, y, keys, values, attn_mask)


class CoarseFusion(nn.Module):
    """ACE coarse fusion over all encoder layers at once.

    ``Z = W [E_1, ..., E_S] + b`` (concatenation along features, (B, T, S*d) -> (B, T, d)),
    then, with ``A = MultiheadAttention(Y, Z, Z)``, ``G = sigmoid(A) / S`` (``gate="sigmoid"``, as
    printed; every entry lies in ``(0, 1/S)``) or ``G = A * sigmoid(A) / S`` (``gate="silu"``,
    self-gating: unbounded above, so the coarse path can carry signed information). The attention's
    own ``W_q, W_k, W_v`` (and output projection) are those of ``nn.MultiheadAttention``.
    """

    def __init__(
        self, d_model: int, num_heads: int, num_encoder_layers: int, dropout: float = 0.1, gate: str = "sigmoid"
    ) -> None:
        super().__init__()
        if gate not in COARSE_GATE_CHOICES:
            raise ValueError(f"coarse_gate must be one of {COARSE_GATE_CHOICES}, got {gate!r}.")
        self.num_encoder_layers = num_encoder_layers
        self.gate = gate
        self.merge = nn.Linear(num_encoder_layers * d_model, d_model)
        self.attention = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)

    def forward(self, y: Tensor, encoder_layers: Sequence[Tensor], key_padding_mask: Tensor | None) -> Tensor:
        """``y`` (B, Q, d), S tensors (B, T, d), mask (B, T) True=pad -> (B, Q, d) (in (0, 1/S) for "sigmoid")."""
        _check_layers(encoder_layers, self.num_encoder_layers, type(self).__name__)
        merged = self.merge(torch.cat(list(encoder_layers), dim=-1))
        attended, _ = self.attention(y, merged, merged, key_padding_mask=key_padding_mask, need_weights=False)
        return self._gate(attended)

    def _gate(self, attended: Tensor) -> Tensor:
        """``A`` (B, Q, d) -> ``sigmoid(A) / S`` or ``A * sigmoid(A) / S`` (``self.gate``)."""
        gated = torch.sigmoid(attended) if self.gate == "sigmoid" else nn.functional.silu(attended)
        return gated / self.num_encoder_layers

    def project_memory(self, encoder_layers: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """S tensors (B, T, d) -> keys and values of ``Z = W[E_1..E_S] + b``, each (B, h, T, d/h)."""
        _check_layers(encoder_layers, self.num_encoder_layers, type(self).__name__)
        merged = self.merge(torch.cat(list(encoder_layers), dim=-1))
        return project_keys_values(self.attention, merged)

    def forward_cached(self, y: Tensor, memory: Sequence[Tensor], attn_mask: Tensor | None) -> Tensor:
        """``y`` (B, Q, d), ``memory`` from :meth:`project_memory`, mask (B, 1, 1, T) True=attend -> (B, Q, d)."""
        keys, values = memory
        return self._gate(attend_projected(self.attention, y, keys, values, attn_mask))


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

    def project_memory(self, encoder_layers: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """S tensors (B, T, d) -> 2S tensors (B, h, T, d/h): keys and values of ``E_i`` under ``Attn_i``."""
        _check_layers(encoder_layers, self.num_encoder_layers, type(self).__name__)
        projected: list[Tensor] = []
        for attention, memory in zip(self.attentions, encoder_layers):
            projected.extend(project_keys_values(attention, memory))
        return tuple(projected)

    def forward_cached(self, y: Tensor, memory: Sequence[Tensor], attn_mask: Tensor | None) -> Tensor:
        """``y`` (B, Q, d), ``memory`` from :meth:`project_memory`, mask (B, 1, 1, T) True=attend -> (B, Q, d)."""
        fused = torch.zeros_like(y)
        for index, (attention, gate) in enumerate(zip(self.attentions, self.gates)):
            attended = attend_projected(attention, y, memory[2 * index], memory[2 * index + 1], attn_mask)
            fused = fused + torch.sigmoid(gate(torch.cat([y, attended], dim=-1))) * attended
        return fused


class CoarseToFineFusion(nn.Module):
    """ACE coarse-to-fine fusion (``fusion="ace"``): ``CoarseFusion + FineFusion``; ``coarse_gate`` as in
    :class:`CoarseFusion`."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_encoder_layers: int,
        dropout: float = 0.1,
        coarse_gate: str = "sigmoid",
    ) -> None:
        super().__init__()
        self.coarse = CoarseFusion(d_model, num_heads, num_encoder_layers, dropout, gate=coarse_gate)
        self.fine = FineFusion(d_model, num_heads, num_encoder_layers, dropout)

    def forward(self, y: Tensor, encoder_layers: Sequence[Tensor], key_padding_mask: Tensor | None) -> Tensor:
        """``y`` (B, Q, d), S tensors (B, T, d), mask (B, T) True=pad -> (B, Q, d)."""
        return self.coarse(y, encoder_layers, key_padding_mask) + self.fine(y, encoder_layers, key_padding_mask)

    def project_memory(self, encoder_layers: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """S tensors (B, T, d) -> 2 + 2S tensors (B, h, T, d/h): the coarse block's, then the fine block's."""
        return self.coarse.project_memory(encoder_layers) + self.fine.project_memory(encoder_layers)

    def forward_cached(self, y: Tensor, memory: Sequence[Tensor], attn_mask: Tensor | None) -> Tensor:
        """``y`` (B, Q, d), ``memory`` from :meth:`project_memory`, mask (B, 1, 1, T) True=attend -> (B, Q, d)."""
        return self.coarse.forward_cached(y, memory[:2], attn_mask) + self.fine.forward_cached(y, memory[2:], attn_mask)


def build_cross_block(
    fusion: str,
    d_model: int,
    num_heads: int,
    num_encoder_layers: int,
    dropout: float = 0.1,
    coarse_gate: str = "sigmoid",
) -> nn.Module:
    """The decoder's cross block for ``fusion`` in ``FUSION_CHOICES`` ("ace" or "none").

    ``coarse_gate`` (``COARSE_GATE_CHOICES``) is the ACE coarse-fusion gate form; "none" ignores it.
    """
    if coarse_gate not in COARSE_GATE_CHOICES:
        raise ValueError(f"coarse_gate must be one of {COARSE_GATE_CHOICES}, got {coarse_gate!r}.")
    if fusion == "ace":
        return CoarseToFineFusion(d_model, num_heads, num_encoder_layers, dropout, coarse_gate)
    if fusion == "none":
        return StandardCrossAttention(d_model, num_heads, num_encoder_layers, dropout)
    raise ValueError(f"fusion must be one of {FUSION_CHOICES}, got {fusion!r}.")
