"""Capacity-capped SID assignment (FORGE-style): at most ``capacity`` items per SID.

An alternative to ACE's appended counter token for SIDs shared by several items. The SID's last ``M``
levels are residual-quantiser codes: latent z, codebooks e_m (M, K, d), r_0 = z, v_m = the code chosen at
level m and r_{m+1} = r_m - e_m^{v_m}. Every SID keeps the ``capacity`` items it quantises best (smallest
final residual ||r_M||^2; ties: lower item index); the other items are then placed one at a time, best
quantised first, on the nearest SID with room, by codebook distance:

1. the nearest last-level code ||r_{M-1} - e_{M-1}^j||^2 under the item's own earlier levels;
2. when every code there is full, the next-nearest code of the level above (by its own residual distance),
   each followed by its nearest free last-level code, and so on up to the first quantised level.

The levels before the quantised ones (ACE's coarse K-Means token) never change, the codes stay semantic and
no item is dropped. With ``capacity = 1`` every item has its own SID without a counter token; with a counter
token on top, the counter's vocabulary is at most ``capacity``.
"""

from __future__ import annotations

import torch

from grcm.tokenizers.unique_token import prefix_groups

__all__ = ["capacity_capped_codes"]


def _rank_within_sid(codes: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """(N,) each item's rank inside its SID by (error, item index), 0 = best quantised."""
    group, _ = prefix_groups(codes)
    order = torch.sort(error, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    sorted_group = group[order]
    is_start = torch.ones(len(codes), dtype=torch.bool)
    is_start[1:] = sorted_group[1:] != sorted_group[:-1]
    position = torch.arange(len(codes))
    start = torch.cummax(torch.where(is_start, position, torch.zeros_like(position)), dim=0).values
    rank = torch.empty_like(position)
    rank[order] = position - start
    return rank


def _squared_distances(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(K,) ||residual - codebook_j||^2 for residual (d,) and codebook (K, d)."""
    return (codebook - residual).pow(2).sum(dim=-1)


def capacity_capped_codes(
    prefix_codes: torch.Tensor, latents: torch.Tensor, codebooks: torch.Tensor, capacity: int
) -> torch.Tensor:
    """SIDs with at most ``capacity`` items each, the overflow moved to the nearest SID with room.

    Args:
        prefix_codes: (N, L) long SIDs (before any counter token); the last M columns are the quantised levels.
        latents: (N, d) float, each item's quantiser input z.
        codebooks: (M, K, d) float, the codebook of each quantised level.
        capacity: items allowed per SID, >= 1.

    Returns:
        (N, L) long codes: equal to ``prefix_codes`` except the quantised levels of the moved items.

    Raises:
        ValueError: ``capacity`` < 1, mismatched shapes, or more items under one fixed (unquantised) prefix
            than K^M x capacity.
    """
    if capacity < 1:
        raise ValueError(f"sid_capacity must be >= 1 (or unset for no cap); got {capacity}")
    codes = prefix_codes.cpu().long().clone()
    codebooks = codebooks.detach().cpu().double()
    z = latents.detach().cpu().double()
    if codes.ndim != 2 or codebooks.ndim != 3 or codes.shape[1] < codebooks.shape[0]:
        raise ValueError(f"prefix codes (N, L) need L >= M quantised levels; got codes {tuple(codes.shape)}, "
                         f"codebooks {tuple(codebooks.shape)}")
    if z.shape != (codes.shape[0], codebooks.shape[2]):
        raise ValueError(f"latents must be (N, d) = ({codes.shape[0]}, {codebooks.shape[2]}); got {tuple(z.shape)}")
    num_items, levels = codes.shape[0], codebooks.shape[0]
    if num_items == 0:
        return codes
    first = codes.shape[1] - levels  # first quantised column
    # residuals[:, m] = r_m, the input of level m, for the item's own codes; error = ||r_M||^2
    residuals = [z]
    for level in range(levels):
        residuals.append(residuals[-1] - codebooks[level][codes[:, first + level]])
    error = residuals[-1].pow(2).sum(dim=1)
    rank = _rank_within_sid(codes, error)
    overflow = torch.nonzero(rank >= capacity).squeeze(1)
    if len(overflow) == 0:
        return codes
    occupancy: dict[tuple[int, ...], int] = {}
    for row in codes[rank < capacity].tolist():
        occupancy[tuple(row)] = occupancy.get(tuple(row), 0) + 1

    def place(fixed: tuple[int, ...], residual: torch.Tensor, level: int) -> tuple[int, ...] | None:
        """The nearest free SID below prefix ``fixed``: level ``level``'s codes by distance to ``residual``, each
        followed by the nearest free codes below it (depth first); None when all are full."""
        distances = _squared_distances(residual, codebooks[level])
        for code in torch.sort(distances, stable=True).indices.tolist():
            sid = (*fixed, code)
            if level == levels - 1:
                if occupancy.get(sid, 0) < capacity:
                    return sid
            else:
                found = place(sid, residual - codebooks[level][code], level + 1)
                if found is not None:
                    return found
        return None

    for item in overflow[torch.sort(error[overflow], stable=True).indices].tolist():
        row = codes[item].tolist()
        sid = None
        # back off one level at a time: keep the first `keep` quantised codes, search below them
        for keep in range(levels - 1, -1, -1):
            fixed = tuple(row[: first + keep])
            sid = place(fixed, residuals[keep][item], keep)
            if sid is not None:
                break
        if sid is None:
            raise ValueError(
                f"sid_capacity={capacity}: more items under SID prefix {row[:first]} than its "
                f"{codebooks.shape[1]}^{levels} quantised SIDs x capacity {capacity}; raise sid_capacity or "
                "codebook_size"
            )
        occupancy[sid] = occupancy.get(sid, 0) + 1
        codes[item] = torch.tensor(sid)
    return codes
