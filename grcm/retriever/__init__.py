"""Generative retriever: an encoder-decoder that decodes a text query into the SID of its item.

- :mod:`grcm.retriever.fusion`: ACE coarse/fine fusion blocks (and standard cross-attention).
- :mod:`grcm.retriever.model`: :class:`GenerativeRetrieverModel` (plain ``nn.Module``).
- :mod:`grcm.retriever.rdrop`: cross-entropy + R-Drop consistency loss.
- :mod:`grcm.retriever.schedule`: linear warm-up + cosine annealing with warm restarts.
- :mod:`grcm.retriever.sid_retrieval`: :class:`SIDRetrievalModule`, the abstract LightningModule base of the
  SID retrievers: decoding under the trie, beams -> items, recall/MRR, logging, index size, predict output.
- :mod:`grcm.retriever.module`: :class:`GenerativeRetriever` LightningModule, ACE (import it from there; it
  pulls in Lightning).
- :mod:`grcm.retriever.grdr`: :class:`GRDRRetriever`, GRDR's multi-view SIDs trained with the retriever.
"""

from grcm.retriever.fusion import CoarseFusion, CoarseToFineFusion, FineFusion, StandardCrossAttention
from grcm.retriever.model import EncoderOutput, GenerativeRetrieverModel
from grcm.retriever.rdrop import sid_loss, symmetric_kl

__all__ = [
    "CoarseFusion",
    "CoarseToFineFusion",
    "EncoderOutput",
    "FineFusion",
    "GenerativeRetrieverModel",
    "StandardCrossAttention",
    "sid_loss",
    "symmetric_kl",
]
