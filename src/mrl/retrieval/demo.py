"""The adaptive-retrieval section of `mrl demo`: quality and speed per shortlist prefix D_s.

For each D_s in the nesting: shortlist K=200 on the D_s prefix, rerank at D (the paper's
adaptive retrieval), next to exact full-size search and to plain search on the D_s prefix alone.
Quality as in the paper: mAP@10 (standard AP, normalised by min(10, R)) and the top retrieved
neighbour's label accuracy (metric ``1nn``, as the demo's first section names it); plus
recall@10 against exact full-size search and queries/second.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from mrl.records import Record, make_record, save_records
from mrl.retrieval.exact import exact_search
from mrl.retrieval.funnel.index import MatryoshkaIndex, SearchConfig
from mrl.retrieval.tune import recall_at_k

__all__ = ["demo_section", "label_quality"]


def label_quality(
    indices: np.ndarray, db_labels: np.ndarray, query_labels: np.ndarray, k: int = 10
) -> dict[str, float]:
    """mAP@k and the top retrieved row's label accuracy (``1nn``: the metric name the demo's
    first section gives the same quantity, so the two share a table) of retrieved rows' labels
    (relevant = same label)."""
    from mrl.metrics import accuracy, label_relevance, map_at_k

    retrieved = np.asarray(db_labels)[indices[:, :k]]  # [Q, k]
    rel, num = label_relevance(retrieved, query_labels, db_labels)
    return {f"map@{k}": map_at_k(rel, num, k), "1nn": accuracy(retrieved[:, 0], query_labels)}


def _get(ctx: Any, *names: str) -> np.ndarray:
    """The first attribute of ``ctx`` that exists, as numpy (torch CPU tensors included)."""
    for name in names:
        value = getattr(ctx, name, None)
        if value is not None:
            value = value.detach().cpu().numpy() if hasattr(value, "detach") else value
            return np.asarray(value)
    raise ValueError(f"the demo context needs one of {list(names)}")


def demo_section(ctx: Any, k: int = 10, shortlist: int = 200) -> tuple[str, list[Record]]:
    """(markdown, records) for `mrl demo`.

    ``ctx`` has the database embeddings [N, D] and labels [N] (``db_embeddings`` /
    ``db_labels``, or `mrl demo`'s ``train_embeddings`` / ``train_labels``), the queries [Q, D]
    and labels [Q] (``query_*`` or ``test_*``), ``nesting`` and optionally ``out_dir`` (records
    saved there as retrieval.json). mAP@k, 1-NN and recall@k (k is capped by the database
    size) are in percent, like the demo's classification and retrieval records (its cascade and
    few-shot records are fractions, as `mrl cascade eval` writes them).
    """
    db = np.ascontiguousarray(_get(ctx, "db_embeddings", "train_embeddings"), np.float32)
    q = np.ascontiguousarray(_get(ctx, "query_embeddings", "test_embeddings"), np.float32)
    db_labels = _get(ctx, "db_labels", "train_labels")
    q_labels = _get(ctx, "query_labels", "test_labels")
    nesting = ctx.nesting
    d = nesting.dim
    k = min(k, len(db))
    shortlist = max(k, min(shortlist, len(db)))
    records: list[Record] = []

    def add(method: str, prefix: int, idx: np.ndarray, secs: float, truth: np.ndarray) -> None:
        row = {m: 100 * v for m, v in label_quality(idx, db_labels, q_labels, k).items()}
        row |= {f"recall@{k}": 100 * recall_at_k(idx, truth), "qps": len(q) / max(secs, 1e-9)}
        for metric, value in row.items():
            records.append(
                make_record(
                    method,
                    prefix,
                    metric,
                    value,
                    section="retrieval",
                    shortlist=shortlist if method == "funnel" else None,
                    k=k,  # the context the other sections' records carry
                    n_db=len(db),
                    n_queries=len(q),
                    **({"dataset": ctx.dataset} if getattr(ctx, "dataset", None) else {}),
                )
            )

    t = time.perf_counter()
    _, truth = exact_search(db, q, k)
    add("exact", d, truth, time.perf_counter() - t, truth)
    index = MatryoshkaIndex(nesting, SearchConfig(shortlist=shortlist, backend="numpy"))
    index.add(db)
    for m in nesting.sizes[:-1]:
        index.build(SearchConfig(shortlist_dim=m, backend="numpy"))
        t = time.perf_counter()
        res = index.search(q, k, shortlist_dim=m)
        add("funnel", m, res.indices, time.perf_counter() - t, truth)
        t = time.perf_counter()
        _, idx = exact_search(db, q, k, dims=m)
        add("prefix-only", m, idx, time.perf_counter() - t, truth)
    if getattr(ctx, "out_dir", None):
        save_records(Path(ctx.out_dir) / "retrieval.json", records)
    return _markdown(records, shortlist, d, k), records


def _markdown(records: list[Record], shortlist: int, d: int, k: int = 10) -> str:
    by: dict[tuple[str, int], dict[str, float]] = {}
    for r in records:
        by.setdefault((r["method"], r["prefix"]), {})[r["metric"]] = r["value"]
    lines = [
        "## Adaptive retrieval",
        "",
        f"Shortlist {shortlist} on the first D_s dims, rerank at {d} (funnel), vs exact search "
        f"at {d} and search on D_s alone. mAP@{k} / 1-NN (top-1) of the retrieved labels and "
        f"recall@{k} vs exact search, in percent; queries/s on this machine (numpy backend, "
        "one run).",
        "",
        f"| method | D_s | mAP@{k} | 1-NN | recall@{k} | queries/s |",
        "|---|---|---|---|---|---|",
    ]
    for (method, prefix), v in sorted(by.items(), key=lambda x: (x[0][1], x[0][0])):
        lines.append(
            f"| {method} | {prefix} | {v[f'map@{k}']:.2f} | {v['1nn']:.2f} | "
            f"{v[f'recall@{k}']:.2f} | {v['qps']:.0f} |"
        )
    return "\n".join(lines) + "\n"
