"""The dense rows of benchmarks/scale.py: one trained dual tower searched by FAISS Flat, HNSW and IVF-PQ.

Each approximate index is set up at its cheapest setting whose recall@10 against Flat (the share of Flat's top 10
that it returns) is >= ``TARGET_RECALL_VS_FLAT`` on the validation queries: HNSW at the smallest ``ef_search``,
IVF-PQ at the fewest bytes per item and then the fewest probed cells. The chosen settings are then tested on the
test queries. Also HNSW's top-P candidate recall (gold item among its top P) at P = the generative pool size.

Queries per CPU-second count the query tower's encoding and the search (one FAISS thread when the caller set it);
the share of the corpus scored is FAISS' own count of distance computations (``hnsw_stats`` /
``indexIVF_stats``) per query over N.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

TARGET_RECALL_VS_FLAT = 0.95
EF_SEARCH = (16, 32, 64, 128, 256, 512)
IVFPQ_M = (32, 64, 128)  # sub-quantisers of 8 bits: 32, 64 or 128 B/item of codes for 256-d embeddings
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def encode_split(model, datamodule, split: str, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray, float]:
    """``(Q, E)`` float32 query embeddings, ``(Q,)`` gold items and the CPU seconds the encoding took."""
    queries = datamodule.query_batches(split)
    rows = list(range(len(queries)))
    chunks, golds = [], []
    started = time.process_time()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = queries(rows[start: start + batch_size])
            chunks.append(model.encode_queries(batch["input_ids"], batch["attention_mask"]).float().numpy())
            golds.append(batch["gold_items"][:, 0].numpy())
    return np.concatenate(chunks), np.concatenate(golds), time.process_time() - started


def recall_vs_reference(found: np.ndarray, reference: np.ndarray) -> float:
    """Mean share of each row of ``reference`` ``(Q, k)`` that ``found`` ``(Q, k)`` also returns."""
    hits = [len(set(f.tolist()) & set(r.tolist())) for f, r in zip(found, reference)]
    return float(np.mean(hits)) / reference.shape[1]


def ranking_metrics(ranked: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """R@1, R@5, R@10 and MRR@10 of ``(Q, >=10)`` rankings against ``(Q,)`` gold items (grcm's metric)."""
    from grcm.metrics import ItemRetrievalMetrics

    metrics = ItemRetrievalMetrics()
    metrics.update(torch.as_tensor(ranked[:, :10], dtype=torch.long), torch.as_tensor(gold).long().unsqueeze(1),
                   torch.arange(len(gold)))
    return {key: float(value) for key, value in metrics.compute().items()}


def _distance_counter(kind: str):
    """A reset function and a reader of FAISS' distance-computation counter for ``kind``."""
    import faiss

    stats = faiss.cvar.hnsw_stats if kind == "hnsw" else faiss.cvar.indexIVF_stats
    return stats.reset, lambda: int(stats.ndis)


def timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """``(Q, k)`` ids, CPU seconds and distance computations per query of one search."""
    kind = index.config.kind
    reset, read = _distance_counter(kind) if kind in ("hnsw", "ivf_pq") else (lambda: None, lambda: 0)
    reset()
    started = time.process_time()
    _, ids = index.search(queries, k)
    seconds = time.process_time() - started
    per_query = read() / len(queries) if kind in ("hnsw", "ivf_pq") else float(index.num_items)
    return ids, seconds, per_query


def pick_setting(candidates: list[tuple[dict, object]], val: np.ndarray, reference: np.ndarray) -> dict:
    """The first ``(setting, index)`` (cheapest first) whose val recall@10 vs Flat meets the target, else the best."""
    tried = []
    for setting, index in candidates:
        index.set_search_params(nprobe=setting.get("nprobe"), ef_search=setting.get("ef_search"))
        ids, _, _ = timed_search(index, val, 10)
        tried.append({**setting, "val_recall@10_vs_flat": recall_vs_reference(ids, reference)})
        if tried[-1]["val_recall@10_vs_flat"] >= TARGET_RECALL_VS_FLAT:
            return {**tried[-1], "meets_target": True, "tried": tried}
    best = max(tried, key=lambda t: t["val_recall@10_vs_flat"])
    return {**best, "meets_target": False, "tried": tried}


def test_row(index, setting: dict, test: np.ndarray, gold: np.ndarray, encode_cpu: float) -> dict:
    """The row of one index at ``setting`` on the test queries."""
    index.set_search_params(nprobe=setting.get("nprobe"), ef_search=setting.get("ef_search"))
    ids, seconds, scored = timed_search(index, test, 10)
    row = ranking_metrics(ids, gold)
    return {
        **row, "queries_per_cpu_s": len(test) / max(seconds + encode_cpu, 1e-9),
        "search_queries_per_cpu_s": len(test) / max(seconds, 1e-9),
        "index_bytes_per_item": float(index.bytes_per_item), "pool_size": scored,
        "corpus_fraction_scored": scored / index.num_items, "test_queries": len(test),
        "setting": {k: v for k, v in setting.items() if k != "tried"}, "settings_tried": setting.get("tried", []),
    }


def dense_rows(config: Path, overrides: list[str], checkpoint: str, pool_size: int,
               quick: bool = False) -> tuple[dict[str, dict], dict]:
    """Rows ``{name: row}`` for Flat, HNSW and IVF-PQ, and HNSW's top-``pool_size`` candidate recall."""
    from grcm.checkpoint import read_checkpoint
    from grcm.demo import DENSE
    from grcm.lightning_cli import GrcmCLI
    from grcm.rerank.index import DenseIndex

    cli = GrcmCLI(args=["-c", str(config), *overrides], run=False)
    datamodule = cli.datamodule
    model = type(cli.model).load_from_checkpoint(checkpoint, weights_only=True).eval()
    datamodule.setup("test")
    state = read_checkpoint(checkpoint).get(type(datamodule).__qualname__)
    if state:  # the trained query vocabulary
        datamodule.load_state_dict(state)
    with torch.inference_mode():
        items = model.embed_corpus(datamodule.corpus)
    val, _, _ = encode_split(model, datamodule, "val")
    test, gold, encode_cpu = encode_split(model, datamodule, "test")
    base = model.index_config
    flat = DenseIndex.build(items, replace(base, kind="flat"))
    _, reference = flat.search(val, 10)
    rows = {DENSE: test_row(flat, {"kind": "flat"}, test, gold, encode_cpu)}
    rows[DENSE]["candidate_recall"] = 1.0

    hnsw = DenseIndex.build(items, replace(base, kind="hnsw"))
    hnsw_setting = pick_setting([({"ef_search": ef}, hnsw) for ef in EF_SEARCH], val, reference)
    rows["dual tower (FAISS HNSW)"] = test_row(hnsw, hnsw_setting, test, gold, encode_cpu)

    ivf_candidates = []
    for pq_m in IVFPQ_M[:1] if quick else IVFPQ_M:
        index = DenseIndex.build(items, replace(base, kind="ivf_pq", pq_m=pq_m, pq_bits=8, use_gpu=False))
        nlist = index.config.nlist or 1
        probes = sorted({min(n, nlist) for n in NPROBE})
        ivf_candidates += [({"pq_m": pq_m, "nprobe": n, "nlist": nlist}, index) for n in probes]
    ivf_setting = pick_setting(ivf_candidates, val, reference)
    chosen = next(index for setting, index in ivf_candidates
                  if setting["pq_m"] == ivf_setting["pq_m"] and setting["nprobe"] == ivf_setting["nprobe"])
    rows["dual tower (FAISS IVF-PQ)"] = test_row(chosen, ivf_setting, test, gold, encode_cpu)

    ef = max(hnsw_setting["ef_search"], pool_size)
    hnsw.set_search_params(ef_search=ef)
    ids, _, _ = timed_search(hnsw, test, pool_size)
    stage1 = {"hnsw_ef_search": ef, "hnsw_top_p_candidate_recall": float((ids == gold[:, None]).any(1).mean()),
              "flat_top_p_candidate_recall": float((flat.search(test, pool_size)[1] == gold[:, None]).any(1).mean())}
    return rows, stage1
