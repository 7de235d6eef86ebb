"""The item side of the hybrid tower (PIG): token selection, pseudo-query generation, cross-attention pooling.

Plain ``nn.Module`` maths, no Lightning. Shapes: ``B`` items, ``T`` tokens per item
(padded), ``d`` the token width inside the item tower, ``E`` the shared embedding size.
Masks are bool, True on real tokens; padded tokens get exactly zero attention weight
everywhere, so their values never change any output.

Pipeline (:class:`HybridItemEncoder`)::

    tokens (B, T, D) -> TokenEncoder -> (B, T, d)
      -> TokenSelector: top-k tokens by the pooled token's attention    (optional)
      -> PseudoQueryGenerator: one learned query attends to them -> pseudo-query (B, E)
      -> CrossAttentionPooling: the pseudo-query attends to all tokens -> item embedding (B, E)

Without the generator the pooling query is one learned vector shared by all items
(X-Pool-style pooling with a learned query); without the selector the generator reads
all tokens. Nothing depends on a real query, so item embeddings are computed once and
indexed like the dual tower's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from grcm.rerank.text_encoder import masked_mean


class TokenEncoder(nn.Module):
    """Per-token residual MLP ``(B, T, D) -> (B, T, d)``; tokens do not mix."""

    def __init__(self, feature_dim: int, width: int):
        super().__init__()
        self.input = nn.Linear(feature_dim, width)
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.input(tokens)
        return hidden + self.mlp(hidden)


class CrossAttention(nn.Module):
    """Multi-head attention of ``Lq`` queries over masked keys/values.

    Args:
        width: model width ``d`` (divisible by ``num_heads``).
        num_heads: attention heads.
    """

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"attention width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(
        self, queries: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend.

        Args:
            queries: ``(B, Lq, d)``.
            tokens: ``(B, T, d)`` keys and values.
            mask: ``(B, T)`` bool, True = may be attended; every row needs one True.
            bias: optional ``(B, T)`` added to every head's attention logits.

        Returns:
            ``(B, Lq, d)`` outputs and ``(B, Lq, T)`` attention weights (mean over heads);
            masked positions have weight exactly 0.
        """
        b, lq, width = queries.shape
        heads, head_dim = self.num_heads, width // self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, -1, heads, head_dim).transpose(1, 2)  # (B, h, L, hd)

        q, k, v = split(self.query(queries)), split(self.key(tokens)), split(self.value(tokens))
        logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # (B, h, Lq, T)
        if bias is not None:
            logits = logits + bias[:, None, None, :]
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        weights = logits.softmax(dim=-1)
        # masked values are zeroed too, so even non-finite padding cannot leak through 0 * value
        v = v.masked_fill(~mask[:, None, :, None], 0.0)
        out = (weights @ v).transpose(1, 2).reshape(b, lq, width)
        return self.out(out), weights.mean(dim=1)


class TokenSelector(nn.Module):
    """Informativeness selection: keep the ``top_k`` tokens the pooled token attends to most.

    The masked mean of the tokens plays the role of the ``[CLS]`` token. Its attention
    logits over the tokens rank them; the selected tokens' log-attention is returned as a
    bias for the generator, which is how the selector learns (top-k itself has no gradient).
    """

    def __init__(self, width: int, top_k: int):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        self.query, self.key = nn.Linear(width, width), nn.Linear(width, width)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, T, d)``, ``(B, T)`` -> selected ``(B, k, d)``, their mask ``(B, k)``, log-attention
        bias ``(B, k)`` and the indices ``(B, k)`` into ``T``; ``k = min(top_k, T)``; an item with
        fewer than ``k`` real tokens keeps all of them (the rest of its row is masked)."""
        pooled = masked_mean(tokens, mask)  # (B, d)
        logits = (self.query(pooled)[:, None, :] * self.key(tokens)).sum(-1) / math.sqrt(tokens.shape[-1])
        log_attention = logits.masked_fill(~mask, float("-inf")).log_softmax(dim=1)  # (B, T)
        k = min(self.top_k, tokens.shape[1])
        # rank by score, padding last; ties by position (stable)
        order = log_attention.argsort(dim=1, descending=True, stable=True)[:, :k]
        selected_mask = mask.gather(1, order)
        selected = tokens.gather(1, order[:, :, None].expand(-1, -1, tokens.shape[-1]))
        bias = log_attention.gather(1, order).masked_fill(~selected_mask, 0.0)
        return selected, selected_mask, bias, order


class PseudoQueryGenerator(nn.Module):
    """One learned query token attends to an item's (selected) tokens -> a pseudo-query ``(B, E)``.

    Trained to match the text embedding of the item's real captions (see
    :func:`pseudo_query_loss`), so it predicts what a caption of the item would say.
    """

    def __init__(self, width: int, embed_dim: int, num_heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attention = CrossAttention(width, num_heads)
        self.norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.projection = nn.Linear(width, embed_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, k, d)`` tokens, ``(B, k)`` mask, optional ``(B, k)`` bias -> ``(B, E)`` unit pseudo-queries."""
        query = self.query.expand(tokens.shape[0], -1, -1)
        hidden = query + self.attention(query, tokens, mask, bias)[0]
        hidden = hidden + self.ffn(self.norm(hidden))
        return F.normalize(self.projection(hidden[:, 0]), dim=-1)


class CrossAttentionPooling(nn.Module):
    """X-Pool-style pooling: a query (pseudo-query or learned) attends to all item tokens -> ``(B, E)``."""

    def __init__(self, width: int, embed_dim: int, num_heads: int):
        super().__init__()
        self.query_projection = nn.Linear(embed_dim, width)
        self.attention = CrossAttention(width, num_heads)
        self.norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.final_norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim)

    def forward(
        self, query: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, E)`` query, ``(B, T, d)`` tokens, ``(B, T)`` mask -> ``(B, E)`` unit embeddings and
        ``(B, T)`` attention weights."""
        q = self.query_projection(query)[:, None, :]
        pooled, weights = self.attention(q, tokens, mask)
        hidden = pooled + self.ffn(self.norm(pooled))
        return F.normalize(self.projection(self.final_norm(hidden[:, 0])), dim=-1), weights[:, 0]


class HybridItemEncoder(nn.Module):
    """Item tokens -> one stored vector, with the pseudo-query of PIG (see the module docstring).

    Args:
        feature_dim: token feature dimension ``D``.
        embed_dim: shared embedding size ``E``.
        width: token width ``d`` inside the tower.
        num_heads: attention heads.
        use_selector: keep only the ``top_k`` most informative tokens for the generator.
        top_k: tokens kept by the selector.
        use_generator: pool with the generated pseudo-query; off = one learned pooling query.
    """

    def __init__(
        self,
        feature_dim: int,
        embed_dim: int,
        width: int = 256,
        num_heads: int = 4,
        use_selector: bool = True,
        top_k: int = 4,
        use_generator: bool = True,
    ):
        super().__init__()
        self.token_encoder = TokenEncoder(feature_dim, width)
        self.selector = TokenSelector(width, top_k) if use_selector and use_generator else None
        self.generator = PseudoQueryGenerator(width, embed_dim, num_heads) if use_generator else None
        self.learned_query = None if use_generator else nn.Parameter(torch.randn(1, embed_dim) * 0.02)
        self.pooling = CrossAttentionPooling(width, embed_dim, num_heads)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, T, D)`` tokens and ``(B, T)`` mask -> ``(B, E)`` unit item embeddings and the ``(B, E)``
        pseudo-queries (None without the generator)."""
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every item needs at least one real token (a row of the token mask is all False)")
        hidden = self.token_encoder(tokens)
        if self.generator is None:
            pseudo = None
            query = self.learned_query.expand(tokens.shape[0], -1)
        else:
            if self.selector is None:
                pseudo = self.generator(hidden, mask)
            else:
                selected, selected_mask, bias, _ = self.selector(hidden, mask)
                pseudo = self.generator(selected, selected_mask, bias)
            query = pseudo
        embedding, _ = self.pooling(query, hidden, mask)
        return embedding, pseudo


def pseudo_query_loss(pseudo_queries: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Generation loss: mean squared L2 distance ``(B, E)`` vs ``(B, E)`` -> scalar (unit vectors: 2 - 2 cos)."""
    return (pseudo_queries - text_embeddings).pow(2).sum(dim=-1).mean()
