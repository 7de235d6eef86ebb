"""GRDR multi-view tokenizer: V SIDs per item by cosine residual quantisation with shared codebooks.

Shapes: B items, D feature width, V views, L levels, K codes per level, d latent width.

* V view encoders (one small MLP each) map item features (B, D) to V unit
  latents z (B, V, d).
* Residual quantisation, level by level, with **cosine** assignment:
  ``r_0 = z``; ``c_l = argmax_k cos(r_l, E_l[k])``; ``r_{l+1} = r_l - E_l[c_l]``.
  The L codebooks ``E_l`` (K, d) are shared by all views (and, in the GRDR
  retriever, are the decoder's level-l input embedding and output head).
* VQ loss on L2-normalised residuals and codes, commitment weight β (GRDR 0.65):
  ``||sg[n(r_l)] - n(e_l)||² + β ||n(r_l) - sg[n(e_l)]||²``.
* Reconstruction: the mean of V per-view decoders applied to the
  straight-through quantised latents, loss ``1 - cos(x̂, x)``.
* :meth:`MultiViewTokenizer.init_level` K-Means-initialises level l's codebook
  from the level-l residuals of every item and view pooled (faiss, seeded), or with
  ``per_view=True`` one K-Means per view, view v's residuals filling its own slice of about K / V
  codes, so one item's views start on different codes.
* ``detach_residual`` (GRDR): the residual handed to level l + 1 is detached, so a later level's
  losses do not move the view encoders or the earlier codebooks.
* :func:`view_margin_loss` pushes one item's view latents apart (hinge on their pairwise cosine);
  :func:`view_latent_cosine` measures how close they are before quantisation.
* View separation (:func:`routed_view_infonce` against guidance query embeddings, or
  :func:`code_usage_balance`) keeps the V views from collapsing onto the same codes.
  GRDR also uses :func:`routed_view_infonce` with its retriever's own query vectors, as its
  query-item InfoNCE (:mod:`grcm.retriever.grdr.losses` names the two uses apart).

There is no unique token: several items may share a SID and an item owns up to V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grcm.tokenizers.health import code_usage, gini_coefficient
from grcm.tokenizers.kmeans import fit_kmeans
from grcm.tokenizers.unique_token import prefix_groups


@dataclass
class MultiViewOutput:
    """Quantisation of the V views of B items over the first ``levels`` levels.

    Attributes:
        latents: (B, V, d) unit view latents z.
        codes: (B, V, levels) long codes.
        quantized: (B, V, d) straight-through quantised latents (value: sum of the chosen codes).
        residuals: ``levels`` tensors (B, V, d), the residual each level quantised.
        vq_loss: scalar VQ loss averaged over levels, views and items (0 when levels = 0).
    """

    latents: Tensor
    codes: Tensor
    quantized: Tensor
    residuals: list[Tensor]
    vq_loss: Tensor


class MultiViewTokenizer(nn.Module):
    """V view encoders, L shared cosine codebooks, V view decoders.

    Args:
        feature_dim: item feature width D.
        num_views: V (GRDR 4).
        num_levels: L (GRDR 3).
        codebook_size: K codes per level (GRDR 128 on MSR-VTT).
        latent_dim: d, also the retriever's width when codebooks are shared.
        hidden_dim: hidden width of the view encoder/decoder MLPs.
        beta: commitment weight (GRDR 0.65).
        query_dim: width of the guidance query embeddings (MiniLM: 384).
        code_scale: s of the code-loss logits ``s * cos(r_l, E_l)``.
        detach_residual: detach the residual between levels (GRDR: True).
    """

    def __init__(
        self,
        feature_dim: int,
        num_views: int = 4,
        num_levels: int = 3,
        codebook_size: int = 128,
        latent_dim: int = 64,
        hidden_dim: int = 256,
        beta: float = 0.65,
        query_dim: int = 384,
        code_scale: float = 20.0,
        detach_residual: bool = False,
    ) -> None:
        super().__init__()
        if num_views < 1 or num_levels < 1 or codebook_size < 2:
            raise ValueError("num_views and num_levels must be >= 1 and codebook_size >= 2")
        self.num_views, self.num_levels, self.codebook_size = num_views, num_levels, codebook_size
        self.latent_dim, self.beta, self.code_scale = latent_dim, beta, code_scale
        self.detach_residual = detach_residual
        self.view_encoders = nn.ModuleList(
            nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, latent_dim))
            for _ in range(num_views)
        )
        self.view_decoders = nn.ModuleList(
            nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, feature_dim))
            for _ in range(num_views)
        )
        self.codebooks = nn.ParameterList(
            nn.Parameter(F.normalize(torch.randn(codebook_size, latent_dim), dim=-1)) for _ in range(num_levels)
        )
        self.query_projection = nn.Linear(query_dim, latent_dim)

    @property
    def vocab_sizes(self) -> list[int]:
        return [self.codebook_size] * self.num_levels

    def view_latents(self, features: Tensor) -> Tensor:
        """(B, D) features -> (B, V, d) unit view latents."""
        return F.normalize(torch.stack([encoder(features) for encoder in self.view_encoders], dim=1), dim=-1)

    def quantize(self, latents: Tensor, levels: int | None = None) -> MultiViewOutput:
        """Residual-quantise (B, V, d) latents over the first ``levels`` levels (default L)."""
        levels = self.num_levels if levels is None else int(levels)
        residual = latents
        total = torch.zeros_like(latents)
        codes, residuals = [], []
        vq = latents.new_zeros(())
        for level in range(levels):
            codebook = self.codebooks[level]
            unit_r, unit_e = F.normalize(residual, dim=-1), F.normalize(codebook, dim=-1)
            code = (unit_r @ unit_e.T).argmax(dim=-1)  # (B, V): the cosine-nearest code
            # F.embedding, not codebook[code]: its backward sums gradients in a fixed order, where the
            # backward of advanced indexing (index_put with accumulate) adds them from several threads
            # in a run-dependent order on CPU and CUDA, so two identical runs would train different models
            vector = F.embedding(code, codebook)  # (B, V, d)
            chosen = F.embedding(code, unit_e)
            vq = vq + (unit_r.detach() - chosen).pow(2).sum(-1).mean()
            vq = vq + self.beta * (unit_r - chosen.detach()).pow(2).sum(-1).mean()
            residuals.append(residual)
            codes.append(code)
            total = total + vector
            residual = residual - vector
            if self.detach_residual:  # the next level's losses reach neither the encoders nor this codebook
                residual = residual.detach()
        quantized = latents + (total - latents).detach() if levels else latents
        code_tensor = torch.stack(codes, dim=-1) if codes else latents.new_zeros(*latents.shape[:2], 0).long()
        return MultiViewOutput(latents, code_tensor, quantized, residuals, vq / max(levels, 1))

    def reconstruct(self, quantized: Tensor) -> Tensor:
        """(B, V, d) quantised latents -> (B, D): the mean of the V view decoders."""
        return torch.stack([dec(quantized[:, v]) for v, dec in enumerate(self.view_decoders)], 1).mean(1)

    def reconstruction_loss(self, features: Tensor, quantized: Tensor) -> Tensor:
        """Mean ``1 - cos(x̂, x)`` over the batch."""
        return (1.0 - F.cosine_similarity(self.reconstruct(quantized), features, dim=-1)).mean()

    def code_logits(self, residual: Tensor, level: int) -> Tensor:
        """``s * cos(r_l, E_l)``: (B, V, d) residuals -> (B, V, K) logits of the level-l codes."""
        return self.code_scale * F.normalize(residual, dim=-1) @ F.normalize(self.codebooks[level], dim=-1).T

    @torch.no_grad()
    def encode(self, features: Tensor, levels: int | None = None, chunk: int = 8192) -> Tensor:
        """(N, D) features -> (N, V, levels) codes, in chunks."""
        pieces = [
            self.quantize(self.view_latents(features[i : i + chunk]), levels).codes
            for i in range(0, features.shape[0], chunk)
        ]
        return torch.cat(pieces)

    @torch.no_grad()
    def init_level(self, features: Tensor, level: int, seed: int = 0, per_view: bool = False) -> Tensor:
        """K-Means-initialise codebook ``level`` from the level's residuals.

        ``per_view=False``: one K-Means of every item's and view's residuals pooled. ``per_view=True``:
        the K codes are cut into V contiguous slices (:func:`view_code_slices`) and slice v is the
        K-Means of view v's residuals alone (seed ``seed + v``).

        Returns the (N, V, d) residuals it clustered (after quantising levels < ``level``).
        """
        residuals = []
        for i in range(0, features.shape[0], 8192):
            out = self.quantize(self.view_latents(features[i : i + 8192]), level)
            residuals.append(out.latents - sum_codes(self, out.codes))
        residual = torch.cat(residuals)  # (N, V, d)
        if per_view:
            centroids = np.concatenate([
                fit_kmeans(residual[:, view], stop - start, seed=seed + view)
                for view, (start, stop) in enumerate(view_code_slices(self.codebook_size, self.num_views))
            ])
        else:
            centroids = fit_kmeans(residual.reshape(-1, self.latent_dim), self.codebook_size, seed=seed)
        self.codebooks[level].data.copy_(torch.from_numpy(centroids).to(self.codebooks[level]))
        return residual


def view_code_slices(codebook_size: int, num_views: int) -> list[tuple[int, int]]:
    """V contiguous [start, stop) slices of K codes, sizes differing by at most one (the first ones larger)."""
    if codebook_size < num_views:
        raise ValueError(f"per-view K-Means needs codebook_size >= num_views, got {codebook_size} < {num_views}")
    bounds = np.cumsum([0] + [codebook_size // num_views + (v < codebook_size % num_views) for v in range(num_views)])
    return [(int(bounds[v]), int(bounds[v + 1])) for v in range(num_views)]


def _pairwise_view_cosine(latents: Tensor) -> Tensor:
    """(B, V, d) -> (B, V * (V - 1) / 2) cosine of every pair v < v' of one item's views."""
    unit = F.normalize(latents, dim=-1)
    cosine = unit @ unit.transpose(1, 2)  # (B, V, V)
    upper = torch.triu_indices(latents.shape[1], latents.shape[1], offset=1, device=latents.device)
    return cosine[:, upper[0], upper[1]]


def view_margin_loss(latents: Tensor, margin: float = 0.0) -> Tensor:
    """Separation of one item's views: mean over items and view pairs of ``max(0, cos(z_v, z_v') - margin)``.

    Args:
        latents: (B, V, d) view latents (V >= 2; V = 1 gives 0).
        margin: the cosine below which a pair costs nothing (0: orthogonal views are free).

    Returns:
        Scalar; its gradient lowers the cosine of every pair above the margin.
    """
    if latents.shape[1] < 2:
        return latents.new_zeros(())
    return F.relu(_pairwise_view_cosine(latents) - margin).mean()


@torch.no_grad()
def view_latent_cosine(latents: Tensor) -> float:
    """Mean cosine between one item's views before quantisation, over (B, V, d) latents (0 for V = 1)."""
    if latents.shape[1] < 2 or latents.shape[0] == 0:
        return 0.0
    return float(_pairwise_view_cosine(latents).mean())


def sum_codes(tokenizer: MultiViewTokenizer, codes: Tensor) -> Tensor:
    """Sum of the code vectors of (B, V, l) codes -> (B, V, d)."""
    total = 0
    for level in range(codes.shape[-1]):
        total = total + F.embedding(codes[..., level], tokenizer.codebooks[level])  # deterministic backward
    if isinstance(total, int):
        return torch.zeros(*codes.shape[:2], tokenizer.latent_dim, device=codes.device)
    return total


def routed_view_infonce(
    queries: Tensor, views: Tensor, item_index: Tensor, routes: Tensor, temperature: float = 0.1
) -> Tensor:
    """Multi-positive InfoNCE of queries against the routed views of their items, over a batch.

    Every query is contrasted with all V views of all B items of the batch; its
    positives are the routed view of its own item (of every row holding that item).
    The other views of the same item are negatives, which keeps views apart.

    Args:
        queries: (B, d) query vectors.
        views: (B, V, d) view latents of each query's item.
        item_index: (B,) item of each query (rows may repeat an item).
        routes: (B,) routed view of each query.
        temperature: softmax temperature.

    Returns:
        Scalar loss ``-log(sum_pos exp / sum_all exp)`` averaged over queries.
    """
    batch, num_views, width = views.shape
    logits = F.normalize(queries, dim=-1) @ F.normalize(views, dim=-1).reshape(batch * num_views, width).T
    logits = logits / temperature  # (B, B * V)
    same_item = item_index[:, None] == item_index[None, :]  # (B, B)
    view_hit = torch.arange(num_views, device=views.device)[None, :] == routes[:, None]  # (B, V)
    positive = (same_item[:, :, None] & view_hit[:, None, :]).reshape(batch, batch * num_views)
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (log_all - log_pos).mean()


def code_usage_balance(tokenizer: MultiViewTokenizer, latents: Tensor, temperature: float = 0.1) -> Tensor:
    """Per-view level-0 code-usage balancing: ``mean_v (1 - H(mean_b p_bv) / log K)``.

    ``p_bv = softmax(cos(z_bv, E_0) / temperature)`` (B, V, K); 0 when every view spreads its
    batch evenly over the level-0 codes.
    """
    probabilities = torch.softmax(tokenizer.code_logits(latents, 0) / (tokenizer.code_scale * temperature), -1)
    usage = probabilities.mean(0)  # (V, K)
    entropy = -(usage * usage.clamp_min(1e-12).log()).sum(-1)
    return (1.0 - entropy / math.log(tokenizer.codebook_size)).mean()


def multiview_health(codes: Tensor, vocab_sizes: list[int]) -> dict[str, float]:
    """Per-view and cross-view SID health of (N, V, L) codes.

    Keys: ``view{v}_level{l}_utilisation`` (active codes / K), ``view{v}_level{l}_active_codes``,
    ``view{v}_gini`` (Gini of SID occupancy within the view), ``duplicate_sid_item_fraction``
    (items with two views on the same SID), ``duplicate_level0_item_fraction`` (items with two views
    on the same level-0 code), ``unique_sids_per_item`` (mean distinct SIDs of an
    item), ``num_sids`` (distinct SIDs in the trie), ``items_per_sid`` (mean distinct items per
    SID), ``gini`` (Gini of item occupancy over all SIDs).
    """
    codes = codes.cpu().long()
    n, num_views, levels = codes.shape
    health: dict[str, float] = {}
    for view in range(num_views):
        for level in range(levels):
            usage = code_usage(codes[:, view, level], vocab_sizes[level])
            health[f"view{view}_level{level}_utilisation"] = usage["utilisation"]
            health[f"view{view}_level{level}_active_codes"] = usage["utilisation"] * vocab_sizes[level]
        _, sizes = prefix_groups(codes[:, view])
        health[f"view{view}_gini"] = gini_coefficient(sizes)
    group, _ = prefix_groups(codes.reshape(n * num_views, levels))
    per_item = group.reshape(n, num_views).numpy()
    ordered = np.sort(per_item, axis=1)
    distinct = 1 + (np.diff(ordered, axis=1) != 0).sum(1)  # (N,) distinct SIDs of each item
    health["duplicate_sid_item_fraction"] = float((distinct < num_views).mean()) if n else 0.0
    first = np.sort(codes[:, :, 0].numpy(), axis=1)
    health["duplicate_level0_item_fraction"] = float((np.diff(first, axis=1) == 0).any(1).mean()) if n else 0.0
    health["unique_sids_per_item"] = float(distinct.mean()) if n else 0.0
    pairs = np.unique(np.stack([per_item.reshape(-1), np.repeat(np.arange(n), num_views)], 1), axis=0)
    items_per_sid = np.bincount(pairs[:, 0])
    health["num_sids"] = float((items_per_sid > 0).sum())
    health["items_per_sid"] = float(items_per_sid[items_per_sid > 0].mean()) if n else 0.0
    health["gini"] = gini_coefficient(items_per_sid)
    return health
