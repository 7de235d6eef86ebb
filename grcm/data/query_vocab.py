"""The query vocabularies a :class:`~grcm.data.datamodules.RetrievalDataModule` tokenizes with.

``data.query_vocab`` (tokenizers in :mod:`grcm.data.query_tokenizer`):

- ``"minilm"``: MiniLM's WordPiece vocabulary as shipped (30,522 tokens, ``[PAD]`` = 0); the one a
  pretrained MiniLM query encoder needs.
- ``"minilm_compact"``: MiniLM's tokenization restricted to the tokens of the training queries (train
  captions, plus the extra queries when ``use_extra_queries``) and the special tokens, with new ids
  (``[PAD]`` = 0). ``vocab_size`` is the capacity ``compact_vocab_size``; when the training queries use
  more tokens, the most frequent are kept and a warning names the numbers. A val/test word whose MiniLM
  pieces were all kept tokenizes exactly as MiniLM does; other words become other kept pieces or
  ``[UNK]``. For scratch text encoders: far fewer embedding rows for the optimizer to update.
- ``"wordpiece"``: a WordPiece vocabulary of at most ``wordpiece_vocab_size`` tokens trained on the
  training queries (``[PAD]`` = 0); it tokenizes differently from MiniLM.

The compact vocabulary depends on the training split alone; WordPiece training is not reproducible
across processes, so under DDP every rank takes rank 0's. Both travel with checkpoints
(:meth:`grcm.data.datamodules.RetrievalDataModule.state_dict`).
"""

from __future__ import annotations

from typing import Literal

import torch

from grcm.data.query_tokenizer import QueryTokenizer

QueryVocab = Literal["minilm", "minilm_compact", "wordpiece"]
BUILT_VOCABS = ("minilm_compact", "wordpiece")  # built from the training queries at set-up, stored in checkpoints


def same_on_every_rank(tokenizer: QueryTokenizer) -> QueryTokenizer:
    """Rank 0's tokenizer on every rank of an initialised process group (else ``tokenizer`` itself).

    WordPiece training (``tokenizers``) breaks ties between equally frequent merges in a
    per-process hash order: two processes trained on the same texts can learn different
    vocabularies. Under DDP every rank must tokenize alike, so rank 0's vocabulary is broadcast.
    (A checkpoint stores the vocabulary; evaluation restores it from there.)
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tokenizer
    if torch.distributed.get_world_size() == 1:
        return tokenizer
    payload = [tokenizer.to_json() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(payload, src=0)
    return QueryTokenizer.from_json(payload[0], tokenizer.max_length)
