"""`mrl bench retrieval`: exact vs HNSW vs the Matryoshka funnel on MRL-like data (or your own).

One run; ratios printed, table last. Methods:

- ``exact``: FAISS exhaustive inner product at full D (`faiss.knn`, the IndexFlatIP kernel, on the
  caller's array without a second copy of the database); also the ground truth.
- ``funnel``: `MatryoshkaIndex` auto-tuned (`mrl.retrieval.tune.tune`) to the target recall@k,
  then measured on the test queries it never saw. Tuning queries: on MRL-like data 500 fresh
  draws from the query distribution (another seed: what a user's query log would be); on your own
  embeddings 200 held-out database rows. The tuner tries flat, prefix-HNSW, prefix-IVF and
  prefix-IVF-PQ shortlists (D_s, K, nprobe / efSearch, funnel stages).
- ``funnel-paper``: the paper's fixed configuration (D_s=16, K=200, rerank at D), for reference.
- ``hnsw``: FAISS IndexHNSWFlat (M=32) on the full D, at the largest ``hnsw_n`` that builds in
  reasonable time, with efSearch raised until the target recall; the funnel is rebuilt and retuned
  at that same N for the comparison (``n`` is in every record), under a memory budget of half
  the HNSW index's serialised size (`tune(max_memory=)`).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import numpy as np

from mrl.nesting import Nesting
from mrl.records import Record, make_record
from mrl.retrieval.funnel.index import MatryoshkaIndex, SearchConfig
from mrl.retrieval.synthetic import mrl_like
from mrl.retrieval.tune import MemoryBudgetError, flops_per_query, recall_at_k, timed, tune

__all__ = ["bench_retrieval", "format_table", "environment", "min_rows"]

# The tuner always tries IVF-PQ, whose 4-bit codes train 16 k-means centroids per sub-vector: a
# smaller database failed only after the exact search and the other backends had run.
MIN_ROWS = 16


def min_rows(k: int) -> int:
    """The fewest database rows a top-``k`` benchmark runs on: more than k, and `MIN_ROWS`."""
    return max(int(k) + 1, MIN_ROWS)


def environment() -> dict[str, Any]:
    import faiss
    import torch

    import mrl

    return {
        "machine": platform.processor() or platform.machine(),
        "cpus": _cpus(),  # also the FAISS threads of every timed method
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "torch": torch.__version__,
        "mrl": mrl.__version__,
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _scratch(n: int, dim: int) -> np.ndarray | None:
    """A disk-backed [n, dim] float32 array when it would exceed 2 GiB (the 1M x 2048 database is
    8 GB: as a memory map the OS pages it in and out instead of the process holding it); the
    file is unlinked at once, so it disappears with the process."""
    if n * dim * 4 <= 2**31:
        return None
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="mrl-bench-", suffix=".f32")
    os.close(fd)
    arr = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, dim))
    os.unlink(path)  # the mapping keeps the data alive
    return arr


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero), float32, C-contiguous."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


# Queries run once, untimed, before each timed search: a first call pays thread start-up and
# cold caches (at N=5000 a cold exact search measured 25k queries/s, a warm one 107k).
_WARMUP = 8


def _exact(db: np.ndarray, q: np.ndarray, k: int):
    import faiss

    faiss.knn(q[:_WARMUP], db, k, metric=faiss.METRIC_INNER_PRODUCT)
    (_, idx), secs = timed(lambda: faiss.knn(q, db, k, metric=faiss.METRIC_INNER_PRODUCT))
    return idx, secs


def _funnel(
    db: np.ndarray,
    q: np.ndarray,
    truth: np.ndarray,
    nesting: Nesting,
    k: int,
    target: float,
    say,
    backends=("flat", "hnsw", "ivf", "ivfpq"),
    vector_dtype: str = "float16",
    max_hnsw: int = 2,
    ef_construction: int = 80,
    max_ivf: int = 3,
    tune_queries: np.ndarray | None = None,
    max_memory: int | None = None,
    budget_fallback: bool = False,
) -> dict[str, Any]:
    """Build, tune on held-out rows, then measure on the test queries.

    ``budget_fallback``: where no configuration fits ``max_memory``, take the fastest without
    it (from the same measurements) and report why as ``budget_error`` (else None) instead of
    raising.

    Build time = add (quantise, prefix norms) + the chosen shortlist matrix + its HNSW graph
    (timed when tuning built them; tuning itself is reported separately as tune_s)."""
    first = 16 if 16 in nesting else nesting.sizes[0]  # the default 16 may not be a prefix
    index = MatryoshkaIndex(
        nesting, SearchConfig(shortlist_dim=first, ef_construction=ef_construction),
        vector_dtype=vector_dtype, threads=_cpus(),  # as the exact baseline's FAISS (below)
    )
    _, add_s = timed(lambda: index.add(db, copy=False))
    def tuned_config() -> tuple[Any, str | None]:
        try:
            return tune(
                index,
                target,
                k=k,
                queries=tune_queries,
                max_memory=max_memory,
                n_queries=200,
                backends=backends,
                max_hnsw=max_hnsw,
                max_ivf=max_ivf,
                log=say,
                reference=db,  # exact answers from float32, so int8 rerank error is counted
            ), None
        except MemoryBudgetError as err:
            if not budget_fallback or err.unbudgeted is None:
                raise
            return err.unbudgeted, str(err)  # measured once, not re-tuned

    (tuned, budget_error), tune_s = timed(tuned_config)
    cfg = tuned.config
    index.build(cfg)
    build_s = add_s + _build_seconds(index, cfg)
    import faiss

    # the chosen config passed explicitly: with the budget fallback, tune raised before it set
    # it on the index, and the index's default config was timed under the fallback's name
    index.search(q[:_WARMUP], k, **cfg.to_dict())
    faiss.cvar.hnsw_stats.reset()
    res, secs = timed(lambda: index.search(q, k, **cfg.to_dict()))
    ndis = faiss.cvar.hnsw_stats.ndis / len(q) if cfg.backend == "hnsw" else None
    return {
        "config": cfg,
        "recall": recall_at_k(res.indices, truth),
        "secs": secs,
        "flops": flops_per_query(index.count, cfg, nesting.dim, k, ndis),
        "memory": index.memory_bytes(cfg),
        "build_s": build_s,
        "tune_s": tune_s,
        "timings": res.timings,
        "tuned_recall": tuned.recall,
        "budget_error": budget_error,
        "paper": _paper_point(index, q, truth, nesting, k, first),
    }


def _build_seconds(index: MatryoshkaIndex, cfg: SearchConfig) -> float:
    """Build time of ``cfg``'s shortlist matrix and, where it has one, its IVF or HNSW index."""
    secs = index.build_seconds.get(f"short-{cfg.shortlist_dim}", 0.0)
    if cfg.backend in ("ivf", "ivfpq"):  # k-means on a sample + assigning every row to a cell
        secs += index.build_seconds[f"{cfg.backend}-{cfg.shortlist_dim}-{cfg.nlist or 0}"]
    if cfg.backend == "hnsw":
        secs += index.build_seconds[
            f"hnsw-{cfg.shortlist_dim}-{cfg.hnsw_m}-{cfg.ef_construction}"
        ]
    return secs


def _paper_point(
    index: MatryoshkaIndex, q: np.ndarray, truth: np.ndarray, nesting: Nesting, k: int, first: int
) -> dict[str, Any]:
    """The paper's fixed funnel (shortlist 200 on ``first`` dims, rerank at D), measured."""
    paper = SearchConfig(shortlist_dim=first, shortlist=200)
    index.build(paper)
    index.search(q[:_WARMUP], k, **paper.to_dict())
    pres, psecs = timed(lambda: index.search(q, k, **paper.to_dict()))
    return {
        "config": paper,
        "recall": recall_at_k(pres.indices, truth),
        "secs": psecs,
        "flops": flops_per_query(index.count, paper, nesting.dim, k),
        "memory": index.memory_bytes(paper),
    }


def _hnsw_full(
    db: np.ndarray,
    q: np.ndarray,
    truth: np.ndarray,
    k: int,
    target: float,
    say,
    m: int = 32,
    ef_construction: int = 80,
) -> dict[str, Any]:
    import faiss

    index = faiss.IndexHNSWFlat(db.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    _, build_s = timed(lambda: index.add(db))
    memory = len(faiss.serialize_index(index))
    best = None
    index.search(q[:_WARMUP], k)
    for ef in (16, 32, 64, 128, 256, 512, 1024):
        index.hnsw.efSearch = ef
        faiss.cvar.hnsw_stats.reset()
        (_, idx), secs = timed(lambda: index.search(q, k))  # noqa: B023 - called at once
        rec = recall_at_k(idx, truth)
        ndis = faiss.cvar.hnsw_stats.ndis / len(q)
        say(f"  hnsw full D, efSearch={ef}: recall {rec:.4f}, {len(q) / secs:.0f} q/s")
        best = {
            "ef": ef,
            "recall": rec,
            "secs": secs,
            "flops": 2.0 * ndis * db.shape[1],
            "memory": memory,
            "build_s": build_s,
        }
        if rec >= target:
            break
    return best


def _check_bench_inputs(data: Any, vector_dtype: str, target_recall: float) -> None:
    """What the CLI checks, for the Python call too: a wrong-width query set was FAISS's bare
    AssertionError, a bad dtype or target an error after the exact search had run."""
    from mrl.retrieval.funnel.index import VECTOR_DTYPES

    if vector_dtype not in VECTOR_DTYPES:
        raise ValueError(f"vector_dtype must be one of {list(VECTOR_DTYPES)}, got "
                         f"vector_dtype={vector_dtype!r}")
    if isinstance(target_recall, bool) or not isinstance(target_recall, (int, float)) or not (
            0 < target_recall <= 1):
        raise ValueError(f"target_recall must be in (0, 1], got target_recall={target_recall!r}")
    if data is None:
        return
    db, q = (np.shape(a) for a in data)
    if len(db) != 2 or len(q) != 2 or db[1] != q[1] or 0 in db or 0 in q:
        raise ValueError(f"data must be (db [N, D], queries [Q, D]) with one D, got shapes "
                         f"{db} and {q}")


def bench_retrieval(
    n: int = 100_000,
    dim: int = 2048,
    queries: int = 1000,
    *,
    k: int = 10,
    target_recall: float = 0.99,
    hnsw_n: int | None = None,
    vector_dtype: str = "float16",
    max_hnsw: int = 2,
    ef_construction: int = 80,
    max_ivf: int = 3,
    seed: int = 0,
    data: tuple[np.ndarray, np.ndarray] | None = None,
    dataset: str = "mrl-like",
    log: Callable[[str], None] = print,
    nesting: Nesting | None = None,
) -> list[Record]:
    """Run the benchmark and return records (see the module doc). ``data`` = (db, queries) to use
    your own embeddings; ``hnsw_n`` = 0 skips HNSW (default min(n, 100000)); ``vector_dtype`` is
    the funnel's stored full-size vectors ("float16" default: half of float32's memory at ~1e-5
    dot-product error; "int8" is 1/4 of the memory but cost ~1.5 points of recall@10 here);
    ``max_ivf`` / ``max_hnsw`` cap the prefix IVF indexes / HNSW graphs the tuner builds.
    ``nesting``: the prefixes of ``data``'s model (default doubling from 8: the tuner picks its
    shortlist among these sizes)."""
    for name, v in (("n", n), ("dim", dim), ("queries", queries), ("k", k),
                    ("ef_construction", ef_construction)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {name}={v}")
    for name, v in (("max_hnsw", max_hnsw), ("max_ivf", max_ivf)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {name}={v}")
    _check_bench_inputs(data, vector_dtype, target_recall)  # before the exact search runs
    # 0 skips the comparison; a smaller N fails in the tuner after the main part has run
    if hnsw_n is not None and hnsw_n != 0 and int(hnsw_n) < min_rows(k):
        raise ValueError(f"hnsw_n must be 0 (skip) or >= {min_rows(k)} (more than k={k}, and "
                         f">= {MIN_ROWS}), got hnsw_n={hnsw_n}")
    import faiss

    # every method on the same threads: FAISS's default follows OMP_NUM_THREADS while the
    # index set all cores, so exact ran on 1 thread and the funnel on 2 (speedup 1.75x too high)
    faiss.omp_set_num_threads(_cpus())
    opts: dict[str, Any] = {
        "vector_dtype": vector_dtype,
        "max_hnsw": max_hnsw,
        "ef_construction": ef_construction,
        "max_ivf": max_ivf,
    }
    if data is None:
        _check_size(n, dim, k)  # before generating: a large n takes a while
        log(f"generating MRL-like data: {n} x {dim} + {queries} queries")
        db, _ = mrl_like(n, dim, clusters=max(1, n // 100), seed=seed, out=_scratch(n, dim))
        q, _ = mrl_like(queries, dim, clusters=max(1, n // 100), seed=seed + 1)
        opts["tune_queries"] = mrl_like(500, dim, clusters=max(1, n // 100), seed=seed + 2)[0]
    else:
        # Cosine everywhere: L2-normalise at full size, so inner-product baselines (FAISS flat,
        # HNSW) rank by the same full-size cosine as the funnel's last stage.
        db, q = (_unit(np.asarray(a, np.float32)) for a in data)
        n, dim = db.shape
        if len(q) == 0:
            raise ValueError("the query embeddings hold no rows: nothing to benchmark")
        _check_size(n, dim, k)
    if nesting is None or data is None:
        nesting = Nesting.doubling(8, dim) if dim >= 8 else Nesting.full(dim)
    nesting.check_dim(dim, "the embeddings")
    # part: the main comparison, or the HNSW one (its own exact timing, N <= hnsw_n); records
    # of the two parts are told apart by it even when both run at the same N
    ctx = {"dataset": dataset, "n": n, "dim": dim, "queries": len(q), "k": k, "part": "main"}
    records = _main_part(db, q, nesting, k, target_recall, ctx, log, opts)
    hn = min(n, 100_000) if hnsw_n is None else min(int(hnsw_n), n)
    if hn > k:
        records += _hnsw_comparison(
            db[:hn], q, nesting, k, target_recall, ctx | {"n": hn, "part": "hnsw"}, log, opts
        )
    return records


def _check_size(n: int, dim: int, k: int) -> None:
    """The database [n, dim] is one the benchmark runs on (see `min_rows`)."""
    if n < min_rows(k):
        raise ValueError(f"the database needs at least {min_rows(k)} rows (more than k={k}, and "
                         f">= {MIN_ROWS} for the tuner's IVF-PQ), got n={n}")
    if dim < 16:  # the reference configuration shortlists at D_s = 16
        raise ValueError(f"dim must be >= 16 (the paper's funnel shortlists at 16 dims), got "
                         f"dim={dim}")


def _main_part(db, q, nesting, k, target_recall, ctx, log, opts) -> list[Record]:
    """Exact full-size search, the tuned funnel and the paper's funnel on db [N, D], q [Q, D]."""
    records: list[Record] = []
    n, dim = db.shape

    def add(method: str, prefix: int, row: dict[str, float], **extra: Any) -> None:
        for metric, value in row.items():
            records.append(make_record(method, prefix, metric, value, **ctx, **extra))

    def row(qps: float, recall: float, flops: float, memory: float) -> dict[str, float]:
        return {"qps": qps, f"recall@{k}": recall, "speedup_vs_exact": qps / exact_qps,
                "flops_per_query": flops, "memory_bytes": memory}  # fmt: skip

    truth, exact_s = _exact(db, q, k)
    exact_qps = len(q) / exact_s
    log(f"exact (FAISS flat IP, D={dim}): {exact_qps:.1f} queries/s")
    add("exact", dim, row(exact_qps, 1.0, 2.0 * n * dim, db.nbytes) | {"build_s": 0.0})
    fun = _funnel(db, q, truth, nesting, k, target_recall, log, **opts)
    cfg, qps = fun["config"], len(q) / fun["secs"]
    tuned = row(qps, fun["recall"], fun["flops"], fun["memory"]) | {"build_s": fun["build_s"]}
    add("funnel", cfg.shortlist_dim, tuned, config=cfg.to_dict(), tune_s=fun["tune_s"])
    log(
        f"funnel (tuned: {cfg.backend}, D_s={cfg.shortlist_dim}, K={cfg.shortlist}, "
        f"ef={cfg.ef_search}, nprobe={cfg.nprobe if cfg.backend in ('ivf', 'ivfpq') else None}, "
        f"stages={list(cfg.stages) or 'rerank at D'}): recall "
        f"{fun['recall']:.4f}, {qps:.0f} queries/s = {qps / exact_qps:.1f}x exact "
        f"(shortlist {fun['timings']['shortlist']:.2f}s, rerank {fun['timings']['rerank']:.2f}s)"
    )
    p = fun["paper"]
    pqps = len(q) / p["secs"]
    paper = row(pqps, p["recall"], p["flops"], p["memory"])
    add("funnel-paper", p["config"].shortlist_dim, paper, config=p["config"].to_dict())
    log(
        f"funnel-paper (flat D_s={p['config'].shortlist_dim}, K=200, rerank at D): recall "
        f"{p['recall']:.4f}, "
        f"{pqps:.0f} queries/s = {pqps / exact_qps:.1f}x exact"
    )
    return records


def _hnsw_comparison(db, q, nesting, k, target, ctx, log, opts) -> list[Record]:
    out: list[Record] = []
    n = len(db)
    truth, exact_s = _exact(db, q, k)
    exact_qps = len(q) / exact_s
    log(
        f"HNSW comparison at N={n}: exact {exact_qps:.1f} queries/s; building HNSW M=32 on "
        f"{db.shape[1]} dims..."
    )
    h = _hnsw_full(db, q, truth, k, target, log)
    hq = len(q) / h["secs"]
    # the issue's bar: faster at equal recall with at most half of HNSW's memory, so the funnel
    # is tuned under that budget (the fastest configuration within it, not a hand-picked one)
    budget = h["memory"] // 2
    f = _funnel(db, q, truth, nesting, k, target, lambda s: None, max_memory=budget,
                budget_fallback=True, **opts)  # fmt: skip
    if f["budget_error"]:  # e.g. float32 rerank vectors alone exceed the budget
        log(f"funnel within half of HNSW's memory: impossible here ({f['budget_error']}); "
            "the fastest without it")  # fmt: skip
        budget = None
    fq = len(q) / f["secs"]
    for method, prefix, row in (
        (
            "exact",
            db.shape[1],
            {
                "qps": exact_qps,
                f"recall@{k}": 1.0,
                "speedup_vs_exact": 1.0,
                "flops_per_query": 2.0 * n * db.shape[1],
                "memory_bytes": db.nbytes,
                "build_s": 0.0,
            },
        ),
        (
            "hnsw",
            db.shape[1],
            {
                "qps": hq,
                f"recall@{k}": h["recall"],
                "speedup_vs_exact": hq / exact_qps,
                "flops_per_query": h["flops"],
                "memory_bytes": h["memory"],
                "build_s": h["build_s"],
            },
        ),
        (
            "funnel",
            f["config"].shortlist_dim,
            {
                "qps": fq,
                f"recall@{k}": f["recall"],
                "speedup_vs_exact": fq / exact_qps,
                "flops_per_query": f["flops"],
                "memory_bytes": f["memory"],
                "build_s": f["build_s"],
            },
        ),
    ):
        extra = (
            {"ef_search": h["ef"]}
            if method == "hnsw"
            else ({"config": f["config"].to_dict()} if method == "funnel" else {})
        )
        for metric, value in row.items():
            out.append(make_record(method, prefix, metric, value, **ctx, **extra))
    log(
        f"at N={n}: funnel {fq:.0f} q/s (recall {f['recall']:.4f}, {f['memory'] / 2**20:.0f} MiB,"
        f" build {f['build_s']:.1f}s) vs HNSW {hq:.0f} q/s (recall {h['recall']:.4f}, "
        f"{h['memory'] / 2**20:.0f} MiB, build {h['build_s']:.1f}s): {fq / hq:.2f}x faster, "
        f"{f['memory'] / h['memory']:.2f}x memory, {f['build_s'] / h['build_s']:.2f}x build time"
        + (
            f" (funnel tuned within half of HNSW's memory, {budget / 2**20:.0f} MiB)"
            if budget
            else ""
        )
    )
    return out


def format_table(records: list[Record]) -> str:
    """One row per (part, n, method): prefix, recall, qps, speedup (against the exact search of
    the same part), FLOPs/query, memory, build."""
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    for r in records:
        key = (r.get("part", "main"), r["n"], r["method"])
        row = rows.setdefault(key, {"prefix": r["prefix"]})
        row[r["metric"].split("@")[0]] = r["value"]
    lines = [
        "| part | N | method | prefix | recall@k | queries/s | speedup | GFLOP/query | memory MiB "
        "| build s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (part, n, method), v in rows.items():

        def g(key: str, fmt: str, v: dict[str, Any] = v) -> str:
            return "" if v.get(key) is None else format(v[key], fmt)

        gflop = "" if v.get("flops_per_query") is None else f"{v['flops_per_query'] / 1e9:.4f}"
        mem = "" if v.get("memory_bytes") is None else f"{v['memory_bytes'] / 2**20:.0f}"
        lines.append(
            f"| {part} | {n} | {method} | {v['prefix']} | {g('recall', '.4f')} | {g('qps', '.1f')}"
            f" | {g('speedup_vs_exact', '.1f')}x | {gflop} | {mem} | {g('build_s', '.1f')} |"
        )
    return "\n".join(lines)
