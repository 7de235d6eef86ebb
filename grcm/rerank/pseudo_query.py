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

``interaction="pig"`` replaces the single pseudo-query vector by a short *sequence* of
``L`` pseudo-query tokens, closer to the Hybrid-Tower paper::

    tokens (B, T, D) -> TokenEncoder -> (B, T, d)
      -> TokenSelector (optional)
      -> PseudoTokenGenerator: L learned slots attend to the tokens -> pseudo-query tokens (B, L, d)
         (projected to (B, L, E) for the generation loss against a caption's token embeddings)
      -> InteractionLayer x depth: item tokens read the pseudo-query tokens, then they read the items
      -> CrossAttentionPooling: the mean pseudo-query token attends to all item tokens -> (B, E)

Without the generator the ``L`` slots are learned vectors shared by all items (the same
interaction stack, nothing item-specific generated): the capacity control of the ablation.

``mean_skip`` adds a linear map of the tokens' mean to the gated pooled output (before normalising);
started as the identity with the gate at zero (:meth:`HybridItemEncoder.identity_init`), a tower over
pretrained token embeddings (e.g. MiniLM caption embeddings) begins at their zero-shot item vector.
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

    def __init__(self, width: int, embed_dim: int, num_heads: int, query_dim: int | None = None):
        super().__init__()
        self.query_projection = nn.Linear(embed_dim if query_dim is None else query_dim, width)
        self.attention = CrossAttention(width, num_heads)
        self.norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.final_norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, embed_dim)

    def forward(
        self, query: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, Q)`` query (``Q = query_dim``, default ``E``), ``(B, T, d)`` tokens, ``(B, T)`` mask ->
        ``(B, E)`` unit embeddings and ``(B, T)`` attention weights."""
        q = self.query_projection(query)[:, None, :]
        pooled, weights = self.attention(q, tokens, mask)
        hidden = pooled + self.ffn(self.norm(pooled))
        return F.normalize(self.projection(self.final_norm(hidden[:, 0])), dim=-1), weights[:, 0]


class AttentionBlock(nn.Module):
    """Pre-norm cross-attention + FFN block: ``x <- x + attn(LN(x), LN(kv)); x <- x + FFN(LN(x))``."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm, self.kv_norm, self.ffn_norm = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CrossAttention(width, num_heads)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, Lq, d)`` queries over ``(B, T, d)`` keys/values with ``(B, T)`` mask (optional ``(B, T)`` logit
        bias) -> ``(B, Lq, d)``."""
        x = x + self.attention(self.norm(x), self.kv_norm(kv), mask, bias)[0]
        return x + self.ffn(self.ffn_norm(x))


class PseudoTokenGenerator(nn.Module):
    """``L`` learned slots attend to an item's (selected) tokens in ``layers`` blocks -> ``L`` pseudo-query tokens.

    The slots' states ``(B, L, d)`` go on to the interaction stack; :meth:`embed` projects them into the
    text embedding space ``(B, L, E)``, where they are trained to match the token embeddings of the item's
    captions (:func:`token_generation_loss`).
    """

    def __init__(self, width: int, embed_dim: int, num_heads: int, num_tokens: int, layers: int = 1):
        super().__init__()
        if num_tokens < 1 or layers < 1:
            raise ValueError(f"pseudo_tokens and generator_layers must be >= 1, got {num_tokens} and {layers}")
        self.slots = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(AttentionBlock(width, num_heads) for _ in range(layers))
        self.projection = nn.Linear(width, embed_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, k, d)`` tokens, ``(B, k)`` mask, optional ``(B, k)`` bias -> ``(B, L, d)`` pseudo-query token states."""
        hidden = self.slots.expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            hidden = block(hidden, tokens, mask, bias)
        return hidden

    def embed(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)`` states -> ``(B, L, E)`` pseudo-query token embeddings (not normalised, like a text
        tower's projected token states, whose mean is the sentence embedding before normalisation)."""
        return self.projection(hidden)


class InteractionLayer(nn.Module):
    """Fine-grained interaction: item tokens read the pseudo-query tokens, then the pseudo-query tokens read
    the updated item tokens. ``(B, T, d)`` items, ``(B, T)`` mask, ``(B, L, d)`` pseudo -> both updated."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.items_read_pseudo = AttentionBlock(width, num_heads)
        self.pseudo_reads_items = AttentionBlock(width, num_heads)

    def forward(
        self, items: torch.Tensor, mask: torch.Tensor, pseudo: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        every_slot = torch.ones(pseudo.shape[:2], dtype=torch.bool, device=pseudo.device)
        items = self.items_read_pseudo(items, pseudo, every_slot)  # padded rows change, but are never read
        return items, self.pseudo_reads_items(pseudo, items, mask)


class HybridItemEncoder(nn.Module):
    """Item tokens -> one stored vector, with the pseudo-query of PIG (see the module docstring).

    Args:
        feature_dim: token feature dimension ``D``.
        embed_dim: shared embedding size ``E``.
        width: token width ``d`` inside the tower.
        num_heads: attention heads.
        use_selector: keep only the ``top_k`` most informative tokens for the generator.
        top_k: tokens kept by the selector.
        use_generator: pool with the generated pseudo-query; off = one learned pooling query
            (``"pig"``: ``L`` learned slots shared by all items).
        interaction: ``"pooling"`` (one pseudo-query vector, one pooling layer) or ``"pig"`` (``L``
            pseudo-query tokens, ``interaction_layers`` interaction layers, then pooling).
        pseudo_tokens: ``L``, pseudo-query tokens (``"pig"`` only).
        generator_layers: cross-attention blocks of the pseudo-token generator (``"pig"`` only).
        interaction_layers: depth of the interaction stack (``"pig"`` only; 0 = pooling only).
        mean_skip: add the pooled branch, as a unit vector scaled by a learned gate ``g``, to a linear map of the
            tokens' masked mean before normalising (``normalize(W mean(tokens) + g * normalize(pooled))``, ``g``
            starts at 1); with :meth:`identity_init` the tower starts as the normalised mean of its tokens, i.e.
            a pretrained feature space's zero-shot item vector.
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
        interaction: str = "pooling",
        pseudo_tokens: int = 8,
        generator_layers: int = 1,
        interaction_layers: int = 2,
        mean_skip: bool = False,
    ):
        super().__init__()
        self.skip = nn.Linear(feature_dim, embed_dim) if mean_skip else None
        self.branch_gate = nn.Parameter(torch.ones(())) if mean_skip else None
        if interaction not in ("pooling", "pig"):
            raise ValueError(f"interaction must be 'pooling' or 'pig', got {interaction!r}")
        if interaction_layers < 0:
            raise ValueError(f"interaction_layers must be >= 0, got {interaction_layers}")
        self.interaction = interaction
        self.token_encoder = TokenEncoder(feature_dim, width)
        self.selector = TokenSelector(width, top_k) if use_selector and use_generator else None
        if interaction == "pooling":
            self.generator = PseudoQueryGenerator(width, embed_dim, num_heads) if use_generator else None
            self.learned_query = None if use_generator else nn.Parameter(torch.randn(1, embed_dim) * 0.02)
            self.pooling = CrossAttentionPooling(width, embed_dim, num_heads)
            return
        if use_generator:
            self.generator = PseudoTokenGenerator(width, embed_dim, num_heads, pseudo_tokens, generator_layers)
            self.learned_query = None
        else:
            self.generator = None
            self.learned_query = nn.Parameter(torch.randn(1, pseudo_tokens, width) * 0.02)
        self.interactions = nn.ModuleList(InteractionLayer(width, num_heads) for _ in range(interaction_layers))
        self.pooling = CrossAttentionPooling(width, embed_dim, num_heads, query_dim=width)

    @torch.no_grad()
    def identity_init(self) -> None:
        """Start as the identity on the tokens' mean: the skip is the identity and the pooled branch's gate is
        zero, so every item's vector is its normalised mean token until training opens the gate (a ReZero-style
        residual: the gate's size, not the branch's weights, sets how far the tower leaves the mean)."""
        if self.skip is None or self.skip.weight.shape[0] != self.skip.weight.shape[1]:
            shape = None if self.skip is None else tuple(self.skip.weight.shape)
            raise ValueError(
                f"identity initialisation of the hybrid item tower needs mean_skip=true and embed_dim == the token "
                f"feature size, got skip {shape} (out, in); set model.mean_skip=true and model.embed_dim to the "
                "feature dimension"
            )
        nn.init.eye_(self.skip.weight)
        nn.init.zeros_(self.skip.bias)
        nn.init.zeros_(self.branch_gate)

    def _generate(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.selector is None:
            return self.generator(hidden, mask)
        selected, selected_mask, bias, _ = self.selector(hidden, mask)
        return self.generator(selected, selected_mask, bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, T, D)`` tokens and ``(B, T)`` mask -> ``(B, E)`` unit item embeddings and the pseudo-query
        (None without the generator): ``(B, E)`` unit vectors (``"pooling"``) or ``(B, L, E)`` pseudo-query
        token embeddings (``"pig"``, not normalised)."""
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every item needs at least one real token (a row of the token mask is all False)")
        hidden = self.token_encoder(tokens)
        if self.interaction == "pooling":
            pseudo = None if self.generator is None else self._generate(hidden, mask)
            query = self.learned_query.expand(tokens.shape[0], -1) if pseudo is None else pseudo
        else:
            if self.generator is None:
                slots, pseudo = self.learned_query.expand(tokens.shape[0], -1, -1), None
            else:
                slots = self._generate(hidden, mask)
                pseudo = self.generator.embed(slots)
            for layer in self.interactions:
                hidden, slots = layer(hidden, mask, slots)
            query = slots.mean(dim=1)
        pooled = self.pooling(query, hidden, mask)[0]
        if self.skip is None:
            return pooled, pseudo
        return F.normalize(self.skip(masked_mean(tokens, mask)) + self.branch_gate * pooled, dim=-1), pseudo


def pseudo_query_loss(pseudo_queries: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Generation loss: mean squared L2 distance ``(B, E)`` vs ``(B, E)`` -> scalar (unit vectors: 2 - 2 cos)."""
    return (pseudo_queries - text_embeddings).pow(2).sum(dim=-1).mean()


def sentence_pseudo_query(pseudo_tokens: torch.Tensor) -> torch.Tensor:
    """``(B, L, E)`` pseudo-query token embeddings -> ``(B, E)`` unit sentence pseudo-query (normalised mean,
    as a text tower pools its projected token states)."""
    return F.normalize(pseudo_tokens.mean(dim=1), dim=-1)


def token_generation_loss(
    pseudo_tokens: torch.Tensor, caption_tokens: torch.Tensor, caption_mask: torch.Tensor
) -> torch.Tensor:
    """Token-level generation loss: a symmetric Chamfer distance between two token sets, on the unit sphere.

    Every real caption token is matched to its nearest pseudo-query token (coverage: the pseudo-query says
    what the caption says) and every pseudo-query token to its nearest caption token (precision: it says
    nothing the caption does not); each match costs ``2 - 2 cos`` (the squared L2 distance of unit vectors).

    Args:
        pseudo_tokens: ``(B, L, E)`` pseudo-query token embeddings of each row's item.
        caption_tokens: ``(B, T, E)`` token embeddings of each row's caption (the target; detach it first
            to keep the text tower out of this loss).
        caption_mask: ``(B, T)`` bool, True on the caption's real tokens (every row needs one).

    Returns:
        Scalar: mean over rows of ``(coverage + precision) / 2``.
    """
    cos = F.normalize(caption_tokens, dim=-1) @ F.normalize(pseudo_tokens, dim=-1).transpose(1, 2)  # (B, T, L)
    coverage = 2 - 2 * cos.max(dim=2).values  # (B, T)
    coverage = (coverage * caption_mask).sum(1) / caption_mask.sum(1).clamp_min(1)
    precision = 2 - 2 * cos.masked_fill(~caption_mask[:, :, None], -2.0).max(dim=1).values  # (B, L)
    return (0.5 * (coverage + precision.mean(1))).mean()
