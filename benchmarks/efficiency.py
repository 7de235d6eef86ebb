"""Efficiency vs corpus size: generative retrieval against dense FAISS indexes at equal recall (ACE Fig. 4 setting).

One run, one machine. For every corpus size N (default 1k, 10k, 100k, 1M synthetic items) it measures
queries per second (wall clock and per CPU-second) with 100 concurrent queries (one batch of 100
queries, timed several times) and index bytes per item.

**Dense side (a fair baseline).** The FAISS indexes search embeddings with the structure of trained
ones: the trained dual tower of the demo (``--dual-tower``, default ``runs/demo/dual_tower``'s best
checkpoint, trained on the 2,000-item synthetic corpus) embeds the synthetic generator's features of
all N items with its item tower (the generator settings the checkpoint was trained with, at N items),
and the queries, generated captions, with its text tower and its own query vocabulary. The items are
then as clustered, and the queries as close to their items, as the trained model makes them, which
decides how well an approximate index works (on i.i.d. or random-model vectors HNSW and IVF-PQ reach
a recall@10 of about 0.2 at 1M items). ``--dual-tower random`` keeps a random-weight tower (the
``--quick`` smoke run's default). Rows:

* ``faiss_flat``: exact inner-product search (``IndexFlatIP``), the reference of every recall;
* ``faiss_hnsw_default``: HNSW16 (efConstruction 40) at faiss' default efSearch 16, whatever its recall;
* ``faiss_hnsw``: the same graph (or, with ``--hnsw-target-m``, a denser one) at the smallest efSearch of
  the sweep whose recall@10 against Flat is >= ``--target-recall`` (0.95); a sweep stops early at a setting
  slower than exact search, and when none reaches the target the row is the highest-recall setting
  (``reached_target_on_tuning_queries`` false);
* ``faiss_ivf_pq``: IVF-PQ (nlist from the training sample, PQ``--pq-m``x8) at the smallest nprobe
  reaching the target recall, or, when no nprobe does, the largest (``reached_target`` says which);
* ``faiss_ivf_pq_refine`` (only when plain IVF-PQ cannot reach the target): the same IVF-PQ index whose
  ``k_factor * 10`` candidates are re-scored exactly (``IndexRefineFlat``, full vectors stored too), at
  the cheapest (nprobe, k_factor) of the sweep reaching the target.

Settings are picked on *tuning* queries (``--tuning-queries`` validation captions of the generator,
other texts than the timed test captions), never on the timed ones; every row also reports its recall
on the timed queries. ``recall@10_vs_flat`` counts returned ids among Flat's 10; because the synthetic
corpus has items with identical attributes (ties), ``score_recall@10_vs_flat`` also counts a returned
item whose exact score reaches Flat's 10th score (1e-5 tolerance).

**Generative side.** :class:`GenerativeRetrieverModel` of the trained recipe's shape (d = 128, 3 + 2
layers, ffn 512, ACE fusion; random weights: throughput does not depend on what the weights say)
encodes the queries (MiniLM vocabulary), then trie-constrained beam search over the SIDs
(:mod:`grcm.decoding`) with incremental decoding (:mod:`grcm.retriever.incremental`) and expansion
to the top 10 items:

* ``generative_beam5`` / ``generative_beam50``: the network under ``--inference-quantization``
  (:mod:`grcm.retriever.cpu_inference`; default ``int8``, the faster CPU path kept);
* ``generative_beam5_float32`` / ``generative_beam50_float32``: the float32 reference (rows present
  when the headline rows are quantised);
* ``generative_beam5_<candidate>`` / ``generative_beam50_<candidate>``: each CPU speed candidate of
  ``--candidates`` alone on the float32 network: ``int8``, ``bf16`` (lossy, see the demo accuracy
  below), ``onnx`` (the network exported to ONNX and run by ONNX Runtime, :mod:`grcm.retriever.onnx_inference`;
  lossless), ``onnx_int8`` (the same with ONNX Runtime's dynamic int8 quantisation; lossy), ``length_buckets``
  (the batch split into ``--length-buckets`` groups of similar query length, each padded only to its own
  longest query; lossless), ``compile`` (``torch.compile`` of the decode step, compile time reported apart;
  lossless). ``onnx`` / ``onnx_int8`` need ``pip install -e .[onnx]``;
* ``generative_beam5_full`` / ``generative_beam50_full``: the float32 decoder recomputed over the whole
  prefix at every level (the reference path of incremental decoding);
* ``generative_beam50_rerank``: the beam-50 pool re-ranked by the dual tower
  (:func:`grcm.rerank.two_stage.rerank_candidates`); its time is the beam-50 time plus the rerank time
  of the same repeat.

Every generative row reports how many queries got exactly the float32 reference's beams
(``same_beams``): 1.0 is required of the lossless options. The lossy options' accuracy cost is
measured on the demo (``--demo-retriever``, default ``runs/demo/ace_retriever``'s best checkpoint):
R@1 / R@10 of its 2,000 test queries at beam 5 and 25 under every quantisation (``demo_accuracy``).

Every method's time includes encoding the query text. Methods are timed round-robin within each
repeat, so a load spike on a shared machine hits all of them alike; rates are 100 / median batch
time, per wall-clock second and per CPU-second of this process (with ``--threads 1``: the rate on an
idle core). The machine (CPU model, cores, torch / faiss versions, torch's CPU capability, faiss'
compile options, the BLAS libraries of ``threadpoolctl``) is recorded in the JSON and printed.

SIDs are ACE-shaped and computed from the real synthetic features, without training an RQ-VAE:
coarse token = K-Means (faiss, 128 clusters), fine tokens = a 2-level residual quantiser over the
residuals ``x - c_k`` (faiss ``ResidualQuantizer``, 128 codes per level, greedy ``argmin`` encoding as
in ACE, trained on a sample), then the unique token. Generative index bytes = SID table + trie.

Usage::

    python benchmarks/efficiency.py --sizes 1000000 --threads 1 --build-threads 2 \
        --inference-quantization onnx_int8 --candidates int8 onnx bf16 length_buckets   # the 1M comparison
    python benchmarks/efficiency.py --quick   # tiny sizes and models: a smoke run in seconds
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
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import torch
from torch import Tensor

from grcm.checkpoint import read_checkpoint
from grcm.data.query_tokenizer import QueryTokenizer
from grcm.data.synthetic import SyntheticConfig, generate_synthetic_corpus, generate_synthetic_features
from grcm.decoding import BeamSearchOutput, SIDTrie, beams_to_items, constrained_beam_search
from grcm.decoding.trie import sid_table_nbytes
from grcm.io import atomic_path, write_json_atomic
from grcm.rerank.dual_tower import DualTower
from grcm.rerank.faiss_runtime import faiss_threads
from grcm.rerank.index import DenseIndex, DenseIndexConfig
from grcm.rerank.two_stage import rerank_candidates
from grcm.retriever.cpu_inference import (
    INFERENCE_QUANTIZATIONS,
    PreparedNetwork,
    available_inference_quantizations,
)
from grcm.retriever.incremental import make_step_fn
from grcm.retriever.model import GenerativeRetrieverModel
from grcm.tokenizers.kmeans import assign_to_centroids, fit_kmeans
from grcm.tokenizers.unique_token import append_unique_token

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path("runs/demo")
TOP_K = 10
BEAMS = (5, 50)
CANDIDATES = ("int8", "bf16", "onnx", "onnx_int8", "length_buckets", "compile")
LOSSLESS = ("length_buckets", "compile", "full", "onnx")
DENSE_LABELS = {
    "faiss_flat": "FAISS Flat (exact)",
    "faiss_hnsw_default": "FAISS HNSW16, efSearch 16 (default)",
    "faiss_hnsw": "FAISS HNSW, efSearch at the target recall",
    "faiss_ivf_pq": "FAISS IVF-PQ, nprobe at the target recall",
    "faiss_ivf_pq_refine": "FAISS IVF-PQ + exact refine, at the target recall",
}
HNSW_EF_SWEEP = (16, 32, 64, 128, 256, 512, 1024, 2048)
NPROBE_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256)
REFINE_K_FACTORS = (2, 4, 8, 16)
ENCODE_CHUNK = 65_536
TIE_TOLERANCE = 1e-4  # beam scores this close are ties under float rounding (random weights make many)


def method_labels(args: argparse.Namespace) -> dict[str, str]:
    """Every row of this run, in table order: name -> label."""
    labels: dict[str, str] = {}
    quantization = args.inference_quantization
    for beam in BEAMS:
        labels[f"generative_beam{beam}"] = f"generative (beam {beam}), {quantization_label(quantization)}"
    if quantization != "none":
        for beam in BEAMS:
            labels[f"generative_beam{beam}_float32"] = f"generative (beam {beam}), float32"
    for candidate in args.candidates:
        if candidate == quantization:
            continue
        for beam in BEAMS:
            labels[f"generative_beam{beam}_{candidate}"] = f"generative (beam {beam}), {candidate_label(candidate, args)}"
    for beam in BEAMS:
        labels[f"generative_beam{beam}_full"] = f"generative (beam {beam}), float32, full recomputation"
    if args.small_d_model:
        for beam in BEAMS:
            labels[f"generative_small_beam{beam}"] = f"generative (beam {beam}), d = {args.small_d_model}"
    if args.small_checkpoint:
        shape = args.small_shape
        for beam in BEAMS:
            labels[f"generative_small_beam{beam}"] = (
                f"generative (beam {beam}), {quantization_label(args.inference_quantization)}, "
                f"{shape['num_encoder_layers']} + {shape['num_decoder_layers']} layers, d = {shape['d_model']}, "
                f"ffn {shape['ffn_dim']} ({args.small_checkpoint})"
            )
    labels["generative_beam50_rerank"] = "generative (beam 50) + dense rerank"
    labels.update(DENSE_LABELS)
    return labels


def quantization_label(quantization: str) -> str:
    return {"none": "float32", "int8": "int8 dynamic quantisation", "bf16": "bfloat16",
            "onnx": "float32 under ONNX Runtime", "onnx_int8": "int8 dynamic quantisation under ONNX Runtime"}[quantization]


def candidate_label(candidate: str, args: argparse.Namespace) -> str:
    if candidate in INFERENCE_QUANTIZATIONS:
        return quantization_label(candidate)
    if candidate == "length_buckets":
        return f"float32, {args.length_buckets} length buckets"
    return "float32, torch.compile'd decode step"


# ------------------------------------------------------------------------ machine
def machine_info() -> dict:
    """CPU model, core count, library versions, torch's CPU capability, faiss' compile options and BLAS."""
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in (platform.processor(), platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        blas = [
            {key: entry.get(key) for key in ("user_api", "internal_api", "prefix", "version", "architecture",
                                             "threading_layer", "num_threads")}
            for entry in threadpool_info()
        ]
    except ImportError:
        blas = "threadpoolctl is not installed"
    isa = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "isa_flags": [flag for flag in isa if flag in flags],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_quantized_engine": torch.backends.quantized.engine,
        "faiss": faiss.__version__,
        "faiss_compile_options": faiss.get_compile_options().strip(),
        "numpy": np.__version__,
        "threadpoolctl": blas,
    }


def machine_lines(machine: dict) -> list[str]:
    """The machine facts as printed lines."""
    lines = [
        f"machine: {machine['cpu']}, {machine['logical_cores']} logical cores, {machine['memory_gib']} GiB; "
        f"ISA {' '.join(machine['isa_flags'])}",
        f"  torch {machine['torch']} (CPU capability {machine['torch_cpu_capability']}, quantized engine "
        f"{machine['torch_quantized_engine']}), faiss {machine['faiss']} ({machine['faiss_compile_options']}), "
        f"numpy {machine['numpy']}",
    ]
    if isinstance(machine["threadpoolctl"], list):
        for entry in machine["threadpoolctl"]:
            lines.append(f"  threadpoolctl: {entry['internal_api']} {entry['version'] or ''} "
                         f"({entry['prefix']}, architecture {entry['architecture']}, {entry['num_threads']} threads)")
    return lines


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
def benchmark_texts(num_queries: int, num_tuning: int, seed: int) -> tuple[list[str], list[str]]:
    """Timed queries (test captions) and tuning queries (validation captions) of a generated corpus.

    Both are captions of the synthetic generator (``seed``); the tuning texts pick the FAISS search
    settings and are never timed.
    """
    corpus = generate_synthetic_corpus(num_items=max(num_queries, num_tuning), feature_dim=16, seed=seed)
    timed = [corpus.caption_text[i] for i in corpus.captions_of_split("test")][:num_queries]
    tuning = [corpus.caption_text[i] for i in corpus.captions_of_split("val")][:num_tuning]
    return timed, tuning


def generative_model(
    args: argparse.Namespace, vocab_size: int, vocab_sizes: list[int], d_model: int | None = None,
    shape: dict | None = None,
) -> GenerativeRetrieverModel:
    """The benchmark's generative network; ``d_model`` overrides ``--d-model`` (then ``ffn_dim = 4 d``);
    ``shape`` (:data:`SHAPE_FIELDS` of a checkpoint, :func:`checkpoint_shape`) overrides every size flag."""
    torch.manual_seed(args.seed)
    sizes = {"d_model": args.d_model if d_model is None else d_model, "num_heads": 4,
             "num_encoder_layers": args.encoder_layers, "num_decoder_layers": args.decoder_layers,
             "ffn_dim": args.ffn_dim if d_model is None else 4 * d_model, "fusion": "ace"}
    return GenerativeRetrieverModel(vocab_size=vocab_size, sid_vocab_sizes=vocab_sizes, **{**sizes, **(shape or {})}).eval()


SHAPE_FIELDS = ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers", "ffn_dim", "fusion")


def checkpoint_shape(path: Path) -> dict:
    """The network sizes (:data:`SHAPE_FIELDS`) of a trained ACE retriever checkpoint's hyperparameters."""
    hparams = read_checkpoint(path, "--small-checkpoint").get("hyper_parameters", {})
    missing = [field for field in SHAPE_FIELDS if field not in hparams]
    if missing:
        raise SystemExit(f"--small-checkpoint {path}: hyper_parameters lack {missing}; pass a GenerativeRetriever "
                         "checkpoint (e.g. runs/demo/ace_retriever/checkpoints/best.ckpt)")
    return {field: hparams[field] for field in SHAPE_FIELDS}


@dataclass
class DenseSide:
    """The dual tower that embeds items and queries for FAISS, its query tokenizer and generator settings.

    Attributes:
        model: :class:`DualTower` in evaluation mode.
        tokenizer: the query tokenizer the tower was trained with.
        generator: :class:`SyntheticConfig` fields (besides ``num_items``) the item features are drawn with.
        description: what the weights are, for the JSON.
    """

    model: DualTower
    tokenizer: QueryTokenizer
    generator: dict
    description: str


def load_dense_side(args: argparse.Namespace) -> DenseSide:
    """The trained dual tower of ``--dual-tower`` (checkpoint) or, with ``random``, a seeded random one."""
    if args.dual_tower == "random":
        torch.manual_seed(args.seed)
        tokenizer = QueryTokenizer.minilm(max_length=32)
        model = DualTower(
            vocab_size=tokenizer.vocab_size, feature_dim=args.feature_dim, embed_dim=args.embed_dim,
            text_layers=args.dense_text_layers, text_width=args.embed_dim, text_heads=4,
            text_ffn=2 * args.embed_dim,
        ).eval()
        return DenseSide(model, tokenizer, {"feature_dim": args.feature_dim, "seed": args.seed},
                         "random (seeded); items are its item-tower embeddings of the synthetic features")
    path = Path(args.dual_tower)
    if not path.is_file():
        raise SystemExit(
            f"--dual-tower {path}: no such checkpoint. Train the demo's dual tower first (`make demo` writes "
            f"{DEMO / 'dual_tower/checkpoints/best.ckpt'}), point --dual-tower at a DualTower checkpoint of the "
            "synthetic corpus, or pass --dual-tower random (untrained: the dense indexes then barely work)."
        )
    checkpoint = read_checkpoint(path, "--dual-tower")
    vocab = next((state["query_tokenizer"] for state in checkpoint.values()
                  if isinstance(state, dict) and "query_tokenizer" in state), None)
    data = (checkpoint.get("grcm_run") or {}).get("data", {}).get("init_args", {})
    if vocab is None or not data:
        raise SystemExit(
            f"--dual-tower {path}: the checkpoint carries no query vocabulary or data settings; use a checkpoint "
            "written by `grcm fit` on SyntheticDataModule (e.g. the demo's runs/demo/dual_tower)."
        )
    model = DualTower.load_from_checkpoint(path, map_location="cpu").eval()
    fields = set(SyntheticConfig.__dataclass_fields__) - {"num_items", "captions_per_item"}
    generator = {key: value for key, value in data.items() if key in fields}
    tokenizer = QueryTokenizer.from_json(vocab, int(data.get("max_query_length", 32)))
    return DenseSide(model, tokenizer, generator,
                     f"trained: {path} (epoch {checkpoint.get('epoch')}, trained on {data.get('num_items')} "
                     "synthetic items); items are its item-tower embeddings of the generator's features at N items")


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


# ------------------------------------------------------------------------ generative search
def search_in_length_buckets(
    search: Callable[[Tensor, Tensor], BeamSearchOutput], input_ids: Tensor, attention_mask: Tensor, buckets: int
) -> BeamSearchOutput:
    """``search`` on ``buckets`` groups of queries of similar length, each trimmed to its longest query.

    Queries (B, T) are sorted by length and split into ``buckets`` near-equal groups; the beams come back
    in the input order. Every query's beams are those of one search over the whole batch (padding is
    masked), up to float rounding.
    """
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    parts = []
    for rows in order.tensor_split(min(buckets, len(order))):
        width = max(int(lengths[rows].max()), 1)
        parts.append(search(input_ids[rows, :width], attention_mask[rows, :width]))
    sequences, scores = torch.cat([p.sequences for p in parts]), torch.cat([p.scores for p in parts])
    out_sequences, out_scores = torch.empty_like(sequences), torch.empty_like(scores)
    out_sequences[order], out_scores[order] = sequences, scores
    return BeamSearchOutput(sequences=out_sequences, scores=out_scores)


def generative_search(
    model: GenerativeRetrieverModel, trie: SIDTrie, beam: int, option: str = "none", incremental: bool = True,
    length_buckets: int = 1,
) -> Callable[[Tensor, Tensor], BeamSearchOutput]:
    """A search function ``(input_ids, attention_mask) -> beams`` over ``model`` with one CPU option.

    ``option``: an ``inference_quantization`` ("none", "int8", "bf16"; prepared once, here),
    "length_buckets" (``length_buckets`` groups) or "compile" (``torch.compile`` of the decode step).
    """
    prepared = PreparedNetwork()
    quantization = option if option in INFERENCE_QUANTIZATIONS else "none"
    with prepared.use(model, quantization, torch.device("cpu")):
        pass  # quantise / copy the weights now, outside the timed calls

    def search(input_ids: Tensor, attention_mask: Tensor) -> BeamSearchOutput:
        with prepared.use(model, quantization, torch.device("cpu")) as network:
            enc = network.encode(input_ids, attention_mask)
            step_fn = make_step_fn(network, enc, beam, incremental=incremental, compile=option == "compile")
            return constrained_beam_search(step_fn, input_ids.shape[0], beam, trie, trie.vocab_sizes)

    if option == "length_buckets":
        return lambda ids, mask: search_in_length_buckets(search, ids, mask, length_buckets)
    return search


def same_beams(output: BeamSearchOutput, reference: BeamSearchOutput) -> dict:
    """How close ``output``'s beams are to ``reference``'s: shares of queries with identical beams / best beam, and
    with identical beams or, where they differ, equal scores at every rank (within ``TIE_TOLERANCE``: beams
    swapped among float-rounding ties)."""
    rows_equal = (output.sequences == reference.sequences).all(-1)  # (B, K)
    finite = torch.isfinite(reference.scores) & torch.isfinite(output.scores)
    difference = (output.scores - reference.scores)[finite].abs()
    same_scores = torch.where(finite, (output.scores - reference.scores).abs() <= TIE_TOLERANCE,
                              torch.isfinite(reference.scores) == torch.isfinite(output.scores)).all(1)
    return {
        "identical_beams_share": float(rows_equal.all(1).float().mean()),
        "identical_or_tied_share": float((rows_equal.all(1) | same_scores).float().mean()),
        "identical_top_beam_share": float(rows_equal[:, 0].float().mean()),
        "max_abs_score_difference": float(difference.max()) if difference.numel() else 0.0,
    }


# ------------------------------------------------------------------------ dense indexes and their settings
class RefinedIVFPQ:
    """IVF-PQ whose ``k_factor * k`` candidates are re-scored with the exact vectors (faiss ``IndexRefineFlat``).

    Shares the IVF-PQ index it refines; stores the (N, E) float32 vectors besides its codes.
    """

    def __init__(self, base: DenseIndex, embeddings: np.ndarray, k_factor: int, num_threads: int) -> None:
        self.base = base
        self.vectors = np.ascontiguousarray(embeddings, dtype=np.float32)  # the refine index reads this memory
        self.index = faiss.IndexRefineFlat(base.index, faiss.swig_ptr(self.vectors))
        self.num_threads = num_threads
        self.set_params(base.config.nprobe, k_factor)

    def set_params(self, nprobe: int, k_factor: int) -> None:
        self.nprobe, self.k_factor = nprobe, k_factor
        self.base.set_search_params(nprobe=nprobe)
        self.index.k_factor = float(k_factor)

    @property
    def bytes_per_item(self) -> float:
        return self.base.bytes_per_item + self.vectors.shape[1] * 4

    def search(self, queries: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        vectors = np.ascontiguousarray(queries.detach().numpy(), dtype=np.float32)
        with faiss_threads(self.num_threads):
            scores, labels = self.index.search(vectors, k)
        return scores, labels.astype(np.int64)


def recall_against(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact top-k ids among the found ids (recall@k against exact search)."""
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / exact.shape[1] for f, e in zip(found, exact)]))


def score_recall_against(found: np.ndarray, queries: np.ndarray, items: np.ndarray, kth_exact: np.ndarray) -> float:
    """Mean share of found items whose exact score reaches the exact k-th score (ties count as found)."""
    valid = found >= 0
    scores = np.einsum("qe,qke->qk", queries, items[np.where(valid, found, 0)])
    return float(np.mean((scores >= kth_exact[:, None] - 1e-5) & valid))


def timed_search(search: Callable[[], tuple[np.ndarray, np.ndarray]], rounds: int = 1) -> tuple[np.ndarray, float]:
    """Run ``search`` ``rounds`` times; its ids and its smallest CPU time."""
    best, ids = float("inf"), None
    for _ in range(rounds):
        with Timer() as timer:
            _, ids = search()
        best = min(best, timer.cpu_seconds)
    return ids, best


def tune_dense(
    flat: DenseIndex, hnsw: DenseIndex | None, ivf_pq: DenseIndex, embeddings: np.ndarray, tuning: Tensor,
    args: argparse.Namespace,
) -> dict:
    """Sweep efSearch (HNSW), nprobe (IVF-PQ) and, if IVF-PQ cannot reach the target, (nprobe, k_factor) of
    IVF-PQ + exact refine, on the tuning queries' vectors (Q, E); pick the cheapest setting reaching
    ``--target-recall`` recall@10 of Flat (monotone sweeps: the smallest; the refine grid: the least CPU time).
    A sweep stops at the target or at the first setting slower than exact search (never worth deploying); if
    nothing reaches the target, the pick is the setting of highest recall and ``reached_target`` is False.

    Returns ``{"hnsw": {...}, "ivf_pq": {...}, "ivf_pq_refine": {...}?}`` with every setting's recall, score
    recall and CPU ms per query, the pick and whether it reached the target.
    """
    target = args.target_recall
    queries = tuning.numpy()
    per_query = 1e3 / len(queries)
    with Timer() as timer:
        exact_scores, exact = flat.search(tuning, TOP_K)
    flat_ms = timer.cpu_seconds * per_query
    kth = exact_scores[:, -1]

    def point(search: Callable[[], tuple[np.ndarray, np.ndarray]], **setting: int) -> dict:
        ids, cpu = timed_search(search)
        return {**setting, "recall@10_vs_flat": recall_against(ids, exact),
                "score_recall@10_vs_flat": score_recall_against(ids, queries, embeddings, kth),
                "cpu_ms_per_query": cpu * per_query}

    def pick(points: list[dict], cost: str) -> dict:
        reached = [p for p in points if p["recall@10_vs_flat"] >= target]
        chosen = min(reached, key=lambda p: p[cost]) if reached else max(points, key=lambda p: p["recall@10_vs_flat"])
        return {"sweep": points, "picked": chosen, "reached_target": bool(reached)}

    def done(points: list[dict]) -> bool:  # reached the target, or slower than exact search: stop the sweep
        return points[-1]["recall@10_vs_flat"] >= target or points[-1]["cpu_ms_per_query"] > flat_ms

    tuned: dict = {"target_recall@10_vs_flat": target, "tuning_queries": len(queries),
                   "flat_cpu_ms_per_query": flat_ms}
    if hnsw is not None:
        points = []
        for ef in HNSW_EF_SWEEP:
            hnsw.set_search_params(ef_search=ef)
            points.append(point(lambda: hnsw.search(tuning, TOP_K), ef_search=ef))
            if done(points):
                break
        tuned["hnsw"] = pick(points, "ef_search")
    points = []
    for nprobe in NPROBE_SWEEP:
        if nprobe > (ivf_pq.config.nlist or nprobe):
            break
        ivf_pq.set_search_params(nprobe=nprobe)
        points.append(point(lambda: ivf_pq.search(tuning, TOP_K), nprobe=nprobe))
        if done(points):
            break
    tuned["ivf_pq"] = pick(points, "nprobe")
    if not tuned["ivf_pq"]["reached_target"]:
        refined = RefinedIVFPQ(ivf_pq, embeddings, REFINE_K_FACTORS[0], args.threads)
        points = []
        for k_factor in REFINE_K_FACTORS:
            for nprobe in NPROBE_SWEEP:
                if nprobe > (ivf_pq.config.nlist or nprobe):
                    break
                refined.set_params(nprobe, k_factor)
                points.append(point(lambda: refined.search(tuning, TOP_K), nprobe=nprobe, k_factor=k_factor))
                if done(points):
                    break
        tuned["ivf_pq_refine"] = pick(points, "cpu_ms_per_query")
        tuned["ivf_pq_refine"]["index"] = refined
    return tuned


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
            kind="ivf_pq", nprobe=16, pq_m=args.pq_m, train_size=args.ivf_train_size, use_gpu=False,
            num_threads=args.build_threads, seed=args.seed,
        ),
        "faiss_hnsw": DenseIndexConfig(
            kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.hnsw_ef_construction,
            ef_search=16, use_gpu=False, num_threads=args.build_threads,
        ),
    }
    if args.hnsw_target_m is not None:  # a denser graph for the target-recall row
        configs["faiss_hnsw_target"] = DenseIndexConfig(
            kind="hnsw", hnsw_m=args.hnsw_target_m, ef_construction=args.hnsw_target_ef_construction,
            ef_search=16, use_gpu=False, num_threads=args.build_threads,
        )
    indexes, facts = {}, {}
    for name, config in configs.items():
        before = (previous or {}).get(name, {})
        if name.startswith("faiss_hnsw") and "build_s" in before:
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
        }
        print(f"    built {name} ({facts[name]['factory']}) in {timer.seconds:.1f} s", flush=True)
    return indexes, facts


# ------------------------------------------------------------------------ one corpus size
def measure_size(
    num_items: int,
    args: argparse.Namespace,
    queries: dict[str, tuple[Tensor, Tensor]],
    dense: DenseSide,
    vocab_size: int,
    previous_builds: dict | None = None,
) -> dict:
    """Build everything for one corpus size, tune the dense settings, time every method on the same queries.

    ``queries``: token ids and masks, ``"generative"`` (timed, MiniLM vocabulary), ``"dense"`` (timed, the dual
    tower's vocabulary) and ``"dense_tuning"`` (tuning queries, never timed).
    """
    input_ids, attention_mask = queries["generative"]
    dense_ids, dense_mask = queries["dense"]
    num_queries = input_ids.shape[0]
    result: dict = {"num_items": num_items, "load_average_start": load_average(), "build": {}}
    print(f"N = {num_items:,}", flush=True)
    torch.set_num_threads(args.build_threads)
    with Timer() as timer:
        features = generate_synthetic_features(num_items, **dense.generator)
    result["build"]["features_s"] = timer.seconds
    with Timer() as timer:
        codes, vocab_sizes = ace_shaped_sids(
            features, seed=args.seed, coarse_clusters=args.coarse_clusters, train_size=args.rq_train_size
        )
    result["build"]["sids_s"] = timer.seconds
    with Timer() as timer:
        trie = SIDTrie.from_codes(codes, vocab_sizes)
    result["build"]["trie_s"] = timer.seconds
    with Timer() as timer, torch.inference_mode():
        embeddings = dense.model.encode_corpus(features)
        tuning_vectors = dense.model.encode_queries(*queries["dense_tuning"])
    result["build"]["item_embeddings_s"] = timer.seconds
    del features
    gc.collect()
    indexes, index_facts = build_indexes(embeddings, args, previous_builds)
    result["index_builds"] = index_facts
    torch.set_num_threads(args.threads)
    with Timer() as timer:
        target_graph = indexes.get("faiss_hnsw_target", indexes.get("faiss_hnsw"))
        tuned = tune_dense(indexes["faiss_flat"], target_graph, indexes["faiss_ivf_pq"], embeddings,
                           tuning_vectors, args)
    result["build"]["dense_tuning_s"] = timer.seconds
    item_embeddings = torch.from_numpy(embeddings)
    model = generative_model(args, vocab_size, vocab_sizes)
    small = generative_model(args, vocab_size, vocab_sizes, args.small_d_model) if args.small_d_model else None
    if args.small_checkpoint:
        small = generative_model(args, vocab_size, vocab_sizes, shape=args.small_shape)

    prefixes = np.unique(codes[:, :-1], axis=0).shape[0]
    sid_table_bytes = sid_table_nbytes(codes, vocab_sizes)  # narrowest dtype per level
    sid_table_bytes_int64 = codes.shape[0] * codes.shape[1] * 8  # as SIDBundle.codes holds it in memory
    trie_bytes = trie.nbytes()
    result["sids"] = {
        "vocab_sizes": vocab_sizes,
        "distinct_prefixes": int(prefixes),
        "largest_prefix_bucket": vocab_sizes[-1],
        "trie_level_sizes": list(trie.level_sizes),
        "trie_bytes": trie_bytes,
        "sid_table_bytes": sid_table_bytes,
        "sid_table_bytes_int64": sid_table_bytes_int64,
    }
    generative_bytes = (sid_table_bytes + trie_bytes) / num_items
    generative_bytes_int64 = (sid_table_bytes_int64 + trie_bytes) / num_items
    embedding_bytes = item_embeddings.numel() * item_embeddings.element_size() / num_items

    # ---- the timed methods: each returns (Q, TOP_K) items; generative ones also leave their beams
    labels = method_labels(args)
    beams: dict[str, BeamSearchOutput] = {}
    pools: dict[str, Tensor] = {}
    setup_s: dict[str, float] = {}

    def generative(name: str, beam: int, option: str, incremental: bool = True,
                   network: GenerativeRetrieverModel = model) -> Callable[[], Tensor]:
        with Timer() as timer:
            search = generative_search(network, trie, beam, option, incremental, args.length_buckets)
        setup_s[name] = timer.seconds

        def run() -> Tensor:
            output = search(input_ids, attention_mask)
            beams[name] = output
            pool = beams_to_items(output, trie, None if name == "generative_beam50" else TOP_K)
            if name == "generative_beam50":
                pools["beam50"] = pool
            return pool[:, :TOP_K]

        return run

    def rerank() -> Tensor:
        query_vectors = dense.model.encode_queries(dense_ids, dense_mask)
        return rerank_candidates(query_vectors, pools["beam50"], item_embeddings, TOP_K)[0]

    def faiss_search(index: DenseIndex | RefinedIVFPQ, **params: int) -> Callable[[], Tensor]:
        def run() -> Tensor:
            if params:
                index.set_params(**params) if isinstance(index, RefinedIVFPQ) else index.set_search_params(**params)
            query_vectors = dense.model.encode_queries(dense_ids, dense_mask)
            return torch.from_numpy(index.search(query_vectors, TOP_K)[1])

        return run

    timed: dict[str, Callable[[], Tensor]] = {}
    settings: dict[str, dict] = {}
    for name in labels:
        beam = 50 if name.startswith("generative_beam50") or name == "generative_small_beam50" else 5
        if name in (f"generative_beam{beam}", f"generative_beam{beam}_float32"):
            option = args.inference_quantization if name == f"generative_beam{beam}" else "none"
            timed[name] = generative(name, beam, option)
        elif name.startswith("generative_small"):
            option = args.inference_quantization if args.small_checkpoint else "none"
            timed[name] = generative(name, beam, option, network=small)
        elif name.endswith("_full"):
            timed[name] = generative(name, beam, "none", incremental=False)
        elif name.startswith("generative_beam") and not name.endswith("rerank"):
            timed[name] = generative(name, beam, name.split("_", 2)[2])
    timed["rerank_of_beam50"] = rerank
    timed["faiss_flat"] = faiss_search(indexes["faiss_flat"])
    if "faiss_hnsw" in indexes:
        timed["faiss_hnsw_default"] = faiss_search(indexes["faiss_hnsw"], ef_search=16)
    if target_graph is not None:
        settings["faiss_hnsw_default"] = {"ef_search": 16}
        settings["faiss_hnsw"] = {"ef_search": tuned["hnsw"]["picked"]["ef_search"]}
        timed["faiss_hnsw"] = faiss_search(target_graph, **settings["faiss_hnsw"])
    settings["faiss_ivf_pq"] = {"nprobe": tuned["ivf_pq"]["picked"]["nprobe"]}
    timed["faiss_ivf_pq"] = faiss_search(indexes["faiss_ivf_pq"], **settings["faiss_ivf_pq"])
    if "ivf_pq_refine" in tuned:
        picked = tuned["ivf_pq_refine"]["picked"]
        settings["faiss_ivf_pq_refine"] = {"nprobe": picked["nprobe"], "k_factor": picked["k_factor"]}
        timed["faiss_ivf_pq_refine"] = faiss_search(tuned["ivf_pq_refine"]["index"], **settings["faiss_ivf_pq_refine"])

    seconds: dict[str, list[float]] = {name: [] for name in timed}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in timed}
    first_call_s: dict[str, float] = {}
    outputs: dict[str, Tensor] = {}
    with torch.inference_mode():
        for repeat in range(args.warmup + args.repeats):
            for name, run in timed.items():
                with Timer() as timer:
                    outputs[name] = run()
                if repeat == 0:
                    first_call_s[name] = timer.seconds
                if repeat >= args.warmup:
                    seconds[name].append(timer.seconds)
                    cpu_seconds[name].append(timer.cpu_seconds)
    for clock in (seconds, cpu_seconds):
        clock["generative_beam50_rerank"] = [
            a + b for a, b in zip(clock["generative_beam50"], clock["rerank_of_beam50"])
        ]

    flat = outputs["faiss_flat"].numpy()
    dense_vectors = dense.model.encode_queries(dense_ids, dense_mask).detach().numpy()
    kth = indexes["faiss_flat"].search(torch.from_numpy(dense_vectors), TOP_K)[0][:, -1]
    reference = {beam: beams[f"generative_beam{beam}" if args.inference_quantization == "none"
                             else f"generative_beam{beam}_float32"] for beam in BEAMS}
    methods = {}
    for name, label in labels.items():
        if name == "faiss_ivf_pq_refine" and name not in seconds:
            continue  # plain IVF-PQ reached the target recall: no refine row
        if name not in seconds:
            methods[name] = {"label": label, "queries_per_s": None, "queries_per_cpu_s": None,
                             "index_bytes_per_item": None, "skipped": index_facts.get("faiss_hnsw", {}).get("skipped")}
            continue
        median, median_cpu = statistics.median(seconds[name]), statistics.median(cpu_seconds[name])
        entry = {
            "label": label,
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
            entry["index_note"] = "SID table (narrowest integer type per level) + trie"
            if name in beams and not name.startswith("generative_small"):
                beam = 50 if "beam50" in name else 5
                entry["same_beams_as_float32"] = same_beams(beams[name], reference[beam])
                entry["setup_s"] = setup_s[name]
                entry["first_call_s"] = first_call_s[name]
            if name.endswith("rerank"):
                entry["index_bytes_per_item"] += embedding_bytes
                entry["index_bytes_per_item_int64_sid_table"] += embedding_bytes
                entry["index_note"] = "SID table + trie + float32 item embeddings for the rerank"
                entry["rerank_median_s"] = statistics.median(seconds["rerank_of_beam50"])
                entry["candidates_per_query"] = float((pools["beam50"] >= 0).sum(1).float().mean())
        else:
            facts = index_facts[name.replace("_refine", "").replace("_default", "")]
            if name == "faiss_hnsw" and "faiss_hnsw_target" in index_facts:
                facts = index_facts["faiss_hnsw_target"]
            entry["factory"] = facts["factory"] + (",RFlat" if name.endswith("refine") else "")
            entry["build_s"] = facts["build_s"]
            entry["search_params"] = settings.get(name, {})
            index = tuned["ivf_pq_refine"]["index"] if name.endswith("refine") else None
            entry["index_bytes_per_item"] = index.bytes_per_item if index is not None else facts["bytes_per_item"]
            found = outputs[name].numpy()
            entry["recall@10_vs_flat"] = recall_against(found, flat)
            entry["score_recall@10_vs_flat"] = score_recall_against(found, dense_vectors, embeddings, kth)
            tuning_key = {"faiss_hnsw": "hnsw", "faiss_ivf_pq": "ivf_pq", "faiss_ivf_pq_refine": "ivf_pq_refine"}
            if name in tuning_key:
                picked = tuned[tuning_key[name]]
                entry["tuning_recall@10_vs_flat"] = picked["picked"]["recall@10_vs_flat"]
                entry["reached_target_on_tuning_queries"] = picked["reached_target"]
        methods[name] = entry
    result["methods"] = methods
    result["dense_tuning"] = {
        key: ({k: v for k, v in value.items() if k != "index"} if isinstance(value, dict) else value)
        for key, value in tuned.items()
    }
    result["model_bytes"] = {
        "generative_model_parameters": parameter_bytes(model),
        "dense_text_tower_parameters": parameter_bytes(dense.model.text_tower),
    }
    result["ratios"] = throughput_ratios(methods)
    with torch.inference_mode():
        result["profile_beam5_ms_per_query"] = profile_beam_search(
            model, trie, (input_ids, attention_mask), 5, args.repeats
        )
        if args.inference_quantization != "none":
            with PreparedNetwork().use(model, args.inference_quantization, torch.device("cpu")) as network:
                result[f"profile_beam5_ms_per_query_{args.inference_quantization}"] = profile_beam_search(
                    network, trie, (input_ids, attention_mask), 5, args.repeats
                )
    if small is not None and args.small_checkpoint:
        result["small_model"] = {**args.small_shape, "checkpoint": args.small_checkpoint,
                                 "inference_quantization": args.inference_quantization,
                                 "parameters_bytes": parameter_bytes(small)}
        with torch.inference_mode(), PreparedNetwork().use(small, args.inference_quantization,
                                                           torch.device("cpu")) as network:
            result["profile_beam5_ms_per_query_small"] = profile_beam_search(
                network, trie, (input_ids, attention_mask), 5, args.repeats
            )
    elif small is not None:
        result["small_model"] = {"d_model": args.small_d_model, "ffn_dim": 4 * args.small_d_model,
                                 "parameters_bytes": parameter_bytes(small)}
    result["load_average_end"] = load_average()
    print(_size_summary(result), flush=True)
    return result


GENERATIVE_HEADLINES = ("generative_beam5", "generative_beam50")
DENSE_BASES = ("faiss_flat", "faiss_hnsw_default", "faiss_hnsw", "faiss_ivf_pq", "faiss_ivf_pq_refine")


def throughput_ratios(methods: dict) -> dict:
    """Throughput ratios of one size, side by side from one run, per timing basis.

    ``"<generative> / <dense>"``: every generative row over each FAISS row.
    """
    ratios: dict = {}
    for basis, key in (("cpu_time", "queries_per_cpu_s"), ("wall_clock", "queries_per_s")):
        entry = {}
        for name, method in methods.items():
            if not name.startswith("generative") or method[key] is None:
                continue
            for dense in DENSE_BASES:
                if dense in methods and methods[dense][key] is not None:
                    entry[f"{name} / {dense}"] = method[key] / methods[dense][key]
        ratios[basis] = entry
    return ratios


def _size_summary(result: dict) -> str:
    lines = [f"  N={result['num_items']:,}:"]
    for name, entry in result["methods"].items():
        if entry["queries_per_s"] is None:
            lines.append(f"    {name}: skipped")
            continue
        extra = ""
        if "recall@10_vs_flat" in entry:
            extra = (f", recall@10 vs Flat {entry['recall@10_vs_flat']:.3f} (score recall "
                     f"{entry['score_recall@10_vs_flat']:.3f}), {entry['search_params']}")
        if "same_beams_as_float32" in entry:
            same = entry["same_beams_as_float32"]
            extra = (f", same beams as float32: {same['identical_beams_share']:.3f} of queries "
                     f"({same['identical_or_tied_share']:.3f} up to rounding ties)")
        lines.append(f"    {name}: {entry['queries_per_s']:,.1f} q/s, {entry['queries_per_cpu_s']:,.1f} q/CPU-s, "
                     f"{entry['index_bytes_per_item']:,.1f} B/item{extra}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ accuracy cost on the demo
def demo_accuracy(path: Path, beams: Sequence[int], length_buckets: int, threads: int) -> dict:
    """R@1 / R@10 of the demo's ACE retriever on its test queries under every ``inference_quantization``.

    The checkpoint's own data settings rebuild the demo corpus and its query vocabulary; the flag is set on
    the loaded :class:`~grcm.retriever.module.GenerativeRetriever` (its ``retrieve`` path, as ``grcm test``
    decodes). Also the float32 search in ``length_buckets`` groups (lossless: same beams expected).
    Each setting is timed on the whole test set (queries per CPU-second, batches of 250), after an untimed
    call that prepares its network (int8 packing, ONNX export).
    """
    from grcm.data.datamodules import SyntheticDataModule
    from grcm.retriever.module import GenerativeRetriever

    checkpoint = read_checkpoint(path, "--demo-retriever")
    data = checkpoint["grcm_run"]["data"]["init_args"]
    datamodule = SyntheticDataModule(**data)
    datamodule.load_state_dict(checkpoint["SyntheticDataModule"])
    queries = datamodule.query_batches("test")
    module = GenerativeRetriever.load_from_checkpoint(path, map_location="cpu").eval()
    torch.set_num_threads(threads)
    batches = [queries(list(range(start, min(start + 250, len(queries))))) for start in range(0, len(queries), 250)]
    report: dict = {"checkpoint": str(path), "test_queries": len(queries), "beams": {}}
    for beam in beams:
        module.hparams.beam_size = beam
        rows, reference = {}, None
        for setting in (*available_inference_quantizations(), "length_buckets"):
            module.hparams.inference_quantization = "none" if setting == "length_buckets" else setting
            module.decode(batches[0]["input_ids"][:2], batches[0]["attention_mask"][:2])  # prepare, untimed
            outputs, ranked, cpu = [], [], 0.0
            for batch in batches:
                ids, mask = batch["input_ids"], batch["attention_mask"]
                with Timer() as timer:
                    if setting == "length_buckets":
                        output = search_in_length_buckets(module.decode, ids, mask, length_buckets)
                    else:
                        output = module.decode(ids, mask)
                    ranked.append(beams_to_items(output, module.trie, TOP_K))
                cpu += timer.cpu_seconds
                outputs.append(output)
            gold = torch.cat([batch["gold_items"] for batch in batches])
            items = torch.cat(ranked)
            output = BeamSearchOutput(torch.cat([o.sequences for o in outputs]), torch.cat([o.scores for o in outputs]))
            reference = output if reference is None else reference
            hits = (items[:, :, None] == gold[:, None, :]) & (gold[:, None, :] >= 0)
            rows[setting] = {
                "recall@1": float(hits[:, :1].any(-1).any(-1).float().mean()),
                "recall@10": float(hits.any(-1).any(-1).float().mean()),
                "queries_per_cpu_s": len(queries) / cpu,
                "same_beams_as_float32": same_beams(output, reference),
            }
        for row in rows.values():
            row["recall@1_points_vs_float32"] = 100 * (row["recall@1"] - rows["none"]["recall@1"])
        report["beams"][str(beam)] = rows
    module.hparams.inference_quantization = "none"
    return report


# ------------------------------------------------------------------------ targets, tables, plot
def evaluate_targets(sizes: list[dict], accuracy: dict | None, quantization: str) -> dict:
    """The issue's targets at the largest size of this run (CPU-time throughput), plus the accuracy cost."""
    largest = max(sizes, key=lambda entry: entry["num_items"])
    methods, num_items = largest["methods"], largest["num_items"]
    key = "queries_per_cpu_s"
    targets: dict = {}

    def ratio(name: str, dense: str, minimum: float, note: str = "") -> None:
        if dense not in methods or methods[dense][key] is None:
            return
        value = methods[name][key] / methods[dense][key]
        entry = {"num_items": num_items, "value": value, "target": f">= {minimum}" + note, "met": value >= minimum}
        if dense != "faiss_flat":
            entry["dense_recall@10_vs_flat"] = methods[dense]["recall@10_vs_flat"]
        if methods[dense].get("reached_target_on_tuning_queries") is False:
            entry["met"] = None  # no setting of the sweep reached the target recall: not evaluable
            entry["note"] = (f"{dense} did not reach the target recall at any swept setting; the ratio is against its "
                             f"highest-recall setting {methods[dense]['search_params']} (recall@10 "
                             f"{methods[dense]['recall@10_vs_flat']:.3f}); a slower setting of the same index would "
                             "be needed to reach it")
        targets[f"{name} / {dense} (queries per CPU-second)"] = entry

    ratio("generative_beam5", "faiss_hnsw_default", 1.0)
    ratio("generative_beam5", "faiss_hnsw", 2.0, " (HNSW at >= 0.95 recall@10 of Flat)")
    ratio("generative_beam50", "faiss_flat", 1.0)
    ratio("generative_beam5", "faiss_flat", 10.0)
    for name, method in methods.items():
        same = method.get("same_beams_as_float32")
        if same is not None and name.split("_", 2)[-1] in LOSSLESS:
            targets[f"{name} returns the float32 beams (up to rounding ties)"] = {
                "num_items": num_items, "value": same["identical_or_tied_share"],
                "identical_beams_share": same["identical_beams_share"],
                "target": "1.0 (lossless option)", "met": same["identical_or_tied_share"] == 1.0,
            }
    if accuracy is not None:
        for beam, rows in accuracy["beams"].items():
            cost = -rows[quantization]["recall@1_points_vs_float32"]
            targets[f"demo R@1 cost of {quantization} at beam {beam} (points)"] = {
                "value": cost, "target": "<= 0.5", "met": cost <= 0.5,
            }
    return targets


def markdown_tables(sizes: list[dict]) -> str:
    """Two Markdown tables (queries per CPU-second and index bytes/item): one row per method, one column per size."""
    header = "| method | " + " | ".join(f"{entry['num_items']:,}" for entry in sizes) + " |"
    rule = "|---|" + "---:|" * len(sizes)
    blocks = []
    for title, key, fmt in (("queries/s, wall clock (100 concurrent queries)", "queries_per_s", "{:,.1f}"),
                            ("queries per CPU-second (100 concurrent queries)", "queries_per_cpu_s", "{:,.1f}"),
                            ("recall@10 against Flat (timed queries)", "recall@10_vs_flat", "{:.3f}"),
                            ("index bytes per item", "index_bytes_per_item", "{:,.1f}")):
        cell = lambda value, fmt=fmt: "" if value is None else fmt.format(value)  # noqa: E731
        labels = {name: method["label"] for entry in sizes for name, method in entry["methods"].items()
                  if key != "recall@10_vs_flat" or "recall@10_vs_flat" in method}
        rows = [
            f"| {label} | " + " | ".join(cell(entry["methods"].get(name, {}).get(key)) for entry in sizes) + " |"
            for name, label in labels.items()
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
    shown = [*GENERATIVE_HEADLINES, "generative_beam50_rerank", *DENSE_BASES]
    for name in shown:
        label = next((e["methods"][name]["label"] for e in report["sizes"] if name in e["methods"]), None)
        if label is None:
            continue
        style = ":^" if name.endswith("rerank") else "-o" if name.startswith("generative") else "--s"
        for axis, key in ((left, throughput_key), (right, "index_bytes_per_item")):
            points = [(n, e["methods"].get(name, {}).get(key)) for n, e in zip(sizes, report["sizes"])]
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
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    machine = report["machine"]
    figure.suptitle(
        f"{machine['cpu']}, {report['settings']['threads']} thread(s) for queries; "
        f"torch {machine['torch']}, faiss {machine['faiss']}",
        fontsize=9,
    )
    figure.tight_layout(rect=(0, 0.14, 1, 1))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "efficiency.json", help="JSON report")
    parser.add_argument("--plot", type=Path, default=RESULTS / "efficiency.png", help="PNG plot")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="corpus sizes (default 1k 10k 100k 1M; --quick: 1k 4k)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and models: a smoke run in seconds")
    parser.add_argument("--plot-only", action="store_true", help="redraw --plot from an existing --out report")
    parser.add_argument("--queries", type=int, default=100, help="concurrent queries per batch (ACE Fig. 4: 100)")
    parser.add_argument("--tuning-queries", type=int, default=500,
                        help="validation captions that pick the FAISS settings (never timed)")
    parser.add_argument("--target-recall", type=float, default=0.95,
                        help="recall@10 against Flat that the tuned HNSW / IVF-PQ rows must reach")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per method first")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads while answering queries (torch, faiss)")
    parser.add_argument("--build-threads", type=int, default=1,
                        help="CPU threads while building SIDs, embeddings and indexes (more is faster on an idle "
                        "machine, much slower on an oversubscribed one)")
    parser.add_argument("--dual-tower", default=None,
                        help=f"DualTower checkpoint embedding items and queries for FAISS (default "
                        f"{DEMO / 'dual_tower/checkpoints/best.ckpt'}; --quick: random), or 'random'")
    parser.add_argument("--demo-retriever", default=None,
                        help=f"ACE retriever checkpoint whose test R@1 prices the lossy options (default "
                        f"{DEMO / 'ace_retriever/checkpoints/best.ckpt'}; --quick: none), or 'none'")
    parser.add_argument("--demo-beams", type=int, nargs="+", default=[5, 25])
    parser.add_argument("--inference-quantization", choices=INFERENCE_QUANTIZATIONS, default="int8",
                        help="the headline generative rows' network (grcm.retriever.cpu_inference)")
    parser.add_argument("--candidates", nargs="*", choices=CANDIDATES, default=["int8", "bf16", "length_buckets"],
                        help="CPU speed options timed alone on the float32 network, one row pair each "
                        "('compile' compiles for minutes on 2 cores: opt in; 'onnx' and 'onnx_int8' need "
                        "`pip install -e .[onnx]`)")
    parser.add_argument("--length-buckets", type=int, default=2, help="groups of the length_buckets candidate")
    parser.add_argument("--feature-dim", type=int, default=256, help="with --dual-tower random")
    parser.add_argument("--embed-dim", type=int, default=256, help="with --dual-tower random")
    parser.add_argument("--dense-text-layers", type=int, default=2, help="with --dual-tower random")
    parser.add_argument("--d-model", type=int, default=128,
                        help="generative retriever width (128: experiments/synthetic/ace_retriever.yaml)")
    parser.add_argument("--encoder-layers", type=int, default=3)
    parser.add_argument("--decoder-layers", type=int, default=2)
    parser.add_argument("--ffn-dim", type=int, default=512)
    parser.add_argument("--small-d-model", type=int, default=None,
                        help="also time a generative model of this width (ffn 4x, same depth), side by side")
    parser.add_argument("--small-checkpoint", default=None,
                        help="also time, side by side and under --inference-quantization, a generative network "
                        "of this ACE retriever checkpoint's sizes (d_model, heads, layers, ffn; random weights "
                        "like the main rows), e.g. runs/issue23_small/enc2_dec1/checkpoints/best.ckpt")
    parser.add_argument("--coarse-clusters", type=int, default=128)
    parser.add_argument("--rq-train-size", type=int, default=65_536)
    parser.add_argument("--ivf-train-size", type=int, default=65_536,
                        help="IVF-PQ training sample; nlist = about 4 sqrt(sample), >= 39 points per cell")
    parser.add_argument("--pq-m", type=int, default=32, help="PQ sub-quantisers (bytes per PQ code)")
    parser.add_argument("--build-budget-s", type=float, default=900.0,
                        help="skip an HNSW build whose time, extrapolated from a smaller size, exceeds this")
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--hnsw-ef-construction", type=int, default=40)
    parser.add_argument("--hnsw-target-m", type=int, default=None,
                        help="build a second, denser HNSW graph of this M for the target-recall row (default: the "
                        "efSearch sweep runs on the default HNSW16 graph)")
    parser.add_argument("--hnsw-target-ef-construction", type=int, default=200)
    parser.add_argument(
        "--faiss-blas-threshold", type=int, default=20,
        help="faiss.cvar.distance_compute_blas_threshold: exact search uses BLAS from this many queries on "
        "(faiss 1.15 defaults to 128000, whose non-BLAS path is ~4x slower for 100-query batches)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.warmup = args.sizes or [1_000, 4_000], 1, 1
        args.d_model, args.encoder_layers, args.decoder_layers, args.ffn_dim = 64, 1, 1, 128
        args.embed_dim, args.dense_text_layers, args.coarse_clusters = 64, 1, 16
        args.rq_train_size, args.ivf_train_size, args.pq_m = 4_000, 4_000, 16
        args.tuning_queries = min(args.tuning_queries, 100)
    args.sizes = args.sizes or [1_000, 10_000, 100_000, 1_000_000]
    default_tower, default_retriever = DEMO / "dual_tower/checkpoints/best.ckpt", DEMO / "ace_retriever/checkpoints/best.ckpt"
    args.dual_tower = args.dual_tower or ("random" if args.quick else str(default_tower))
    args.demo_retriever = args.demo_retriever or ("none" if args.quick else str(default_retriever))
    if min(args.sizes) < 2**8:
        parser.error("--sizes must be >= 256 (IVF-PQ trains 256 codes per sub-quantiser)")
    if not 0 < args.target_recall <= 1:
        parser.error(f"--target-recall must lie in (0, 1], got {args.target_recall}")
    if args.small_checkpoint and args.small_d_model:
        parser.error("--small-checkpoint and --small-d-model both set the side-by-side network: pass one")
    args.small_shape = checkpoint_shape(Path(args.small_checkpoint)) if args.small_checkpoint else None
    if args.demo_retriever != "none" and not Path(args.demo_retriever).is_file():
        parser.error(f"--demo-retriever {args.demo_retriever}: no such checkpoint; run `make demo` (it trains "
                     "runs/demo/ace_retriever) or pass --demo-retriever none to skip the accuracy cost")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        report = json.loads(args.out.read_text())
        plot(report, args.plot)
        print(f"wrote {args.plot}")
        return report
    started = time.perf_counter()
    machine = machine_info()
    print("\n".join(machine_lines(machine)), flush=True)
    torch.set_num_threads(args.threads)
    faiss_default_blas_threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = args.faiss_blas_threshold
    dense = load_dense_side(args)
    timed_texts, tuning_texts = benchmark_texts(args.queries, args.tuning_queries, args.seed)
    minilm = QueryTokenizer.minilm(max_length=32)
    queries = {
        "generative": minilm.encode(timed_texts),
        "dense": dense.tokenizer.encode(timed_texts),
        "dense_tuning": dense.tokenizer.encode(tuning_texts),
    }
    report: dict = {
        "benchmark": "efficiency",
        "machine": machine,
        "load_average_start": load_average(),
        "settings": {
            "sizes": sorted(args.sizes),
            "concurrent_queries": args.queries,
            "tuning_queries": args.tuning_queries,
            "target_recall@10_vs_flat": args.target_recall,
            "top_k": TOP_K,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "build_threads": args.build_threads,
            "quick": args.quick,
            "inference_quantization": args.inference_quantization,
            "candidates": args.candidates,
            "length_buckets": args.length_buckets,
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
                "weights": dense.description,
                "embed_dim": int(dense.model.hparams.embed_dim),
                "text_layers": int(dense.model.hparams.text_layers),
                "query_vocab_size": dense.tokenizer.vocab_size,
                "item_features": {"generator": "grcm.data.synthetic.generate_synthetic_features", **dense.generator},
            },
            "dense_baseline_choice": "items: the dual tower's item-tower embeddings of the synthetic generator's "
            "features at N items (the generator settings the tower was trained on); queries: its text-tower "
            "embeddings of generated captions, tokenized with its own vocabulary. Search settings picked on "
            f"{args.tuning_queries} validation captions, timed on {args.queries} test captions.",
            "sids": "ACE-shaped, from the features: K-Means coarse token (faiss, "
            f"{args.coarse_clusters} clusters) + 2-level faiss ResidualQuantizer over the residuals "
            f"(128 codes per level, greedy argmin encoding, trained on <= {args.rq_train_size} residuals) "
            "+ unique token; not a trained RQ-VAE",
            "queries": f"{args.queries} test captions of the synthetic generator, e.g. {timed_texts[0]!r}",
            "timing": "per batch of concurrent queries, query text encoding included; methods timed "
            "round-robin per repeat; queries/s = batch size / median batch wall time, queries per CPU-second "
            "= batch size / median batch process CPU time (with 1 thread: the rate on an idle core, robust "
            "to other processes' load). The rerank method adds the rerank time of each repeat to the "
            "beam-50 time of the same repeat.",
            "indexes": {
                "flat": f"exact inner product; faiss distance_compute_blas_threshold set to "
                f"{args.faiss_blas_threshold} (faiss default here: {faiss_default_blas_threshold})",
                "hnsw": f"HNSW{args.hnsw_m}, efConstruction {args.hnsw_ef_construction}; efSearch 16 (faiss default) "
                f"and the smallest of {list(HNSW_EF_SWEEP)} reaching the target recall on the tuning queries"
                + ("" if args.hnsw_target_m is None else f", the latter on a second graph HNSW{args.hnsw_target_m}, "
                   f"efConstruction {args.hnsw_target_ef_construction}"),
                "ivf_pq": f"nlist from the training sample (<= {args.ivf_train_size} vectors), PQ{args.pq_m}x8; the "
                f"smallest nprobe of {list(NPROBE_SWEEP)} reaching the target recall, else the best",
                "ivf_pq_refine": f"when IVF-PQ cannot: IndexRefineFlat over it, the cheapest (nprobe, k_factor in "
                f"{list(REFINE_K_FACTORS)}) reaching the target recall",
            },
        },
        "sizes": [],
    }
    last_builds: dict[str, dict] = {}  # per index, the facts of its largest build so far
    for num_items in sorted(args.sizes):
        report["sizes"].append(measure_size(num_items, args, queries, dense, minilm.vocab_size, last_builds))
        for name, facts in report["sizes"][-1].get("index_builds", {}).items():
            if "build_s" in facts:
                last_builds[name] = facts
        gc.collect()
    accuracy = None
    if args.demo_retriever != "none":
        with Timer() as timer:
            accuracy = demo_accuracy(Path(args.demo_retriever), args.demo_beams, args.length_buckets, args.threads)
        accuracy["wall_s"] = timer.seconds
        report["demo_accuracy"] = accuracy
    report["targets"] = evaluate_targets(report["sizes"], accuracy, args.inference_quantization)
    report["tables_markdown"] = markdown_tables(report["sizes"])
    report["load_average_end"] = load_average()
    report["wall_s"] = time.perf_counter() - started
    write_json_atomic(args.out, report)
    plot(report, args.plot)
    print(report["tables_markdown"])
    print_summary(report)
    print(f"wrote {args.out} and {args.plot} in {report['wall_s']:.0f} s", flush=True)
    return report


def print_summary(report: dict) -> None:
    """Ratios, the beam-5 profile, the demo accuracy and the targets, as printed lines."""
    largest = report["sizes"][-1]
    print(f"ratios at {largest['num_items']:,} items (queries per CPU-second, one run, side by side):")
    for name, value in largest["ratios"]["cpu_time"].items():
        if name.split(" / ")[0] in GENERATIVE_HEADLINES:
            print(f"  {name}: {value:.2f}x")
    for key, profile in largest.items():
        if key.startswith("profile_beam5"):
            print(f"{key}: " + ", ".join(
                f"{name} {profile[name]:.3f} ({100 * share:.0f}%)" for name, share in profile["share"].items()
            ) + f"; total {profile['total']:.3f}")
    for beam, rows in report.get("demo_accuracy", {}).get("beams", {}).items():
        for setting, row in rows.items():
            print(f"demo beam {beam}, {setting}: R@1 {row['recall@1']:.4f} ({row['recall@1_points_vs_float32']:+.2f} "
                  f"points), R@10 {row['recall@10']:.4f}, same beams "
                  f"{row['same_beams_as_float32']['identical_beams_share']:.3f}, {row['queries_per_cpu_s']:,.0f} q/CPU-s")
    for name, target in report["targets"].items():
        verdict = "not evaluable" if target["met"] is None else "met" if target["met"] else "NOT met"
        print(f"target {name}: {target['value']:.3f} ({target['target']}) -> {verdict}"
              + (f"; {target['note']}" if "note" in target else ""))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
