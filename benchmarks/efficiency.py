"""Efficiency vs corpus size: generative retrieval against dense FAISS indexes (ACE Fig. 4 setting).

One run, one machine. For every corpus size N (default 1k, 10k, 100k, 1M
synthetic items) it measures queries/s with 100 concurrent queries (one batch
of 100 queries, timed several times) and index bytes per item for:

* ``generative_beam5`` / ``generative_beam50``: :class:`GenerativeRetrieverModel`
  (random weights: throughput does not depend on what the weights say) encoding
  the queries, trie-constrained beam search over the SIDs (:mod:`grcm.decoding`)
  with incremental decoding (KV cache, encoder memory projected once per query;
  :mod:`grcm.retriever.incremental`) and expansion to the top 10 items;
* ``generative_beam5_full`` / ``generative_beam50_full``: the same search with the
  decoder recomputed over the whole prefix at every level (the reference path);
  the run checks that it returns the same beams, and reports the speed-up;
* ``generative_beam50_rerank``: the beam-50 pool re-ranked by the dual tower
  (:func:`grcm.rerank.two_stage.rerank_candidates`, a gathered matmul over the
  candidates only). Its time is the beam-50 time plus the rerank time of the
  same repeat (query encoding + rerank), measured separately so that the costly
  decode runs once;
* ``faiss_flat`` / ``faiss_ivf_pq`` / ``faiss_hnsw``: the dual tower's text tower
  encoding the queries, then :class:`grcm.rerank.index.DenseIndex` search for
  the top 10 over the item tower's embeddings of the same features.

Every method's time includes encoding the query text. Methods are timed
round-robin within each repeat, so a load spike on a shared machine hits all
of them alike; the reported rate is 100 / median batch time.

SIDs are ACE-shaped and computed from the real synthetic features, without
training an RQ-VAE: coarse token = K-Means (faiss, 128 clusters), fine tokens =
a 2-level residual quantiser over the residuals ``x - c_k`` (faiss
``ResidualQuantizer``, 128 codes per level, greedy ``argmin`` encoding as in ACE,
trained on a sample), then the unique token (count of earlier items holding the
same prefix). Generative index bytes = SID table + trie.

Usage::

    python benchmarks/efficiency.py --out benchmarks/results/efficiency.json --plot benchmarks/results/efficiency.png
    python benchmarks/efficiency.py --quick   # tiny sizes and models: a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor

from grcm.data.query_tokenizer import QueryTokenizer
from grcm.data.synthetic import generate_synthetic_corpus, generate_synthetic_features
from grcm.decoding import BeamSearchOutput, SIDTrie, beams_to_items, constrained_beam_search
from grcm.decoding.trie import sid_table_nbytes
from grcm.io import atomic_path, write_json_atomic
from grcm.rerank.dual_tower import DualTower
from grcm.rerank.index import DenseIndex, DenseIndexConfig
from grcm.rerank.two_stage import rerank_candidates
from grcm.retriever.incremental import make_step_fn
from grcm.retriever.model import GenerativeRetrieverModel
from grcm.tokenizers.kmeans import assign_to_centroids, fit_kmeans
from grcm.tokenizers.unique_token import append_unique_token

RESULTS = Path(__file__).resolve().parent / "results"
TOP_K = 10
METHODS = {
    "generative_beam5": "generative (beam 5)",
    "generative_beam50": "generative (beam 50)",
    "generative_beam5_full": "generative (beam 5), full recomputation",
    "generative_beam50_full": "generative (beam 50), full recomputation",
    "generative_small_beam5": "generative (beam 5), smaller model (--small-d-model)",
    "generative_small_beam50": "generative (beam 50), smaller model (--small-d-model)",
    "generative_beam50_rerank": "generative (beam 50) + dense rerank",
    "faiss_flat": "FAISS Flat",
    "faiss_ivf_pq": "FAISS IVF-PQ",
    "faiss_hnsw": "FAISS HNSW",
}
GENERATIVE_BEAMS = {"generative_beam5": 5, "generative_beam50": 50}
FULL_RECOMPUTE = {"generative_beam5": "generative_beam5_full", "generative_beam50": "generative_beam50_full"}
DENSE = ("faiss_flat", "faiss_ivf_pq", "faiss_hnsw")
ENCODE_CHUNK = 65_536


# ------------------------------------------------------------------------ machine
def machine_info() -> dict:
    """CPU model, core count and library versions of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


class Timer:
    """Context manager: ``with Timer() as t: ...`` then ``t.seconds`` (wall) and ``t.cpu_seconds``.

    ``cpu_seconds`` is this process's CPU time (all its threads): with one thread it is the
    time the work took on an idle core, whatever other processes do to the wall clock.
    """

    def __enter__(self) -> Timer:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


# ------------------------------------------------------------------------ SIDs
def ace_shaped_sids(
    features: np.ndarray,
    seed: int = 0,
    coarse_clusters: int = 128,
    fine_levels: int = 2,
    fine_bits: int = 7,
    train_size: int = 65_536,
) -> tuple[np.ndarray, list[int]]:
    """SIDs ``(k, v_1, ..., v_M, u)`` for features (N, D): K-Means coarse token, residual quantiser, unique token.

    Returns:
        ``codes`` int64 (N, 2 + fine_levels) and their ``vocab_sizes``.
    """
    num_items, dim = features.shape
    centroids = fit_kmeans(features, coarse_clusters, seed=seed)
    coarse = assign_to_centroids(features, centroids)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(num_items, size=min(num_items, train_size), replace=False))
    quantizer = faiss.ResidualQuantizer(dim, fine_levels, fine_bits)
    quantizer.max_beam_size = 1  # greedy: v_m = argmin_j ||r_{m-1} - e_m^j|| (ACE)
    quantizer.train(np.ascontiguousarray(features[sample] - centroids[coarse[sample]]))
    fine = np.empty((num_items, fine_levels), dtype=np.int64)
    for start in range(0, num_items, ENCODE_CHUNK):
        stop = start + ENCODE_CHUNK
        residual = np.ascontiguousarray(features[start:stop] - centroids[coarse[start:stop]], dtype=np.float32)
        fine[start:stop] = faiss.unpack_bitstrings(quantizer.compute_codes(residual), fine_levels, fine_bits)
    prefix = torch.from_numpy(np.concatenate([coarse[:, None], fine], axis=1))
    codes, unique_vocab = append_unique_token(prefix)
    return codes.numpy(), [coarse_clusters] + [2**fine_bits] * fine_levels + [unique_vocab]


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ------------------------------------------------------------------------ queries and models
def benchmark_queries(num_queries: int, seed: int) -> tuple[Tensor, Tensor, list[str]]:
    """``num_queries`` test captions of the synthetic corpus, tokenized with the MiniLM vocabulary."""
    corpus = generate_synthetic_corpus(num_items=num_queries, feature_dim=16, seed=seed)
    texts = [corpus.caption_text[i] for i in corpus.captions_of_split("test")][:num_queries]
    ids, mask = QueryTokenizer.minilm(max_length=32).encode(texts)
    return ids, mask, texts


def generative_model(
    args: argparse.Namespace, vocab_size: int, vocab_sizes: list[int], d_model: int | None = None
) -> GenerativeRetrieverModel:
    """The benchmark's generative network; ``d_model`` overrides ``--d-model`` (then ``ffn_dim = 4 d``)."""
    torch.manual_seed(args.seed)
    return GenerativeRetrieverModel(
        vocab_size=vocab_size,
        sid_vocab_sizes=vocab_sizes,
        d_model=args.d_model if d_model is None else d_model,
        num_heads=4,
        num_encoder_layers=args.encoder_layers,
        num_decoder_layers=args.decoder_layers,
        ffn_dim=args.ffn_dim if d_model is None else 4 * d_model,
        fusion="ace",
    ).eval()


def profile_beam_search(
    model: GenerativeRetrieverModel, trie: SIDTrie, queries: tuple[Tensor, Tensor], beam: int, repeats: int
) -> dict:
    """Where one query's time goes (milliseconds of process CPU time per query, median over ``repeats``).

    Phases: query encoding, encoder-memory projection, decoder steps (cache reordering included),
    the search itself (log-softmax, trie masking, top-k), expansion of the beams to items.
    """
    input_ids, attention_mask = queries
    num_queries = input_ids.shape[0]
    samples: dict[str, list[float]] = {}
    for _ in range(repeats + 1):  # the first round warms up
        phase: dict[str, float] = {}
        with Timer() as timer:
            enc = model.encode(input_ids, attention_mask)
        phase["encode"] = timer.cpu_seconds
        with Timer() as timer:
            step = TimedStep(make_step_fn(model, enc, beam))
        phase["project_memory"] = timer.cpu_seconds
        with Timer() as timer:
            output = constrained_beam_search(step, num_queries, beam, trie, trie.vocab_sizes)
        phase["decoder_steps"] = step.cpu_seconds
        phase["search_overhead"] = timer.cpu_seconds - step.cpu_seconds
        with Timer() as timer:
            beams_to_items(output, trie, TOP_K)
        phase["expand_to_items"] = timer.cpu_seconds
        for name, value in phase.items():
            samples.setdefault(name, []).append(value)
    ms = {name: 1e3 * statistics.median(values[1:]) / num_queries for name, values in samples.items()}
    total = sum(ms.values())
    return {**ms, "total": total, "share": {name: value / total for name, value in ms.items()}}


def dense_model(args: argparse.Namespace, vocab_size: int) -> DualTower:
    torch.manual_seed(args.seed)
    return DualTower(
        vocab_size=vocab_size,
        feature_dim=args.feature_dim,
        embed_dim=args.embed_dim,
        text_layers=args.dense_text_layers,
        text_width=args.embed_dim,
        text_heads=4,
        text_ffn=2 * args.embed_dim,
    ).eval()


class TimedStep:
    """A stateful step function whose calls and cache reorders add up their CPU time."""

    def __init__(self, step: Callable[[Tensor], Tensor]) -> None:
        self.step = step
        self.cpu_seconds = 0.0

    def __call__(self, prefix: Tensor) -> Tensor:
        with Timer() as timer:
            logits = self.step(prefix)
        self.cpu_seconds += timer.cpu_seconds
        return logits

    def reorder(self, rows: Tensor) -> None:
        with Timer() as timer:
            self.step.reorder(rows)
        self.cpu_seconds += timer.cpu_seconds


# ------------------------------------------------------------------------ one corpus size
def build_indexes(
    embeddings: np.ndarray, args: argparse.Namespace, previous: dict | None
) -> tuple[dict[str, DenseIndex], dict]:
    """FAISS Flat, IVF-PQ and HNSW over (N, E) embeddings; returns the built indexes and their build facts.

    An HNSW graph whose build time, extrapolated from the last size it was built
    at as ``1.25 x`` linear in N, exceeds ``--build-budget-s`` is skipped; its facts
    say why. Flat and IVF-PQ are always built: IVF-PQ trains on a fixed-size sample
    and adds items cheaply.
    """
    num_items = embeddings.shape[0]
    configs = {
        "faiss_flat": DenseIndexConfig(kind="flat", use_gpu=False, num_threads=args.build_threads),
        "faiss_ivf_pq": DenseIndexConfig(
            kind="ivf_pq", nprobe=args.nprobe, pq_m=args.pq_m, train_size=args.ivf_train_size, use_gpu=False,
            num_threads=args.build_threads, seed=args.seed,
        ),
        "faiss_hnsw": DenseIndexConfig(
            kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.hnsw_ef_construction,
            ef_search=args.hnsw_ef_search, use_gpu=False, num_threads=args.build_threads,
        ),
    }
    indexes, facts = {}, {}
    for name, config in configs.items():
        before = (previous or {}).get(name, {})
        if name == "faiss_hnsw" and "build_s" in before:
            estimate = 1.25 * before["build_s"] * num_items / before["num_items"]
            if estimate > args.build_budget_s:
                facts[name] = {
                    "skipped": f"estimated build {estimate:.0f} s > --build-budget-s {args.build_budget_s:.0f} s",
                }
                print(f"    skipped {name}: {facts[name]['skipped']}", flush=True)
                continue
        with Timer() as timer:
            index = DenseIndex.build(embeddings, config)
        index.config = replace(index.config, num_threads=args.threads)  # queries run on --threads
        indexes[name] = index
        facts[name] = {
            "num_items": num_items,
            "build_s": timer.seconds,
            "factory": index.config.factory_string(),
            "bytes_per_item": index.bytes_per_item,
            "search_params": {"nprobe": index.config.nprobe} if "ivf" in name else
            {"ef_search": index.config.ef_search} if "hnsw" in name else {},
        }
        print(f"    built {name} ({facts[name]['factory']}) in {timer.seconds:.1f} s", flush=True)
    return indexes, facts


def measure_size(
    num_items: int,
    args: argparse.Namespace,
    queries: tuple[Tensor, Tensor],
    dense: DualTower,
    vocab_size: int,
    previous_builds: dict | None = None,
) -> dict:
    """Build everything for one corpus size and time every method on the same 100 queries."""
    input_ids, attention_mask = queries
    num_queries = input_ids.shape[0]
    result: dict = {"num_items": num_items, "load_average_start": load_average(), "build": {}}
    print(f"N = {num_items:,}", flush=True)
    with Timer() as timer:
        features = generate_synthetic_features(num_items, args.feature_dim, seed=args.seed)
    result["build"]["features_s"] = timer.seconds

    torch.set_num_threads(args.build_threads)
    with Timer() as timer:
        codes, vocab_sizes = ace_shaped_sids(
            features, seed=args.seed, coarse_clusters=args.coarse_clusters, train_size=args.rq_train_size
        )
    result["build"]["sids_s"] = timer.seconds
    with Timer() as timer:
        trie = SIDTrie.from_codes(codes, vocab_sizes)
    result["build"]["trie_s"] = timer.seconds
    with Timer() as timer:
        embeddings = dense.encode_corpus(features)
    result["build"]["item_embeddings_s"] = timer.seconds
    del features
    gc.collect()
    indexes, index_facts = build_indexes(embeddings, args, previous_builds)
    result["index_builds"] = index_facts
    item_embeddings = torch.from_numpy(embeddings)
    model = generative_model(args, vocab_size, vocab_sizes)
    small = generative_model(args, vocab_size, vocab_sizes, args.small_d_model) if args.small_d_model else None
    torch.set_num_threads(args.threads)

    prefixes = np.unique(codes[:, :-1], axis=0).shape[0]
    sid_table_bytes = sid_table_nbytes(codes, vocab_sizes)  # narrowest dtype per level
    sid_table_bytes_int64 = codes.shape[0] * codes.shape[1] * 8  # as SIDBundle.codes holds it in memory
    trie_bytes = trie.nbytes()
    result["sids"] = {
        "vocab_sizes": vocab_sizes,
        "distinct_prefixes": int(prefixes),
        "largest_prefix_bucket": vocab_sizes[-1],
        "trie_level_sizes": list(trie.level_sizes),
        "trie_layouts": list(trie.layouts),
        "trie_max_branch": list(trie.max_branch),
        "sid_table_bytes": sid_table_bytes,
        "sid_table_bytes_int64": sid_table_bytes_int64,
        "trie_bytes": trie_bytes,
        "trie_bytes_by_component": trie.nbytes_by_component(),
    }
    generative_bytes = (sid_table_bytes + trie_bytes) / num_items
    generative_bytes_int64 = (sid_table_bytes_int64 + trie_bytes) / num_items
    embedding_bytes = item_embeddings.numel() * item_embeddings.element_size() / num_items

    # ---- the timed methods: each returns (Q, TOP_K) items; the beam-50 one also leaves its pool
    pools: dict[str, Tensor] = {}
    beams: dict[str, BeamSearchOutput] = {}

    def generative(
        beam: int, keep_pool: bool, incremental: bool = True, network: GenerativeRetrieverModel = model
    ) -> Callable[[], Tensor]:
        name = f"generative{'' if network is model else '_small'}_beam{beam}" + ("" if incremental else "_full")

        def run() -> Tensor:
            enc = network.encode(input_ids, attention_mask)
            step_fn = make_step_fn(network, enc, beam, incremental=incremental)
            output = constrained_beam_search(step_fn, num_queries, beam, trie, vocab_sizes)
            beams[name] = output
            pool = beams_to_items(output, trie, None if keep_pool else TOP_K)
            if keep_pool:
                pools["beam50"] = pool
            return pool[:, :TOP_K]

        return run

    def rerank() -> Tensor:
        query_vectors = dense.encode_queries(input_ids, attention_mask)
        return rerank_candidates(query_vectors, pools["beam50"], item_embeddings, TOP_K)[0]

    def faiss_search(index: DenseIndex) -> Callable[[], Tensor]:
        def run() -> Tensor:
            query_vectors = dense.encode_queries(input_ids, attention_mask)
            return torch.from_numpy(index.search(query_vectors, TOP_K)[1])

        return run

    timed: dict[str, Callable[[], Tensor]] = {
        "generative_beam5": generative(5, keep_pool=False),
        "generative_beam50": generative(50, keep_pool=True),
        "generative_beam5_full": generative(5, keep_pool=False, incremental=False),
        "generative_beam50_full": generative(50, keep_pool=False, incremental=False),
        **({} if small is None else {
            "generative_small_beam5": generative(5, keep_pool=False, network=small),
            "generative_small_beam50": generative(50, keep_pool=False, network=small),
        }),
        "rerank_of_beam50": rerank,
        **{name: faiss_search(index) for name, index in indexes.items()},
    }
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in timed}
    outputs: dict[str, Tensor] = {}
    with torch.inference_mode():
        for repeat in range(args.warmup + args.repeats):
            for name, run in timed.items():
                with Timer() as timer:
                    outputs[name] = run()
                if repeat >= args.warmup:
                    seconds[name].append(timer.seconds)
                    cpu_seconds[name].append(timer.cpu_seconds)
    for clock in (seconds, cpu_seconds):
        clock["generative_beam50_rerank"] = [
            a + b for a, b in zip(clock["generative_beam50"], clock["rerank_of_beam50"])
        ]

    same_beams = {}
    for name, full in FULL_RECOMPUTE.items():
        a, b = beams[name], beams[full]
        finite = torch.isfinite(a.scores)
        same_beams[name] = {
            "identical_sequences": bool(torch.equal(a.sequences, b.sequences)),
            "scores_allclose": bool(
                torch.equal(finite, torch.isfinite(b.scores))
                and torch.allclose(a.scores[finite], b.scores[finite], atol=1e-4, rtol=1e-4)
            ),
            "max_abs_score_difference": float((a.scores[finite] - b.scores[finite]).abs().max()),
        }
    result["incremental_vs_full_recompute"] = same_beams
    flat = outputs["faiss_flat"].numpy()

    def recall_vs_flat(found: Tensor) -> float:
        found = found.numpy()
        return float(np.mean([len(set(f) & set(e)) / TOP_K for f, e in zip(found, flat)]))

    pool = pools["beam50"]
    methods = {}
    for name in METHODS:
        if name.startswith("generative_small") and small is None:
            continue
        if name not in seconds:
            methods[name] = {"label": METHODS[name], "queries_per_s": None, "queries_per_cpu_s": None,
                             "index_bytes_per_item": None, **index_facts[name]}
            continue
        median, median_cpu = statistics.median(seconds[name]), statistics.median(cpu_seconds[name])
        entry = {
            "label": METHODS[name],
            "queries_per_s": num_queries / median,
            "queries_per_cpu_s": num_queries / median_cpu,
            "median_batch_s": median,
            "median_batch_cpu_s": median_cpu,
            "batch_s": seconds[name],
            "batch_cpu_s": cpu_seconds[name],
        }
        if name.startswith("generative"):
            entry["index_bytes_per_item"] = generative_bytes
            entry["index_bytes_per_item_int64_sid_table"] = generative_bytes_int64
            if name.endswith("rerank"):
                entry["index_bytes_per_item"] += embedding_bytes
                entry["index_bytes_per_item_int64_sid_table"] += embedding_bytes
                entry["index_note"] = "SID table + trie + float32 item embeddings for the rerank"
                entry["rerank_median_s"] = statistics.median(seconds["rerank_of_beam50"])
                entry["candidates_per_query"] = float((pool >= 0).sum(1).float().mean())
            else:
                entry["index_note"] = "SID table (narrowest integer type per level) + trie"
        else:
            entry.update(index_facts[name])
            entry["index_bytes_per_item"] = entry.pop("bytes_per_item")
            if name != "faiss_flat":
                entry["recall@10_vs_flat"] = recall_vs_flat(outputs[name])
        methods[name] = entry
    result["methods"] = methods
    result["model_bytes"] = {
        "generative_model_parameters": parameter_bytes(model),
        "dense_text_tower_parameters": parameter_bytes(dense.text_tower),
    }
    result["ratios"] = throughput_ratios(methods)
    with torch.inference_mode():
        result["profile_beam5_ms_per_query"] = profile_beam_search(
            model, trie, (input_ids, attention_mask), 5, args.repeats
        )
    if small is not None:
        result["small_model"] = {"d_model": args.small_d_model, "ffn_dim": 4 * args.small_d_model,
                                 "parameters_bytes": parameter_bytes(small)}
    result["load_average_end"] = load_average()
    print(_size_summary(result), flush=True)
    return result


def throughput_ratios(methods: dict) -> dict:
    """Throughput ratios of one size, side by side from one run, per timing basis.

    ``"<generative> / <dense>"``: generative beam 5 and 50 over each FAISS index;
    ``"<generative> speed-up vs full recomputation"``: incremental over full-recomputation decoding.
    """
    ratios: dict = {}
    for basis, key in (("cpu_time", "queries_per_cpu_s"), ("wall_clock", "queries_per_s")):
        entry = {}
        for name in [*GENERATIVE_BEAMS, "generative_small_beam5", "generative_small_beam50"]:
            if name not in methods:
                continue
            rate = methods[name][key]
            for dense in DENSE:
                if methods[dense][key] is not None:
                    entry[f"{name} / {dense}"] = rate / methods[dense][key]
            if name in FULL_RECOMPUTE:
                entry[f"{name} speed-up vs full recomputation"] = rate / methods[FULL_RECOMPUTE[name]][key]
        ratios[basis] = entry
    return ratios


def _size_summary(result: dict) -> str:
    ratios = "; ".join(f"{name} {value:.2f}x" for name, value in result["ratios"]["cpu_time"].items())
    same = ", ".join(
        f"{name}: identical beams {entry['identical_sequences']}, scores allclose {entry['scores_allclose']}"
        for name, entry in result["incremental_vs_full_recompute"].items()
    )
    parts = [
        f"{name} {entry['queries_per_s']:.1f} q/s ({entry['queries_per_cpu_s']:.1f}/cpu-s) "
        f"{entry['index_bytes_per_item']:.1f} B/item"
        if entry["queries_per_s"] is not None else f"{name} skipped"
        for name, entry in result["methods"].items()
    ]
    return (
        f"  N={result['num_items']:,}: " + "; ".join(parts)
        + f"\n  ratios (CPU time): {ratios}\n  incremental vs full recomputation: {same}"
    )


# ------------------------------------------------------------------------ targets, tables, plot
def evaluate_targets(sizes: list[dict]) -> dict:
    """The issue's targets, evaluated on the sizes of this run, for wall-clock and CPU-time throughput."""
    by_size = {entry["num_items"]: entry["methods"] for entry in sizes}
    targets: dict = {}
    band = [n for n in sorted(by_size) if 10_000 <= n <= 1_000_000]
    largest = max(by_size)
    flat = by_size[largest]["faiss_flat"]
    for basis, key in (("wall clock", "queries_per_s"), ("CPU time", "queries_per_cpu_s")):
        for name in GENERATIVE_BEAMS:
            if len(band) >= 2:
                rates = [by_size[n][name][key] for n in band]
                variation = (max(rates) - min(rates)) / max(rates)
                targets[f"{name} throughput variation ({basis})"] = {
                    "sizes": band,
                    "definition": f"(max - min) / max of {key} over the sizes",
                    "value": variation,
                    "target": "<= 0.25",
                    "met": variation <= 0.25,
                }
            ratio = by_size[largest][name][key] / flat[key]
            minimum = 10 if name == "generative_beam5" else 1
            targets[f"{name} speedup vs FAISS Flat ({basis})"] = {
                "num_items": largest,
                "value": ratio,
                "target": f">= {minimum} at 1M items",
                "met": ratio >= minimum,
            }
            full = by_size[largest][FULL_RECOMPUTE[name]][key]
            targets[f"{name} speed-up vs full recomputation ({basis})"] = {
                "num_items": largest,
                "value": by_size[largest][name][key] / full,
                "target": "> 1, same beams",
                "met": by_size[largest][name][key] > full,
            }
    generative = by_size[largest]["generative_beam5"]
    for key, label in (("index_bytes_per_item", "narrowest-type SID table"),
                       ("index_bytes_per_item_int64_sid_table", "int64 SID table")):
        ratio = flat["index_bytes_per_item"] / generative[key]
        targets[f"FAISS Flat bytes / generative bytes per item ({label})"] = {
            "num_items": largest,
            "value": ratio,
            "target": ">= 50 (generative index <= 1/50 of Flat's bytes per item)",
            "met": ratio >= 50,
        }
    return targets


def markdown_tables(sizes: list[dict]) -> str:
    """Two Markdown tables (queries/s and index bytes/item): one row per method, one column per size."""
    header = "| method | " + " | ".join(f"{entry['num_items']:,}" for entry in sizes) + " |"
    rule = "|---|" + "---:|" * len(sizes)
    blocks = []
    for title, key, fmt in (("queries/s, wall clock (100 concurrent queries)", "queries_per_s", "{:,.1f}"),
                            ("queries per CPU-second (100 concurrent queries)", "queries_per_cpu_s", "{:,.1f}"),
                            ("index bytes per item", "index_bytes_per_item", "{:,.1f}")):
        cell = lambda value, fmt=fmt: "skipped" if value is None else fmt.format(value)  # noqa: E731
        rows = [
            f"| {label} | " + " | ".join(cell(entry["methods"][name][key]) for entry in sizes) + " |"
            for name, label in METHODS.items()
            if name in sizes[0]["methods"]
        ]
        blocks.append("\n".join([f"**{title}**", "", header, rule, *rows]))
    return "\n\n".join(blocks)


def plot(report: dict, path: Path) -> None:
    """Throughput and index bytes per item vs corpus size (log axes), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [entry["num_items"] for entry in report["sizes"]]
    single_thread = report["settings"]["threads"] == 1
    throughput_key = "queries_per_cpu_s" if single_thread else "queries_per_s"
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5.4))
    styles = {"generative_beam50_rerank": ":^"}
    for name, label in METHODS.items():
        if name not in report["sizes"][0]["methods"]:
            continue
        style = styles.get(name, "-o" if name.startswith("generative") else "--s")
        for axis, key in ((left, throughput_key), (right, "index_bytes_per_item")):
            points = [(n, e["methods"][name][key]) for n, e in zip(sizes, report["sizes"])]
            points = [(n, value) for n, value in points if value is not None]  # skipped builds leave gaps
            axis.plot([n for n, _ in points], [value for _, value in points], style, label=label)
    left.set(xscale="log", yscale="log", xlabel="corpus size (items)",
             ylabel="queries per CPU-second (1 thread)" if single_thread else "queries / s (wall clock)",
             title="Throughput, 100 concurrent queries")
    right.set(xscale="log", yscale="log", xlabel="corpus size (items)", ylabel="bytes / item",
              title="Index size per item")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    machine = report["machine"]
    figure.suptitle(
        f"{machine['cpu']}, {report['settings']['threads']} thread(s) for queries; "
        f"torch {machine['torch']}, faiss {machine['faiss']}",
        fontsize=9,
    )
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "efficiency.json", help="JSON report")
    parser.add_argument("--plot", type=Path, default=RESULTS / "efficiency.png", help="PNG plot")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and models: a smoke run in seconds")
    parser.add_argument("--plot-only", action="store_true", help="redraw --plot from an existing --out report")
    parser.add_argument("--queries", type=int, default=100, help="concurrent queries per batch (ACE Fig. 4: 100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per method first")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads while answering queries (torch, faiss)")
    parser.add_argument("--build-threads", type=int, default=1,
                        help="CPU threads while building SIDs, embeddings and indexes (more is faster on an idle "
                        "machine, much slower on an oversubscribed one)")
    parser.add_argument("--feature-dim", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=256, help="dual-tower embedding dimension")
    parser.add_argument("--dense-text-layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128,
                        help="generative retriever width (128: experiments/synthetic/ace_retriever.yaml; paper scale 256)")
    parser.add_argument("--encoder-layers", type=int, default=3)
    parser.add_argument("--decoder-layers", type=int, default=2)
    parser.add_argument("--ffn-dim", type=int, default=512)
    parser.add_argument("--small-d-model", type=int, default=None,
                        help="also time a generative model of this width (ffn 4x, same depth), side by side")
    parser.add_argument("--coarse-clusters", type=int, default=128)
    parser.add_argument("--rq-train-size", type=int, default=65_536)
    parser.add_argument("--ivf-train-size", type=int, default=10_000)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--pq-m", type=int, default=32, help="PQ sub-quantisers (bytes per PQ code)")
    parser.add_argument("--build-budget-s", type=float, default=600.0,
                        help="skip an HNSW build whose time, extrapolated from a smaller size, exceeds this")
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--hnsw-ef-construction", type=int, default=40)
    parser.add_argument("--hnsw-ef-search", type=int, default=64)
    parser.add_argument(
        "--faiss-blas-threshold", type=int, default=20,
        help="faiss.cvar.distance_compute_blas_threshold: exact search uses BLAS from this many queries on "
        "(faiss 1.15 defaults to 128000, whose non-BLAS path is ~4x slower for 100-query batches)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.warmup = [1_000, 4_000], 1, 1
        args.d_model, args.encoder_layers, args.decoder_layers, args.ffn_dim = 64, 1, 1, 128
        args.embed_dim, args.dense_text_layers, args.coarse_clusters = 64, 1, 16
        args.rq_train_size, args.ivf_train_size, args.pq_m = 4_000, 4_000, 16
    if min(args.sizes) < 2**8:
        parser.error("--sizes must be >= 256 (IVF-PQ trains 256 codes per sub-quantiser)")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        report = json.loads(args.out.read_text())
        plot(report, args.plot)
        print(f"wrote {args.plot}")
        return report
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    faiss_default_blas_threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = args.faiss_blas_threshold
    input_ids, attention_mask, texts = benchmark_queries(args.queries, args.seed)
    vocab_size = QueryTokenizer.minilm().vocab_size
    dense = dense_model(args, vocab_size)
    report: dict = {
        "benchmark": "efficiency",
        "machine": machine_info(),
        "load_average_start": load_average(),
        "settings": {
            "sizes": sorted(args.sizes),
            "concurrent_queries": args.queries,
            "top_k": TOP_K,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "build_threads": args.build_threads,
            "quick": args.quick,
            "feature_dim": args.feature_dim,
            "generative_model": {
                "class": "grcm.retriever.model.GenerativeRetrieverModel",
                "weights": "random (Xavier init, seeded); throughput does not depend on the weights",
                "d_model": args.d_model,
                "encoder_layers": args.encoder_layers,
                "decoder_layers": args.decoder_layers,
                "ffn_dim": args.ffn_dim,
                "fusion": "ace",
                "query_vocab": "MiniLM WordPiece",
            },
            "dense_model": {
                "class": "grcm.rerank.dual_tower.DualTower",
                "weights": "random (seeded); items are its item-tower embeddings of the synthetic features",
                "embed_dim": args.embed_dim,
                "text_layers": args.dense_text_layers,
            },
            "sids": "ACE-shaped, from the features: K-Means coarse token (faiss, "
            f"{args.coarse_clusters} clusters) + 2-level faiss ResidualQuantizer over the residuals "
            f"(128 codes per level, greedy argmin encoding, trained on <= {args.rq_train_size} residuals) "
            "+ unique token; not a trained RQ-VAE",
            "queries": f"{args.queries} test captions of the synthetic corpus, e.g. {texts[0]!r}",
            "timing": "per batch of concurrent queries, query text encoding included; methods timed "
            "round-robin per repeat; queries/s = batch size / median batch wall time, queries per CPU-second "
            "= batch size / median batch process CPU time (with 1 thread: the rate on an idle core, robust "
            "to other processes' load). The rerank method adds the rerank time of each repeat to the "
            "beam-50 time of the same repeat.",
            "indexes": {
                "flat": f"exact inner product; faiss distance_compute_blas_threshold set to "
                f"{args.faiss_blas_threshold} (faiss default here: {faiss_default_blas_threshold})",
                "ivf_pq": f"nlist from the training sample (<= {args.ivf_train_size} vectors), "
                f"PQ{args.pq_m}x8, nprobe {args.nprobe}",
                "hnsw": f"HNSW{args.hnsw_m}, efConstruction {args.hnsw_ef_construction}, "
                f"efSearch {args.hnsw_ef_search}",
            },
        },
        "sizes": [],
    }
    last_builds: dict[str, dict] = {}  # per index, the facts of its largest build so far
    for num_items in sorted(args.sizes):
        report["sizes"].append(
            measure_size(num_items, args, (input_ids, attention_mask), dense, vocab_size, last_builds)
        )
        for name, facts in report["sizes"][-1]["index_builds"].items():
            if "build_s" in facts:
                last_builds[name] = facts
        gc.collect()
    report["targets"] = evaluate_targets(report["sizes"])
    report["tables_markdown"] = markdown_tables(report["sizes"])
    report["load_average_end"] = load_average()
    report["wall_s"] = time.perf_counter() - started
    write_json_atomic(args.out, report)
    plot(report, args.plot)
    print(report["tables_markdown"])
    largest = report["sizes"][-1]
    print(f"ratios at {largest['num_items']:,} items (queries per CPU-second, one run, side by side):")
    for name, value in largest["ratios"]["cpu_time"].items():
        print(f"  {name}: {value:.2f}x")
    profile = largest["profile_beam5_ms_per_query"]
    print("beam-5 query, ms of CPU time: " + ", ".join(
        f"{name} {profile[name]:.2f} ({100 * share:.0f}%)" for name, share in profile["share"].items()
    ) + f"; total {profile['total']:.2f}")
    for name, target in report["targets"].items():
        print(f"target {name}: {target['value']:.3f} ({target['target']}) -> {'met' if target['met'] else 'NOT met'}")
    print(f"wrote {args.out} and {args.plot} in {report['wall_s']:.0f} s", flush=True)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
