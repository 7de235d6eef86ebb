"""The SID loss of a GRDR training batch under ``view_target``: which of an item's V SIDs a query trains.

``routed`` teacher-forces the query's routed view (:func:`~grcm.retriever.grdr.losses.routed_sid_loss`);
``marginal`` and ``best`` teacher-force all V SIDs, the query encoded once and the decoder run on B * V
prefixes, and train their summed likelihood or the most likely one
(:func:`~grcm.retriever.grdr.losses.multi_view_sid_loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from grcm.retriever.grdr.losses import multi_view_sid_loss, routed_sid_loss, view_sid_nll
from grcm.retriever.model import GenerativeRetrieverModel


def batch_sid_loss(model: GenerativeRetrieverModel, input_ids: Tensor, attention_mask: Tensor, codes: Tensor,
                   routes: Tensor, view_target: str, num_levels: int,
                   label_smoothing: float) -> tuple[Tensor, Tensor]:
    """The SID loss (scalar) and (B,) bool: the trained view's SID decoded exactly (greedy per level).

    ``input_ids``/``attention_mask`` (B, T): the queries; ``codes`` (B, V, l): every view's SID of each
    query's item over the l levels trained so far; ``routes`` (B,): each query's routed view;
    ``num_levels``: L, the SID length the network decodes (levels past l are padded and not trained).
    """
    batch_size, num_views, levels = codes.shape
    rows = torch.arange(batch_size, device=codes.device)
    if view_target == "routed" or num_views == 1:
        targets = codes[rows, routes]  # (B, l): the routed view
        full = F.pad(targets, (0, num_levels - levels))  # (B, L): later levels are not trained
        return routed_sid_loss(model(input_ids, attention_mask, full), targets, label_smoothing)
    enc = model.encode(input_ids, attention_mask)
    prefixes = codes.reshape(batch_size * num_views, levels)  # batch-major: row b * V + v is view v of b
    logits = [model.decode_logits(enc, prefixes[:, :level]).view(batch_size, num_views, -1)
              for level in range(levels)]  # l tensors (B, V, K)
    loss, best = multi_view_sid_loss(view_sid_nll(logits, codes, label_smoothing), levels, view_target)
    exact = torch.stack([logits[level][rows, best].argmax(-1) == codes[rows, best, level]
                         for level in range(levels)], 1).all(1)
    return loss, exact
