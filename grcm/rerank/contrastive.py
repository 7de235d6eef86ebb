"""Symmetric InfoNCE for query/item embedding pairs, aware of repeated items in a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def symmetric_info_nce(
    query_embeddings: torch.Tensor, item_embeddings: torch.Tensor, item_index: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP-style loss where several queries of a batch may share one item.

    Args:
        query_embeddings: ``(B, E)`` unit vectors, one per query.
        item_embeddings: ``(B, E)`` unit vectors of each query's item (rows repeat when items repeat).
        item_index: ``(B,)`` item id of each row; rows with equal ids are the same item.
        logit_scale: scalar, the inverse temperature.

    Returns:
        Scalar: mean of the query->item cross-entropy over the batch's *distinct* items and
        the item->query loss, where an item's positives are all of its queries.
    """
    unique_items, inverse = torch.unique(item_index, return_inverse=True)
    first_row = torch.full_like(unique_items, item_index.numel()).scatter_reduce(
        0, inverse, torch.arange(item_index.numel(), device=item_index.device), reduce="amin"
    )
    items = item_embeddings[first_row]  # (U, E)
    logits = logit_scale * query_embeddings @ items.T  # (B, U)
    query_to_item = F.cross_entropy(logits, inverse)
    positives = inverse[None, :] == torch.arange(len(unique_items), device=inverse.device)[:, None]  # (U, B)
    item_logits = logits.T  # (U, B)
    item_to_query = (
        torch.logsumexp(item_logits, dim=1) - torch.logsumexp(item_logits.masked_fill(~positives, -torch.inf), dim=1)
    ).mean()
    return 0.5 * (query_to_item + item_to_query)
