"""The report of benchmarks/scale.py: ``scale.json``, a markdown table (``scale.md``) and a plot (``scale.png``)."""

from __future__ import annotations

from pathlib import Path

from grcm.io import write_json_atomic

#: (column, row key, format); a missing value prints "-"
COLUMNS = (
    ("R@1", "recall@1", "{:.2%}"),
    ("R@10", "recall@10", "{:.2%}"),
    ("MRR@10", "mrr@10", "{:.4f}"),
    ("R@1 / exact dense", "recall@1_vs_exact_dense", "{:.3f}"),
    ("gold in pool", "candidate_recall", "{:.2%}"),
    ("pool", "pool_size", "{:,.1f}"),
    ("corpus scored", "corpus_fraction_scored", "{:.3%}"),
    ("queries/CPU-s", "queries_per_cpu_s", "{:,.0f}"),
    ("index B/item", "index_bytes_per_item", "{:,.1f}"),
    ("train s", "train_seconds", "{:,.0f}"),
)


#: table order: dense rows, then ACE, then GRDR (a row not named here goes last)
ROW_ORDER = ("dual tower (FAISS Flat", "dual tower (FAISS HNSW", "dual tower (FAISS IVF-PQ", "ACE generative",
             "ACE recall + dense rerank (flat", "ACE recall + dense rerank (PQ", "ACE recall + fused", "GRDR generative",
             "GRDR recall")


def _row_rank(name: str) -> int:
    return next((i for i, prefix in enumerate(ROW_ORDER) if name.startswith(prefix)), len(ROW_ORDER))


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def _epochs(row: dict) -> str:
    return " + ".join(f"{epochs}" for epochs in row.get("train_epochs", {}).values()) or "-"


def markdown(summary: dict) -> str:
    """One table per size, then the stage-1 comparison (HNSW top-P vs ACE's pool of P)."""
    lines = []
    for size, state in summary["sizes"].items():
        lines += [f"### N = {int(size):,} items ({state['test_queries']:,} test queries)", "",
                  "| method | " + " | ".join(name for name, _, _ in COLUMNS) + " | epochs |",
                  "|---|" + "---:|" * (len(COLUMNS) + 1)]
        for name, row in sorted(state["rows"].items(), key=lambda item: _row_rank(item[0])):
            label = name
            if row.get("setting") and row["setting"].get("kind") != "flat":
                label += " (" + ", ".join(f"{k} {v}" for k, v in row["setting"].items()
                                          if k in ("ef_search", "pq_m", "nprobe")) + ")"
            if row.get("fusion_weight") is not None:
                label += f" (w = {row['fusion_weight']})"
            lines.append(f"| {label} | " + " | ".join(_cell(row, k, f) for _, k, f in COLUMNS)
                         + f" | {_epochs(row)} |")
        stage1 = state.get("stage1_comparison")
        if stage1:
            lines += ["", f"Stage 1 at P = {stage1['ace_pool_size']:.1f}: ACE's pool holds the gold item for "
                      f"{stage1['ace_candidate_recall']:.2%} of queries, HNSW's top {round(stage1['ace_pool_size'])} "
                      f"(ef_search {stage1['hnsw_ef_search']}) for {stage1['hnsw_top_p_candidate_recall']:.2%}, "
                      f"exact dense top {round(stage1['ace_pool_size'])} for {stage1['flat_top_p_candidate_recall']:.2%}."]
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """R@1 vs N per method (left) and stage-1 candidate recall vs N (right), log-scaled N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(summary["sizes"], key=int)
    names = list(dict.fromkeys(name for size in sizes for name in summary["sizes"][size]["rows"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        points = [(int(s), summary["sizes"][s]["rows"][name]["recall@1"]) for s in sizes
                  if name in summary["sizes"][s]["rows"]]
        left.plot(*zip(*points), marker="o", label=name)
    left.set(xscale="log", xlabel="corpus items N", ylabel="test R@1", title="R@1 vs corpus size")
    left.legend(fontsize=7)
    stage1 = [(int(s), summary["sizes"][s]["stage1_comparison"]) for s in sizes
              if "stage1_comparison" in summary["sizes"][s]]
    if stage1:
        xs = [n for n, _ in stage1]
        right.plot(xs, [c["ace_candidate_recall"] for _, c in stage1], marker="o", label="ACE pool (beam 25)")
        right.plot(xs, [c["hnsw_top_p_candidate_recall"] for _, c in stage1], marker="s", label="HNSW top P")
        right.plot(xs, [c["flat_top_p_candidate_recall"] for _, c in stage1], marker="^", label="exact dense top P")
    right.set(xscale="log", xlabel="corpus items N", ylabel="gold in pool", title="stage-1 candidate recall, same P")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(root: Path, summary: dict) -> None:
    """``<root>/scale.json``, ``scale.md`` and ``scale.png``; prints the markdown."""
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / "scale.json", summary)
    text = markdown(summary)
    (root / "scale.md").write_text(text + "\n")
    plot(summary, root / "scale.png")
    print(text, flush=True)
