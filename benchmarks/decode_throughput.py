"""Decode throughput of trie-constrained beam search, and what the trie costs.

One run measures, for tries of 10k, 100k and 1M items and beams 5 and 50:

* queries/s of :func:`grcm.decoding.constrained_beam_search` with a fixed random
  :class:`GenerativeRetrieverModel` decoder, decoded incrementally (KV cache,
  :class:`grcm.retriever.incremental.IncrementalStep`), over a random encoder
  memory (100 queries per batch, as in ACE Fig. 4);
* the share of decode time spent on trie masking, timed two ways: the trie
  operations alone (``valid_mask`` + ``advance``, timed inside the search), and
  the difference to the same search without any constraint;
* the same search with transformers' ``PrefixConstrainedLogitsProcessor``: a
  Python ``prefix_allowed_tokens_fn`` called per beam per step on a dict
  trie, with the same model, beams and queries (its beams are checked equal);
* the same three searches with a "free" model (precomputed logits), which
  isolates the search overhead from the model cost;
* the generative index's bytes per item: the trie, tensor by tensor
  (:meth:`SIDTrie.nbytes_by_component`), plus the item -> SID code table in its
  narrowest dtypes (:func:`sid_table_nbytes`), against a FAISS Flat index of
  ``--flat-dim`` float32 embeddings (``4 * dim`` bytes per item).

SIDs are random codes shaped like ACE's: ``L = 4`` levels, vocab
``(128, 128, 128, U)``. Levels 0-2 follow a Zipf(0.5) law over codes,
re-permuted per parent so every prefix has its own popular children; level 3
is the unique token (rank of the item among those sharing the first three
codes), so ``U`` is the largest collision count.

``--internet-scale`` measures 1M, 10M and 100M items (beams 5 and 50, no callback path, whose dict trie does
not fit there), skips a size whose estimated peak memory would not leave ``--memory-headroom-gib`` available
(the estimate is the largest peak growth per item measured so far), and adds a table of bytes per item to 1B
items: generative measured where decoded and projected above, FAISS IVF-PQ / HNSW measured on
``--faiss-items`` random vectors and projected (:func:`projection_table`). ``--sid-shape sized`` sizes the fine
codebooks from N (:mod:`grcm.tokenizers.sizing`) instead of 128 each.

Usage::

    python benchmarks/decode_throughput.py --out benchmarks/results/decode_throughput.json
    python benchmarks/decode_throughput.py --quick   # seconds; a smoke run
    python benchmarks/decode_throughput.py --internet-scale --threads 1 --out runs/scale/decode_internet_scale.json
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from grcm.decoding import SIDTrie, TrieConstraint, beam_search
from grcm.decoding.sid_table import sid_table_dtype
from grcm.decoding.trie import sid_table_nbytes
from grcm.io import write_json_atomic
from grcm.retriever.incremental import IncrementalStep
from grcm.retriever.model import EncoderOutput, GenerativeRetrieverModel
from grcm.tokenizers.sizing import sid_vocab_sizes

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "decode_throughput.json"


# ------------------------------------------------------------------------ SIDs
def skewed_ace_codes(
    num_items: int, seed: int = 0, vocab: int | Sequence[int] = 128, zipf: float = 0.5, chunk: int = 1 << 22
) -> np.ndarray:
    """``(N, 4)`` ACE-shaped SIDs: three skewed code levels plus a unique token.

    ``vocab`` is one codebook size for the three code levels or one per level. Codes are drawn in row chunks
    (the same stream as one ``rng.choice(vocab, (N, 3), p=...)`` call), and the result is int32 from 2**24
    items on (int64 below), so 100M items need about 4 GiB at the peak, not 15.
    """
    vocabs = [vocab] * 3 if isinstance(vocab, int) else [int(v) for v in vocab]
    rng = np.random.default_rng(seed)
    cdfs = []
    for size in vocabs:
        probs = np.arange(1, size + 1, dtype=np.float64) ** -zipf
        cdf = (probs / probs.sum()).cumsum()
        cdfs.append(cdf / cdf[-1])  # as Generator.choice(p=...) normalises it
    narrow = np.int32 if num_items >= 1 << 24 else np.int64
    codes = np.empty((num_items, 4), dtype=narrow)
    for start in range(0, num_items, chunk):
        uniform = rng.random((min(chunk, num_items - start), 3))
        draws = [cdf.searchsorted(uniform[:, level], side="right") for level, cdf in enumerate(cdfs)]
        c0 = draws[0]
        c1 = (draws[1] + 37 * c0) % vocabs[1]  # popular children differ per parent
        c2 = (draws[2] + 59 * c1 + 11 * c0) % vocabs[2]
        codes[start: start + len(uniform), 0], codes[start: start + len(uniform), 1] = c0, c1
        codes[start: start + len(uniform), 2] = c2
    key = (codes[:, 0].astype(np.int64) * vocabs[1] + codes[:, 1]) * vocabs[2] + codes[:, 2]
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    del key
    boundary = np.r_[True, sorted_key[1:] != sorted_key[:-1]]
    del sorted_key
    run_start = np.flatnonzero(boundary)
    rank = np.arange(num_items, dtype=np.int64)
    rank -= run_start[np.cumsum(boundary) - 1]
    codes[order, 3] = rank
    return codes


# --------------------------------------------------------------------- decoder
def random_decoder(vocab_sizes: Sequence[int], dim: int, layers: int, seed: int = 0) -> GenerativeRetrieverModel:
    """:class:`GenerativeRetrieverModel` with fixed random weights, standard cross-attention (``fusion="none"``).

    Its output heads are re-drawn with a larger spread (std ``2/sqrt(d)``) so that the logits are
    peaked like a trained model's, not near-uniform.
    """
    torch.manual_seed(seed)
    model = GenerativeRetrieverModel(
        vocab_size=2, sid_vocab_sizes=list(vocab_sizes), d_model=dim, num_heads=4, num_encoder_layers=1,
        num_decoder_layers=layers, ffn_dim=4 * dim, dropout=0.0, fusion="none",
    )
    with torch.no_grad():
        for head in model.heads:
            torch.nn.init.normal_(head.weight, std=2.0 / math.sqrt(dim))
    return model.eval()


def random_memory(batch_size: int, tokens: int, dim: int, seed: int, device: torch.device) -> EncoderOutput:
    """Encoder output of ``batch_size`` queries: random (B, tokens, d) memory, every token real."""
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch_size, tokens, dim, generator=generator).to(device)
    return EncoderOutput(layer_outputs=(memory,), attention_mask=torch.ones(batch_size, tokens, dtype=torch.bool,
                                                                             device=device))


# ---------------------------------------------------------------- constraints
class Stopwatch:
    """Accumulates wall time and this process's CPU time (the latter shrugs off other processes' load)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall = 0.0
        self.cpu = 0.0

    @contextmanager
    def running(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu


class TimedTrieConstraint(TrieConstraint):
    """:class:`TrieConstraint` that times its trie operations (``valid_mask`` and ``advance``)."""

    def __init__(self, trie: SIDTrie) -> None:
        super().__init__(trie)
        self.clock = Stopwatch(trie.device)

    def allowed(self, states: Tensor, prefix: Tensor, level: int) -> Tensor:
        with self.clock.running():
            return self.trie.valid_mask(states, level)

    def advance(self, states: Tensor, codes: Tensor, level: int) -> Tensor:
        with self.clock.running():
            return self.trie.advance(states, codes, level)


class CallbackConstraint:
    """transformers' ``PrefixConstrainedLogitsProcessor`` with a Python dict-trie ``prefix_allowed_tokens_fn``.

    The callback runs once per beam per step, as in ``model.generate(prefix_allowed_tokens_fn=...)``.
    """

    def __init__(self, root: dict, beam_size: int, vocab_sizes: Sequence[int], device: torch.device) -> None:
        from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

        self.root, self.vocab_sizes = root, list(vocab_sizes)
        self.clock = Stopwatch(device)
        self.processor = PrefixConstrainedLogitsProcessor(self.prefix_allowed_tokens_fn, num_beams=beam_size)

    def prefix_allowed_tokens_fn(self, batch_id: int, sentence: Tensor) -> list[int]:
        node = self.root
        for code in sentence.tolist():
            node = node.get(code)
            if node is None:  # a dead beam (score -inf): anything goes, it stays dead
                return list(range(self.vocab_sizes[len(sentence)]))
        return list(node)

    def initial_state(self, num_rows: int, device: torch.device) -> Tensor:
        return torch.zeros(num_rows, dtype=torch.long, device=device)

    def allowed(self, states: Tensor, prefix: Tensor, level: int) -> Tensor:
        with self.clock.running():
            zeros = torch.zeros(prefix.shape[0], self.vocab_sizes[level], device=prefix.device)
            return self.processor(prefix, zeros) == 0

    def advance(self, states: Tensor, codes: Tensor, level: int) -> Tensor:
        return states


def dict_trie(codes: np.ndarray) -> dict:
    """Nested dicts ``{code: {code: ...}}`` over the SID table (the usual callback-side trie)."""
    root: dict = {}
    for row in codes.tolist():
        node = root
        for code in row:
            node = node.setdefault(code, {})
    return root


# --------------------------------------------------------------------- timing
def measure(
    model: GenerativeRetrieverModel,
    trie: SIDTrie,
    callback_root: dict | None,
    beam_size: int,
    batch_size: int,
    batches: int,
    device: torch.device,
    dim: int,
    memory_tokens: int,
) -> dict:
    """Time trie / unconstrained / callback searches, interleaved batch by batch, with the model and free logits.

    Throughputs use wall time; shares and ratios use CPU time on a CPU device (robust to
    other processes sharing the cores) and wall time on CUDA. ``callback_root`` None skips the callback
    search (at 10M+ items its dict trie would not fit in memory) and the keys that compare with it.
    """
    vocab_sizes = list(trie.vocab_sizes)
    rows = batch_size * beam_size
    use_cpu_time = device.type == "cpu"

    def model_step_fn(batch: int):
        """A fresh incremental step function per search (it holds the beams' cache)."""
        enc = random_memory(batch_size, memory_tokens, dim, 1000 + batch, device)
        return lambda: IncrementalStep(model, enc, beam_size)

    generator = torch.Generator().manual_seed(7)
    free_logits = [torch.randn(rows, v, generator=generator).to(device) for v in vocab_sizes]

    def free_step_fn(batch: int):
        return lambda: (lambda prefix: free_logits[prefix.shape[1]])

    queries = batch_size * batches
    result: dict = {"beam_size": beam_size, "queries": queries, "batch_size": batch_size}
    with torch.inference_mode():
        beam_search(
            model_step_fn(-1)(), batch_size, beam_size, vocab_sizes, TrieConstraint(trie), device
        )  # warm-up
    for label, step_fn_for_batch in (("", model_step_fn), ("free_model_", free_step_fn)):
        trie_ops = TimedTrieConstraint(trie)
        callback = None if callback_root is None else CallbackConstraint(callback_root, beam_size, vocab_sizes, device)
        searches = [("trie", trie_ops), ("unconstrained", None)] + ([("callback", callback)] if callback else [])
        clocks = {name: Stopwatch(device) for name, _ in searches}
        same_beams = True
        for batch in range(batches):
            new_step_fn = step_fn_for_batch(batch)
            outputs = {}
            for name, constraint in searches:
                with clocks[name].running(), torch.inference_mode():
                    outputs[name] = beam_search(
                        new_step_fn(), batch_size, beam_size, vocab_sizes, constraint, device
                    )
            if callback:
                same_beams &= torch.equal(outputs["trie"].sequences, outputs["callback"].sequences)
                same_beams &= torch.equal(outputs["trie"].scores, outputs["callback"].scores)

        def basis(clock: Stopwatch) -> float:
            return clock.cpu if use_cpu_time else clock.wall

        t_trie, t_none = basis(clocks["trie"]), basis(clocks["unconstrained"])
        result.update(
            {
                f"{label}trie_queries_per_s": queries / clocks["trie"].wall,
                f"{label}unconstrained_queries_per_s": queries / clocks["unconstrained"].wall,
                f"{label}trie_queries_per_cpu_s": queries / clocks["trie"].cpu,
                f"{label}trie_ops_ms_per_query": 1e3 * basis(trie_ops.clock) / queries,
                f"{label}mask_share_trie_ops": basis(trie_ops.clock) / t_trie,
                f"{label}mask_share_by_difference": max(t_trie - t_none, 0.0) / t_trie,
            }
        )
        if callback:
            t_callback = basis(clocks["callback"])
            result.update(
                {
                    f"{label}callback_queries_per_s": queries / clocks["callback"].wall,
                    f"{label}callback_queries_per_cpu_s": queries / clocks["callback"].cpu,
                    f"{label}speedup_vs_callback": t_callback / t_trie,
                    f"{label}callback_mask_ms_per_query": 1e3 * basis(callback.clock) / queries,
                    f"{label}mask_share_callback": basis(callback.clock) / t_callback,
                    f"{label}mask_speedup_vs_callback": basis(callback.clock) / max(basis(trie_ops.clock), 1e-12),
                    f"{label}same_beams_as_callback": bool(same_beams),
                }
            )
    result["timing_basis_for_shares"] = "process CPU time" if use_cpu_time else "wall time"
    return result


# ------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    parser.add_argument("--quick", action="store_true", help="tiny tries and batches: a smoke run in seconds")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--beams", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--batch-size", type=int, default=100, help="queries per batch (ACE Fig. 4: 100)")
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="timed batches per beam size (default: 4 for beam <= 10, else 2)",
    )
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--memory-tokens", type=int, default=16)
    parser.add_argument(
        "--flat-dim",
        type=int,
        default=256,
        help="embedding size of the float32 FAISS Flat index the generative index is compared with",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --quick)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sid-shape", choices=("ace", "sized"), default="ace",
                        help="code levels of 128 each (ace), or sized from N by grcm.tokenizers.sizing (sized)")
    parser.add_argument("--no-callback", action="store_true",
                        help="skip the prefix_allowed_tokens_fn comparison (its dict trie does not fit at 10M+ items)")
    parser.add_argument("--internet-scale", action="store_true",
                        help="sizes 1M, 10M, 100M, beams 5 and 50, no callback, and the table of bytes per item to 1B")
    parser.add_argument("--faiss-items", type=int, default=100_000,
                        help="random vectors the FAISS IVF-PQ / HNSW bytes per item are measured on (--internet-scale; 0: none)")
    parser.add_argument("--memory-headroom-gib", type=float, default=4.0,
                        help="skip a size whose estimated peak would leave less than this much memory available")
    args = parser.parse_args(argv)
    if args.internet_scale:
        if args.sizes == [10_000, 100_000, 1_000_000]:
            args.sizes = [1_000_000, 10_000_000, 100_000_000]
        args.no_callback = True
    if args.quick:
        args.sizes, args.beams, args.batch_size, args.dim, args.layers = [2_000, 20_000], [5, 20], 8, 32, 1
        args.faiss_items = 5_000  # with --internet-scale
        args.batches = [1] * len(args.beams)
        args.threads = args.threads or 1
    if args.batches is None:
        args.batches = [4 if beam <= 10 else 2 for beam in args.beams]
    if len(args.batches) != len(args.beams):
        parser.error("--batches needs one value per --beams entry")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    report: dict = {
        "benchmark": "decode_throughput",
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "quick": args.quick,
        "sids": "random ACE-shaped codes: 3 levels x 128, Zipf(0.5) per level re-permuted per parent, "
        "plus a unique token (vocab = max collisions)",
        "decoder": {
            "kind": "GenerativeRetrieverModel decoder (random weights, fusion 'none'), incremental decoding",
            "dim": args.dim,
            "layers": args.layers,
            "heads": 4,
            "ffn_dim": 4 * args.dim,
            "memory_tokens": args.memory_tokens,
        },
        "runs": [],
    }
    memory = MemoryGuard(args.memory_headroom_gib)
    report["skipped_sizes"] = []
    for num_items in args.sizes:
        if not memory.fits(num_items):
            report["skipped_sizes"].append(memory.skip_record(num_items))
            print(f"N={num_items}: skipped, {report['skipped_sizes'][-1]['reason']}", flush=True)
            continue
        code_vocab = sid_vocab_sizes(num_items) if args.sid_shape == "sized" else [128, 128, 128]
        codes = skewed_ace_codes(num_items, seed=args.seed, vocab=code_vocab)
        vocab_sizes = [*code_vocab, int(codes[:, 3].max()) + 1]
        build_start = time.perf_counter()
        trie = SIDTrie.from_codes(codes, vocab_sizes).to(device)
        build_s = time.perf_counter() - build_start
        callback_root = None if args.no_callback else dict_trie(codes)
        model = random_decoder(vocab_sizes, dim=args.dim, layers=args.layers, seed=args.seed).to(device)
        trie_info = {
            "num_items": num_items,
            "sid_shape": args.sid_shape,
            "vocab_sizes": vocab_sizes,
            "level_sizes": list(trie.level_sizes),
            "dense_levels": trie.dense_levels,
            "layouts": list(trie.layouts),
            "max_branch": list(trie.max_branch),
            "build_s": build_s,
            **index_bytes(trie, codes, args.flat_dim),
        }
        print(_bytes_summary(trie_info), flush=True)
        for beam_size, batches in zip(args.beams, args.batches):
            run = measure(
                model,
                trie,
                callback_root,
                beam_size,
                args.batch_size,
                batches,
                device,
                args.dim,
                args.memory_tokens,
            )
            report["runs"].append({**trie_info, **run})
            print(_summary(report["runs"][-1]), flush=True)
        del callback_root, codes, trie
        report.setdefault("peak_rss_gib_after", {})[str(num_items)] = memory.observe(num_items)
    if args.internet_scale:
        report["projection"] = projection_table(report["runs"], args.faiss_items, args.flat_dim, args.seed)
        print(projection_markdown(report["projection"]), flush=True)
    largest = [
        r for r in report["runs"] if r["num_items"] == max(args.sizes) and r["beam_size"] == max(args.beams)
    ]
    if largest and not args.no_callback:
        r = largest[0]
        report["targets"] = {
            "setting": f"beam {r['beam_size']}, {r['num_items']} items",
            "mask_share_trie_ops": r["mask_share_trie_ops"],
            "mask_share_at_most_5_percent": r["mask_share_trie_ops"] <= 0.05,
            "speedup_vs_callback": r["speedup_vs_callback"],
            "free_model_speedup_vs_callback": r["free_model_speedup_vs_callback"],
            "at_least_10x_faster_than_callback": r["speedup_vs_callback"] >= 10.0,
            "generative_index_bytes_per_item": r["generative_index_bytes_per_item"],
            "flat_index_bytes_per_item": r["flat_index_bytes_per_item"],
            "generative_index_at_most_1_50_of_flat": r["generative_index_fraction_of_flat"] <= 1 / 50,
        }
    report["wall_s"] = time.perf_counter() - started
    write_json_atomic(args.out, report)
    print(f"wrote {args.out} in {report['wall_s']:.1f} s", flush=True)
    return report


def index_bytes(trie: SIDTrie, codes: np.ndarray, flat_dim: int) -> dict:
    """Bytes per item of the trie (in total and per tensor), the SID table, and both against FAISS Flat."""
    num_items = trie.num_items
    components = trie.nbytes_by_component()
    sid_table = sid_table_nbytes(codes, trie.vocab_sizes)
    generative = (trie.nbytes() + sid_table) / num_items
    flat = 4.0 * flat_dim
    return {
        "trie_bytes": trie.nbytes(),
        "bytes_per_item": trie.nbytes() / num_items,
        "trie_bytes_by_component": components,
        "trie_bytes_per_item_by_component": {name: size / num_items for name, size in components.items()},
        "sid_table_bytes_per_item": sid_table / num_items,
        "generative_index_bytes_per_item": generative,
        "flat_index_bytes_per_item": flat,
        "generative_index_fraction_of_flat": generative / flat,
    }


# ------------------------------------------------------------- memory, 1B table
def available_gib() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` in GiB (inf where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MemoryGuard:
    """Skips a size whose estimated peak memory would leave less than ``headroom_gib`` available.

    The estimate is bytes per item times N; bytes per item start at ``initial_bytes_per_item`` and become the
    largest peak growth per item measured so far (sizes should ascend).
    """

    def __init__(self, headroom_gib: float, initial_bytes_per_item: float = 64.0) -> None:
        self.headroom_gib, self.bytes_per_item = headroom_gib, initial_bytes_per_item
        self.base_gib = peak_rss_gib()

    def need_gib(self, num_items: int) -> float:
        return self.bytes_per_item * num_items / 2**30

    def fits(self, num_items: int) -> bool:
        return self.need_gib(num_items) + self.headroom_gib <= available_gib()

    def skip_record(self, num_items: int) -> dict:
        return {"num_items": num_items, "reason": f"needs about {self.need_gib(num_items):.1f} GiB at "
                f"{self.bytes_per_item:.0f} B/item measured, {available_gib():.1f} GiB available, "
                f"{self.headroom_gib:.0f} GiB kept free"}

    def observe(self, num_items: int) -> float:
        peak = peak_rss_gib()
        self.bytes_per_item = max(self.bytes_per_item, (peak - self.base_gib) * 2**30 / num_items)
        return peak


def faiss_bytes_per_item(num_items: int, dim: int, seed: int) -> dict:
    """Measured bytes per item of FAISS IVF-PQ (32 and 64 B codes) and HNSW32 over ``num_items`` random vectors,
    and each one's per-item part (without the shared centroids / codebooks), which is what grows with N."""
    from grcm.rerank.index import DenseIndex
    from grcm.rerank.index_config import DenseIndexConfig

    vectors = np.random.default_rng(seed).standard_normal((num_items, dim), dtype=np.float32)
    measured = {}
    for pq_m in (32, 64):
        start = time.perf_counter()
        index = DenseIndex.build(vectors, DenseIndexConfig(kind="ivf_pq", pq_m=pq_m, pq_bits=8, use_gpu=False))
        shared = 4 * dim * (index.config.nlist + 2**8)  # coarse centroids + PQ codebooks (256 x dim floats)
        measured[f"ivf_pq{pq_m}"] = {"bytes_per_item": index.bytes_per_item, "nlist": index.config.nlist,
                                     "per_item_part": index.bytes_per_item - shared / num_items,
                                     "build_s": time.perf_counter() - start}
    start = time.perf_counter()
    index = DenseIndex.build(vectors, DenseIndexConfig(kind="hnsw", hnsw_m=32, use_gpu=False))
    measured["hnsw32"] = {"bytes_per_item": index.bytes_per_item, "per_item_part": index.bytes_per_item,
                          "build_s": time.perf_counter() - start}
    return measured


def projection_table(runs: list[dict], faiss_items: int, dim: int, seed: int,
                     sizes: Sequence[int] = (1_000_000, 10_000_000, 100_000_000, 1_000_000_000)) -> dict:
    """Bytes per item to 1B items: generative (trie + SID table) and FAISS IVF-PQ / HNSW, each measured or projected.

    Generative: measured at every size decoded; above the largest, that size's trie bytes per item (its per-item
    part is constant in N, its shared dense tables only shrink per item) plus the SID table in the dtypes of the
    unique-token vocabulary grown in proportion to N. FAISS: measured on
    ``faiss_items`` random vectors; projected as the per-item part plus the shared part (``auto_nlist(N)`` coarse
    centroids, PQ codebooks) over N.
    """
    from grcm.rerank.index_config import auto_nlist

    generative = {r["num_items"]: r for r in runs}
    faiss_measured = faiss_bytes_per_item(faiss_items, dim, seed) if faiss_items > 0 else {}
    largest = max(generative) if generative else None
    rows = []
    for n in sorted({*sizes, *generative, *([faiss_items] if faiss_items > 0 else [])}):
        row: dict = {"num_items": n}
        if n in generative:
            r = generative[n]
            row["generative"] = {"bytes_per_item": r["generative_index_bytes_per_item"], "measured": True,
                                 "build_s": r["build_s"], "vocab_sizes": r["vocab_sizes"]}
        elif largest is not None and n > largest:
            # the largest measured trie's bytes per item, plus the SID table with the unique-token vocabulary
            # grown in proportion to N (the code levels keep their sizes)
            r = generative[largest]
            vocab = [*r["vocab_sizes"][:-1], math.ceil(r["vocab_sizes"][-1] * n / largest)]
            sid_table = sum(torch.empty(0, dtype=sid_table_dtype(v)).element_size() for v in vocab)
            row["generative"] = {"bytes_per_item": r.get("bytes_per_item", 0.0) + sid_table, "measured": False,
                                 "from_items": largest, "vocab_sizes": vocab}
        for name, m in faiss_measured.items():
            if name.startswith("ivf_pq"):
                shared = 4 * dim * (auto_nlist(n) + 2**8)
                row[name] = {"bytes_per_item": m["per_item_part"] + shared / n, "measured": n == faiss_items}
            else:
                row[name] = {"bytes_per_item": m["per_item_part"], "measured": n == faiss_items}
        row["flat"] = {"bytes_per_item": 4.0 * dim, "measured": True}  # exact: dim float32 per item
        rows.append(row)
    return {"faiss_measured_at": faiss_items, "faiss": faiss_measured, "rows": rows}


def projection_markdown(projection: dict) -> str:
    """The 1B table: bytes per item and GiB in all, a star on each projected figure."""
    names = ("generative", "ivf_pq32", "ivf_pq64", "hnsw32", "flat")
    lines = ["| items | " + " | ".join(f"{n} B/item (GiB)" for n in names) + " |", "|---:|" + "---:|" * len(names)]
    for row in projection["rows"]:
        cells = []
        for name in names:
            cell = row.get(name)
            if cell is None:
                cells.append("-")
                continue
            total = cell["bytes_per_item"] * row["num_items"] / 2**30
            cells.append(f"{cell['bytes_per_item']:.1f} ({total:,.1f}){'' if cell['measured'] else '*'}")
        lines.append(f"| {row['num_items']:,} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", f"* projected; FAISS measured on {projection['faiss_measured_at']:,} random vectors"])


def _bytes_summary(info: dict) -> str:
    parts = ", ".join(
        f"{name} {size:.2f}"
        for name, size in info["trie_bytes_per_item_by_component"].items()
        if size >= 0.005
    )
    return (
        f"N={info['num_items']:>8} index bytes/item: trie {info['bytes_per_item']:.2f} ({parts}) + SID table "
        f"{info['sid_table_bytes_per_item']:.2f} = {info['generative_index_bytes_per_item']:.2f} "
        f"(1/{1 / info['generative_index_fraction_of_flat']:.0f} of Flat's {info['flat_index_bytes_per_item']:.0f}); "
        f"layouts {info['layouts']}"
    )


def _summary(run: dict) -> str:
    if "callback_queries_per_s" not in run:
        return (
            f"N={run['num_items']:>10} beam={run['beam_size']:>3}: trie {run['trie_queries_per_s']:8.1f} q/s "
            f"(wall), {run['trie_queries_per_cpu_s']:8.1f} q/CPU-s; mask share "
            f"{100 * run['mask_share_trie_ops']:.2f}%; free model {run['free_model_trie_queries_per_cpu_s']:.0f} q/CPU-s"
        )
    return (
        f"N={run['num_items']:>8} beam={run['beam_size']:>3}: trie {run['trie_queries_per_s']:8.1f} q/s, "
        f"callback {run['callback_queries_per_s']:8.1f} q/s (wall); by {run['timing_basis_for_shares']}: "
        f"x{run['speedup_vs_callback']:.2f} vs callback, mask share {100 * run['mask_share_trie_ops']:.2f}% "
        f"(difference {100 * run['mask_share_by_difference']:.2f}%); free model: x"
        f"{run['free_model_speedup_vs_callback']:.1f} vs callback, mask share "
        f"{100 * run['free_model_mask_share_trie_ops']:.1f}%"
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
