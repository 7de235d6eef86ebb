"""How fast is the ACE SID tokenizer on CPU?

Measures, on synthetic features (``generate_synthetic_features``):

- coarse K-Means: faiss (the implementation) vs scikit-learn's MiniBatchKMeans, time and inertia;
- training: K-Means start-up, seconds per RQ-VAE epoch and per epoch-end health/restart pass
  at ``--train-items`` items (paper architecture, batch 2048; a timing run, too short to judge
  SID quality);
- SID assignment throughput (items/s) at ``--assign-items`` items: coarse token + encoder + residual
  quantisation, then the unique-token table.

    python benchmarks/sid_tokenizer.py                      # 100k training items, 1M assigned items
    python benchmarks/sid_tokenizer.py --train-items 20000 --assign-items 100000   # quick

Writes JSON to benchmarks/results/sid_tokenizer.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from grcm.data.corpus import Corpus
from grcm.data.datamodules import ItemBatches
from grcm.data.synthetic import generate_synthetic_features
from grcm.io import write_json_atomic
from grcm.tokenizers.kmeans import assign_to_centroids, fit_kmeans
from grcm.tokenizers.module import ACETokenizer
from grcm.tokenizers.unique_token import append_unique_token


class FeatureDataModule(L.LightningDataModule):
    """Serves ``{"item_index", "features"}`` batches of an in-memory feature matrix (N, D)."""

    def __init__(self, features: np.ndarray, batch_size: int):
        super().__init__()
        n = features.shape[0]
        empty = np.zeros(0, dtype=np.int64)
        self.corpus = Corpus(
            "bench", "synthetic", [str(i) for i in range(n)], features, empty, [], empty.astype("<U5")
        )
        self.batch_size = batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            range(self.corpus.num_items),
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=ItemBatches(self.corpus.features),
        )


class PhaseTimer(L.Callback):
    """Wall-clock of the K-Means start-up, each epoch's training steps and each epoch-end pass."""

    def __init__(self) -> None:
        self.marks: dict[str, list[float]] = {"epoch_start": [], "steps_end": []}
        self.fit_start = self.train_start = self.train_end = 0.0

    def on_fit_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.fit_start = time.perf_counter()  # callbacks run before the module's K-Means

    def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.train_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.marks["epoch_start"].append(time.perf_counter())

    def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.marks["steps_end"].append(time.perf_counter())  # callbacks run before the module's hook

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.train_end = time.perf_counter()


def compare_kmeans(features: np.ndarray, num_clusters: int, seed: int) -> dict:
    """faiss K-Means vs scikit-learn MiniBatchKMeans (batch 2048) on the same features."""
    from sklearn.cluster import MiniBatchKMeans

    def inertia(centroids: np.ndarray) -> float:
        assigned = assign_to_centroids(features, centroids)
        return float(((features - centroids[assigned]) ** 2).sum())

    start = time.perf_counter()
    faiss_centroids = fit_kmeans(features, num_clusters, seed=seed)
    faiss_seconds = time.perf_counter() - start
    start = time.perf_counter()
    minibatch = MiniBatchKMeans(num_clusters, batch_size=2048, n_init=1, random_state=seed).fit(features)
    sklearn_seconds = time.perf_counter() - start
    return {
        "items": int(features.shape[0]),
        "clusters": num_clusters,
        "faiss_seconds": faiss_seconds,
        "faiss_inertia": inertia(faiss_centroids),
        "sklearn_minibatch_seconds": sklearn_seconds,
        "sklearn_minibatch_inertia": inertia(minibatch.cluster_centers_.astype(np.float32)),
    }


def train(features: np.ndarray, epochs: int, batch_size: int, seed: int) -> tuple[ACETokenizer, dict]:
    """Fit the paper-sized tokenizer for ``epochs`` epochs and time its phases."""
    L.seed_everything(seed, verbose=False)
    model = ACETokenizer(feature_dim=features.shape[1], lr=1e-3, warmup_epochs=1, seed=seed)
    timer = PhaseTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=FeatureDataModule(features, batch_size))
    starts, steps_end = timer.marks["epoch_start"], timer.marks["steps_end"]
    epoch_end_work = [b - a for a, b in zip(steps_end, [*starts[1:], timer.train_end])]
    return model, {
        "items": int(features.shape[0]),
        "batch_size": batch_size,
        "epochs": epochs,
        "kmeans_startup_seconds": timer.train_start - timer.fit_start,
        "train_steps_seconds_per_epoch": [b - a for a, b in zip(starts, steps_end)],
        "epoch_end_health_and_restart_seconds": epoch_end_work,
    }


def assign(model: ACETokenizer, features: np.ndarray) -> dict:
    """SID assignment throughput over all rows of features (N, D)."""
    start = time.perf_counter()
    prefix, _ = model.encode_corpus(features)
    encode_seconds = time.perf_counter() - start
    start = time.perf_counter()
    sids, unique_vocab = append_unique_token(prefix)
    unique_seconds = time.perf_counter() - start
    n = features.shape[0]
    return {
        "items": n,
        "encode_seconds": encode_seconds,
        "unique_token_seconds": unique_seconds,
        "items_per_second": n / (encode_seconds + unique_seconds),
        "distinct_sids": int(len(torch.unique(sids, dim=0))),
        "unique_token_vocab": unique_vocab,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-items", type=int, default=100_000)
    parser.add_argument("--assign-items", type=int, default=1_000_000)
    parser.add_argument("--feature-dim", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-kmeans-comparison", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/sid_tokenizer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    features = generate_synthetic_features(
        max(args.train_items, args.assign_items), args.feature_dim, args.seed
    )
    generation_seconds = time.perf_counter() - start
    train_features = np.ascontiguousarray(features[: args.train_items])

    result: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "feature_generation_seconds": generation_seconds,
    }
    if not args.skip_kmeans_comparison:
        result["coarse_kmeans"] = compare_kmeans(train_features, 128, args.seed)
        print("coarse K-Means:", result["coarse_kmeans"], flush=True)
    model, result["training"] = train(train_features, args.epochs, args.batch_size, args.seed)
    print("training:", result["training"], flush=True)
    result["assignment"] = assign(model, features[: args.assign_items])
    print("assignment:", result["assignment"], flush=True)
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
