"""Unique token u: an ID table counts how many items already hold each SID prefix."""

from __future__ import annotations

import torch


def prefix_groups(prefix_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group identical rows of prefix_codes (N, L).

    Returns (group (N,) long: index of each row's distinct prefix, sizes (G,) long: items per prefix).
    """
    if prefix_codes.ndim != 2:
        raise ValueError(f"prefix codes must be (N, L); got shape {tuple(prefix_codes.shape)}")
    if prefix_codes.shape[1] == 0:
        group = torch.zeros(prefix_codes.shape[0], dtype=torch.long)
        return group, torch.tensor([prefix_codes.shape[0]], dtype=torch.long)
    codes = prefix_codes.cpu().long()
    radix = codes.max(dim=0).values + 1
    if codes.min() >= 0 and float(torch.prod(radix.double())) < 2**62:
        # one int64 key per row (mixed radix): a 1-D unique, much faster than unique(dim=0)
        strides = torch.cat([torch.cumprod(radix.flip(0), dim=0).flip(0)[1:], radix.new_ones(1)])
        codes = (codes * strides).sum(dim=1)
        _, group, sizes = torch.unique(codes, return_inverse=True, return_counts=True)
    else:
        _, group, sizes = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return group, sizes


def assign_unique_tokens(prefix_codes: torch.Tensor) -> torch.Tensor:
    """Unique token per item: how many earlier items (in row order) hold the same prefix.

    prefix_codes (N, L) long -> u (N,) long. Items sharing (k, v_1..v_M) get
    0, 1, 2, ... in ascending item order, so (prefix, u) is unique and the
    result depends only on the codes.
    """
    group, _ = prefix_groups(prefix_codes)
    order = torch.sort(group, stable=True).indices
    sorted_group = group[order]
    position = torch.arange(len(group))
    is_start = torch.ones(len(group), dtype=torch.bool)
    is_start[1:] = sorted_group[1:] != sorted_group[:-1]
    start_position = torch.cummax(torch.where(is_start, position, torch.zeros_like(position)), dim=0).values
    unique = torch.empty_like(group)
    unique[order] = position - start_position
    return unique


def append_unique_token(prefix_codes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """SIDs with the unique token appended: (N, L) -> ((N, L + 1), vocabulary size of u = largest bucket)."""
    unique = assign_unique_tokens(prefix_codes)
    vocab = int(unique.max()) + 1 if len(unique) else 1
    return torch.cat([prefix_codes.cpu(), unique.unsqueeze(1)], dim=1), vocab
