"""Fit a :class:`~grcm.retriever.prefix_scorer.PrefixItemScorer` on a trained ACE retriever, the retriever frozen.

``python -m grcm.retriever.prefix_scorer_fit --ckpt_path <retriever.ckpt> --out <scorer.pt>`` fits one on the
checkpoint's own training queries and writes it; the retriever reads it with
``--model.init_args.prefix_scorer=<scorer.pt>`` (plus ``recall_levels`` equal to the scorer's levels). Kept apart
from :mod:`grcm.retriever.prefix_scorer`, which the retriever imports, because loading a checkpoint needs the
retriever's LightningModule.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from grcm.retriever.model import GenerativeRetrieverModel
from grcm.retriever.prefix_scorer import PrefixItemScorer, PrefixScorerError, item_vectors, prefix_states


@torch.no_grad()
def _training_states(model: GenerativeRetrieverModel, codes: Tensor, input_ids: Tensor, attention_mask: Tensor,
                     item_index: Tensor, levels: int, batch_size: int) -> Tensor:
    """(Q, d) decoder states of the training queries after their gold item's first ``levels`` codes."""
    states = []
    for start in range(0, input_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        mask = attention_mask[rows]
        width = max(int(mask.sum(1).max()), 1)
        enc = model.encode(input_ids[rows, :width], mask[:, :width])
        prefix = codes[item_index[rows], :levels]
        states.append(prefix_states(model, enc, prefix[:, None, :])[:, 0])
    return torch.cat(states)


def fit_prefix_scorer(model: GenerativeRetrieverModel, codes: Tensor, vectors: Tensor, input_ids: Tensor,
                      attention_mask: Tensor, item_index: Tensor, levels: int = 1, epochs: int = 100,
                      lr: float = 3e-3, weight_decay: float = 0.0, batch_size: int = 1000,
                      seed: int = 0) -> tuple[PrefixItemScorer, float]:
    """Fit a :class:`PrefixItemScorer` on training queries with the retriever frozen.

    Each query's target is its item among the *training* items under its gold prefix (its first ``levels``
    codes): items without training queries are no negatives, so the scorer is fitted without them, as it
    would be before new items arrive.

    Args:
        model: the retriever's network (evaluation mode is set and restored).
        codes: (N, L) SID table; vectors: (N, D) item vectors (:func:`item_vectors`).
        input_ids, attention_mask: (Q, T) the training queries; item_index: (Q,) their items.
        levels: prefix length p; epochs, lr, weight_decay, batch_size, seed: the Adam fit.

    Returns:
        The scorer (evaluation mode) and its last mini-batch's loss.
    """
    training = model.training
    model.eval()
    try:
        states = _training_states(model, codes, input_ids, attention_mask, item_index, levels, 500)
    finally:
        model.train(training)
    generator = torch.Generator().manual_seed(seed)
    trained = torch.zeros(codes.shape[0], dtype=torch.bool)
    trained[item_index] = True
    scorer = PrefixItemScorer(states.shape[1], vectors, levels, trained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        scorer.proj.reset_parameters()
    prefixes = codes[:, :levels]
    optimizer = torch.optim.Adam(scorer.parameters(), lr=lr, weight_decay=weight_decay)
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        for rows in torch.randperm(len(item_index), generator=generator).split(batch_size):
            gold = item_index[rows]
            allowed = (prefixes[None, :, :] == prefixes[gold][:, None, :]).all(-1) & trained[None, :]  # (b, N)
            logits = (scorer.proj(states[rows]) @ scorer.vectors.T).masked_fill(~allowed, float("-inf"))
            loss = nn.functional.cross_entropy(logits, gold)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return scorer.eval(), float(loss.detach())


# ------------------------------------------------------------------ command line
def _load_retriever_and_data(ckpt_path: str, corpus_dir: str | None = None) -> tuple[Any, Any]:
    """The ACE retriever of ``ckpt_path`` and its fit's data module, set up with the fit's query vocabulary
    (``corpus_dir``: the fit's corpus read from another directory, e.g. a copy of the run)."""
    from grcm.checkpoint import read_checkpoint
    from grcm.retriever.module import GenerativeRetriever
    from grcm.run_settings import import_class

    checkpoint = read_checkpoint(ckpt_path)
    run = checkpoint.get("grcm_run") or {}
    data = run.get("data")
    if "sid_bundle" not in checkpoint or data is None:
        raise PrefixScorerError(f"--ckpt_path={ckpt_path} is not a GenerativeRetriever (ACE) checkpoint written with "
                                "its data settings ('sid_bundle' and 'grcm_run' keys); fit the retriever again.")
    data_class = import_class(data["class_path"])
    init_args = dict(data["init_args"])
    if corpus_dir is not None:
        init_args["corpus_dir"] = str(corpus_dir)
    datamodule = data_class(**init_args)
    datamodule.setup("fit")
    state = checkpoint.get(data_class.__name__)
    if state:
        datamodule.load_state_dict({key: value for key, value in state.items() if key != "rng_states"})
    module = GenerativeRetriever.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=False)
    return module.eval(), datamodule


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grcm.retriever.prefix_scorer_fit",
                                     description="Fit a prefix item scorer on an ACE retriever checkpoint's "
                                                 "training queries (the retriever frozen) and write it.")
    parser.add_argument("--ckpt_path", required=True, help="the retriever checkpoint (e.g. checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="the scorer file to write")
    parser.add_argument("--levels", type=int, default=1, help="prefix length p (the retriever's recall_levels)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def fit_from_checkpoint(ckpt_path: str, out: str, levels: int = 1, epochs: int = 100, lr: float = 3e-3,
                        weight_decay: float = 0.0, seed: int = 0, corpus_dir: str | None = None) -> dict[str, Any]:
    """Fit a scorer on the training queries of the corpus ``ckpt_path`` was fitted on (or ``corpus_dir``), write
    it to ``out``; a summary (queries, items, last loss, seconds)."""
    start = time.perf_counter()
    module, datamodule = _load_retriever_and_data(ckpt_path, corpus_dir)
    queries = datamodule.query_batches("train")
    codes = module.sid_codes.cpu()
    centroids = module._bundle_extras.get("codebooks", {}).get("coarse")
    features = torch.as_tensor(np.array(datamodule.corpus.features), dtype=torch.float32)
    vectors = item_vectors(features, codes[:, 0] if centroids is not None else None, centroids)
    scorer, loss = fit_prefix_scorer(module.model, codes, vectors, queries.input_ids, queries.attention_mask,
                                     queries.item_index, levels, epochs, lr, weight_decay, seed=seed)
    scorer.save(out)
    return {"queries": len(queries), "items": int(queries.item_index.unique().numel()), "loss": loss,
            "seconds": time.perf_counter() - start, "out": str(out)}


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    summary = fit_from_checkpoint(args.ckpt_path, args.out, args.levels, args.epochs, args.lr, args.weight_decay,
                                  args.seed)
    print(f"prefix scorer: {summary['queries']} training queries, {summary['items']} items, "
          f"loss {summary['loss']:.3f}, {summary['seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
