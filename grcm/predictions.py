"""``grcm predict`` output: the ranked items of every query, one JSON object per line.

Any model whose ``predict_step`` returns ``{"query_index": (B,), "items": (B, M), "scores": (B, M)}``
(item indices padded with -1, best first) works: the dual tower and the generative retriever do.
Each line of the JSONL file::

    {"query_index": 17, "query": "a puppy running on a beach", "gold": ["item_3"],
     "items": ["item_3", "item_9", ...], "scores": [12.1, 11.7, ...]}

``query_index`` is the caption's row in the corpus (``captions.csv`` order); ``gold`` the
caption's own item. The file is written atomically when prediction ends, at
``<trainer.default_root_dir>/predictions/<checkpoint name>.jsonl``; an existing file is
never replaced (``-v1``, ``-v2``, ... are appended). Under DDP each rank writes its own
``.rank<r>.jsonl`` part.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from grcm.io import atomic_path


def _free_path(path: Path) -> Path:
    """``path``, or ``<stem>-v<n><suffix>`` with the first n that does not exist."""
    candidate, version = path, 0
    while candidate.exists():
        version += 1
        candidate = path.with_name(f"{path.stem}-v{version}{path.suffix}")
    return candidate


class RankedPredictionWriter(BasePredictionWriter):
    """Writes each query's ranked item ids and scores to JSONL (added by ``grcm predict`` when absent).

    Args:
        path: file to write; default ``<trainer.default_root_dir>/predictions/<checkpoint stem>.jsonl``.
    """

    def __init__(self, path: str | None = None):
        super().__init__(write_interval="batch")
        self.path = path
        self.written: Path | None = None
        self._lines: list[str] = []

    def _target(self, trainer) -> Path:
        if self.path is not None:
            target = Path(self.path)
        else:
            ckpt = getattr(trainer, "ckpt_path", None)
            name = Path(str(ckpt)).stem if ckpt else "predictions"
            target = Path(trainer.default_root_dir) / "predictions" / f"{name}.jsonl"
        if trainer.world_size > 1:
            target = target.with_name(f"{target.stem}.rank{trainer.global_rank}{target.suffix}")
        return _free_path(target)

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._lines = []

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx, dataloader_idx=0):
        corpus = trainer.datamodule.corpus
        item_ids = corpus.item_ids
        items = prediction["items"].cpu().tolist()
        scores = prediction["scores"].float().cpu().tolist()
        gold = batch.get("gold_items")
        gold = gold.cpu().tolist() if gold is not None else [[] for _ in items]
        for row, query in enumerate(prediction["query_index"].cpu().tolist()):
            ranked = [(item, score) for item, score in zip(items[row], scores[row]) if item >= 0]
            text = corpus.caption_text[query] if 0 <= query < len(corpus.caption_text) else None
            record = {
                "query_index": query,
                "query": text,
                "gold": [item_ids[g] for g in gold[row] if g >= 0],
                "items": [item_ids[item] for item, _ in ranked],
                "scores": [round(float(score), 6) for _, score in ranked],
            }
            self._lines.append(json.dumps(record, ensure_ascii=False))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        target = self._target(trainer)
        with atomic_path(target) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in self._lines), encoding="utf-8")
        self.written = target
        print(f"grcm predict: wrote {len(self._lines)} ranked queries to {os.fspath(target)}")
        self._lines = []
