"""What the retriever's encoder hands its decoder: encoder layer outputs, projected memory, decoder cache.

These are the plain containers shared by the scratch encoder (:mod:`grcm.retriever.model`), the
pretrained one (:mod:`grcm.retriever.pretrained_encoder`) and the incremental decoder
(:mod:`grcm.retriever.incremental`); they depend on nothing else in grcm.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

DecoderCache = tuple[tuple[Tensor, Tensor], ...]
"""Self-attention keys and values of the decoded positions: per decoder layer, two (R, h, t, d/h) tensors."""


@dataclass
class EncoderOutput:
    """All encoder layer outputs of one query batch.

    Attributes:
        layer_outputs: S tensors (B, T, d), layer 1 first; padding positions are zero.
        attention_mask: (B, T) bool, True = real token.
    """

    layer_outputs: tuple[Tensor, ...]
    attention_mask: Tensor

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def key_padding_mask(self) -> Tensor:
        """(B, T) bool, True = padding (the ``nn.MultiheadAttention`` convention)."""
        return ~self.attention_mask

    def repeat_interleave(self, k: int) -> EncoderOutput:
        """Repeat every query ``k`` times (row ``b*k + j`` is query b), as beams are laid out."""
        return EncoderOutput(
            layer_outputs=tuple(layer.repeat_interleave(k, dim=0) for layer in self.layer_outputs),
            attention_mask=self.attention_mask.repeat_interleave(k, dim=0),
        )


@dataclass
class DecoderMemory:
    """Encoder memory of B queries projected for every decoder layer's cross block (incremental decoding).

    Attributes:
        layers: per decoder layer, the cross block's ``project_memory`` output (tensors (B, h, T, d/h)).
        attn_mask: (B, 1, 1, T) bool, True = real token (the ``scaled_dot_product_attention`` convention).
    """

    layers: tuple[tuple[Tensor, ...], ...]
    attn_mask: Tensor

    @property
    def batch_size(self) -> int:
        return self.attn_mask.shape[0]
