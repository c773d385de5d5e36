"""Adaptive retrieval: a Matryoshka funnel index against exact full-size search.

Builds a `mrl.retrieval.MatryoshkaIndex` over Matryoshka embeddings [N, D]: the shortlist scans
only the first D_s dims of every row and keeps K candidates; rerank stages then score those
candidates at larger prefixes (the paper's funnel: double the prefix, halve K, end at D). The
script measures recall@10 of the funnel against `exact_search` at full size, queries/s of both
in the same run, then saves the index, reopens it and checks it answers the same. The saving
grows with N and D: at --quick's size the funnel's fixed costs outweigh it (< 1x is expected).
The paper shortlists on 16 dims of 2048; here D_s=32 of 1024 keeps recall@10 near 0.99.

Data: MRL-like synthetic embeddings (`mrl.retrieval.synthetic.mrl_like`: energy concentrated in
the leading coordinates, like a trained Matryoshka model's); pass your own arrays to `compare`.

Run:
    python examples/funnel_search.py                   # N=100k, D=1024: ~15 s on a CPU
    python examples/funnel_search.py --quick           # a few seconds (what the tests run)
    python examples/funnel_search.py --backend flat    # FAISS shortlist (the `faiss` extra)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrl import Nesting
from mrl.retrieval import MatryoshkaIndex, SearchConfig, exact_search, funnel_stages
from mrl.retrieval.synthetic import mrl_like
from mrl.retrieval.tune import recall_at_k

K = 10


def build_index(
    db: np.ndarray, shortlist_dim: int, shortlist: int, backend: str
) -> MatryoshkaIndex:
    """Index over db [N, D] with string ids; shortlist K on D_s dims, then the funnel stages."""
    nesting = Nesting.doubling(8, db.shape[1])  # 8, 16, ..., D
    stages = funnel_stages(shortlist_dim, shortlist, db.shape[1], K, nesting)  # ((2 D_s, K/2), ...)
    config = SearchConfig(shortlist_dim=shortlist_dim, shortlist=shortlist, stages=stages,
                          backend=backend)  # fmt: skip
    index = MatryoshkaIndex(nesting, config)
    index.add(db, ids=[f"doc{i}" for i in range(len(db))])
    index.build()  # the normalised [N, D_s] prefix copy, made now rather than in the first search
    return index


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def compare(index: MatryoshkaIndex, db: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    """recall@K of the funnel vs exact full-size search, and queries/s of both (same run)."""
    index.search(queries[:8], k=K)  # warm-up: thread pools, first-call allocations
    (_, truth), t_exact = timed(exact_search, db, queries, K)  # [Q, K] row indices
    res, t_funnel = timed(index.search, queries, k=K)  # res.indices / res.ids: [Q, K]
    return {"recall": recall_at_k(res.indices, truth), "exact_qps": len(queries) / t_exact,
            "funnel_qps": len(queries) / t_funnel}  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="database rows N (100000; quick 20000)")
    p.add_argument("--queries", type=int, default=None, help="queries Q (1000; quick 200)")
    p.add_argument("--dim", type=int, default=None, help="embedding size D (1024; quick 256)")
    p.add_argument("--shortlist-dim", type=int, default=32, help="D_s, prefix of the shortlist")
    p.add_argument("--shortlist", type=int, default=200, help="K, candidates kept")
    p.add_argument("--backend", default="numpy", help="numpy | torch | flat | hnsw | ivf")
    p.add_argument("--out", default=None, help="index folder (default: a temp folder)")
    p.add_argument("--quick", action="store_true", help="tiny run (seconds on a CPU)")
    args = p.parse_args(argv)
    sizes = {"n": (100_000, 20_000), "queries": (1000, 200), "dim": (1024, 256)}
    for name, (full, quick) in sizes.items():  # an option given explicitly wins over --quick
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    db, _ = mrl_like(args.n, args.dim, clusters=args.n // 50, seed=0)  # [N, D], unit rows
    queries, _ = mrl_like(args.queries, args.dim, clusters=args.n // 50, seed=1)  # [Q, D]
    index = build_index(db, args.shortlist_dim, args.shortlist, args.backend)
    stats = compare(index, db, queries)
    print(f"N={args.n}, D={args.dim}, Q={args.queries}; funnel: shortlist {args.shortlist} on "
          f"{args.shortlist_dim} dims, stages {index.config.stages}")  # fmt: skip
    print(f"| search | recall@{K} | queries/s |\n|---|---|---|")
    print(f"| exact (D={args.dim}) | 1.000 | {stats['exact_qps']:.0f} |")
    print(f"| funnel | {stats['recall']:.3f} | {stats['funnel_qps']:.0f} |")
    print(f"funnel speed-up: {stats['funnel_qps'] / stats['exact_qps']:.1f}x (this run)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.out or tmp) / "funnel.index"
        index.save(path)
        reopened = MatryoshkaIndex.load(path)  # full-size vectors memory-mapped from disk
        before, after = index.search(queries, k=K), reopened.search(queries, k=K)
        stats["same_after_reload"] = bool(np.array_equal(before.ids, after.ids))
        del reopened, after  # release the memory map before the temp folder goes
    top3 = [str(i) for i in before.ids[0, :3]]
    print(
        f"saved to {path if args.out else 'a temp folder'}, reopened: same ids "
        f"{stats['same_after_reload']}; first query's top 3: {top3}"
    )
    return stats


if __name__ == "__main__":
    main()
