"""Auto-tuning: the cheapest search configuration that meets a target recall@k.

Recall@k is measured against exact full-size search (cosine at D) on sample queries. Without
user queries, ``n_queries`` database rows are held out as queries: each one's own row is removed
from both the exact answer and the index's answer, so a query never finds itself.

Procedure (cheap first, measured last):

1. exact full-size top-k of the sample queries (the ground truth);
2. for every candidate shortlist prefix D_s: one exact shortlist scan at D_s gives, for every
   shortlist size K on the grid at once, the recall of "shortlist K at D_s, rerank at D" (a
   rerank at D of a superset of the true top-k returns exactly the true top-k);
   the smallest K on the grid that meets the target is kept;
3. for each kept (D_s, K): variants (flat scan; the paper's funnel of halving K / doubling the
   prefix; HNSW on the D_s prefix with growing efSearch; IVF on the D_s prefix with growing
   nprobe; IVF-PQ fast-scan on the D_s prefix with a 5-20x larger shortlist, re-scored exactly at
   D_s by the first funnel stage, with growing nprobe) are run for real; recall and queries per
   second are measured; the fastest one meeting the target wins and is stored with the index.
   IVF and HNSW structures are built only for the few (D_s, K) pairs with the fewest estimated
   FLOPs (each build is a pass over N).
"""

from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mrl.params import check_int, is_int
from mrl.retrieval.exact import exact_search
from mrl.retrieval.funnel.index import (
    IVF_BACKENDS,
    MatryoshkaIndex,
    SearchConfig,
    auto_nlist,
    funnel_stages,
    pq_subquantizers,
)

__all__ = [
    "MemoryBudgetError",
    "TuneResult",
    "tune",
    "recall_at_k",
    "held_out_queries",
    "flops_per_query",
    "margin_for",
]


class MemoryBudgetError(ValueError):
    """No configuration that reaches the target recall fits ``max_memory``.

    ``unbudgeted``: the fastest configuration that reaches the target without the budget (not
    applied to the index), so a caller can fall back to it without measuring everything again.
    """

    def __init__(self, message: str, unbudgeted: TuneResult | None = None) -> None:
        super().__init__(message)
        self.unbudgeted = unbudgeted


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / k for index arrays [Q, k] (order ignored)."""
    if found.shape[0] != truth.shape[0]:
        raise ValueError(
            f"found and truth must have the same number of queries, got "
            f"{found.shape[0]} and {truth.shape[0]}"
        )
    k = truth.shape[1]
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k)


def _drop_self(indices: np.ndarray, rows: np.ndarray | None, k: int) -> np.ndarray:
    # indices [Q, k+1] -> [Q, k] without the query's own row (else without the last).
    if rows is None:
        return indices[:, :k]
    out = np.full((len(indices), k), -1, indices.dtype)  # -1: nothing found in that slot
    for j, (ind, r) in enumerate(zip(indices, rows)):
        keep = ind[ind != r][:k]
        out[j, : len(keep)] = keep
    return out


def held_out_queries(index: MatryoshkaIndex, n: int, seed: int = 0):
    """``n`` random database rows as queries: (queries [n, D] float32, their rows [n])."""
    if n < 1:
        raise ValueError(f"n_queries must be >= 1, got n_queries={n}")
    rows = np.random.default_rng(seed).choice(index.count, size=min(n, index.count), replace=False)
    rows.sort()
    return index.vectors(rows), rows


def flops_per_query(
    n: int,
    cfg: SearchConfig,
    dim: int,
    k: int,
    hnsw_ndis: float | None = None,
    nlist: int | None = None,
) -> float:
    """Multiply-adds x 2 per query: the shortlist scan (N x D_s; HNSW distance count x D_s; IVF
    (nlist centroids + nprobe / nlist of N rows) x D_s) plus every rerank stage (candidates x
    prefix). IVF rows are counted as if the cells were equal-sized."""
    if cfg.backend == "hnsw" and hnsw_ndis is not None:
        total = 2.0 * hnsw_ndis * cfg.shortlist_dim
    elif cfg.backend in IVF_BACKENDS:
        cells = nlist or cfg.nlist or auto_nlist(n)
        rows = n * min(cfg.nprobe, cells) / cells
        # IVF-PQ: a row costs one table lookup-add per sub-vector, not D_s multiply-adds
        m = cfg.shortlist_dim
        per_row = pq_subquantizers(m) if cfg.backend == "ivfpq" else m
        total = 2.0 * (cells * cfg.shortlist_dim + rows * per_row)
    else:
        total = 2.0 * n * cfg.shortlist_dim
    cands = min(cfg.shortlist, n)
    for m, keep in cfg.stages or ((dim, k),):
        total += 2.0 * cands * m
        cands = min(keep, cands)
    return total


@dataclass
class TuneResult:
    """The chosen configuration, its measured recall@k and speed, and every measured candidate."""

    config: SearchConfig
    recall: float
    qps: float
    flops_per_query: float
    k: int
    target_recall: float
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "recall": self.recall,
            "qps": self.qps,
            "flops_per_query": self.flops_per_query,
            "k": self.k,
            "target_recall": self.target_recall,
            "candidates": self.candidates,
        }


def _shortlist_grid(k: int, n: int) -> list[int]:
    grid = (20, 30, 50, 75, 100, 150, 200, 300, 400, 600, 800, 1200, 1600, 3200, 6400)
    return sorted({min(g, n) for g in grid if g > k})


def margin_for(target: float, n_queries: int, k: int) -> float:
    """Safety margin: two binomial standard errors of a recall estimate over n_queries * k."""
    return min(0.5 * (1 - target), 2.0 * float(np.sqrt(target * (1 - target) / (n_queries * k))))


def _warn_small_sample(target: float, n_queries: int, k: int) -> None:
    """Where the margin's cap binds, two standard errors of the estimate exceed it: a tuning on
    20 queries at 0.99 reported recall 1.0 and gave 0.985 on fresh queries."""
    if target >= 1 or 2.0 * np.sqrt(target * (1 - target) / (n_queries * k)) <= 0.5 * (1 - target):
        return
    need = int(np.ceil(16 * target / (1 - target) / k))
    warnings.warn(f"tuning on {n_queries} queries cannot certify recall@{k} >= {target}: fresh "
                  f"queries may fall below it; use at least {need} queries (n_queries or "
                  "queries), or pass margin", stacklevel=3)


def tune(
    index: MatryoshkaIndex,
    target_recall: float = 0.99,
    *,
    k: int = 10,
    queries: np.ndarray | None = None,
    n_queries: int = 200,
    shortlist_dims: tuple[int, ...] | None = None,
    shortlists: tuple[int, ...] | None = None,
    backends: tuple[str, ...] = ("flat", "hnsw", "ivf", "ivfpq"),
    try_funnel: bool = True,
    max_hnsw: int = 2,
    max_ivf: int = 3,
    nprobes: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256, 512, 1024),
    margin: float | None = None,
    max_memory: int | None = None,
    apply: bool = True,
    seed: int = 0,
    reference: np.ndarray | None = None,
    centered: bool = False,
    log=None,
) -> TuneResult:
    """Pick the fastest configuration whose recall@k vs exact full-size search >= target_recall.

    Args:
        index: a filled `MatryoshkaIndex` (its current config supplies HNSW build parameters).
        target_recall: in (0, 1].
        queries: sample queries [Q, D]; None = ``n_queries`` held-out database rows.
        shortlist_dims: D_s candidates (default: nesting sizes <= min(D / 4, 256)).
        shortlists: K grid (default 20, 30, 50, ..., 6400, capped by N).
        backends: which shortlist backends to try ("flat", "numpy", "hnsw", "ivf", "ivfpq",
            "torch").
        try_funnel: also try a halving/doubling funnel (intermediate stages keep >= 2k).
        max_hnsw: HNSW graphs are built only for the ``max_hnsw`` smallest D_s whose shortlist
            is <= 100 (each graph costs a build over all N rows).
        max_ivf: IVFs and IVF-PQs (nlist from the index config, default 4 sqrt(N)) are built
            only for the ``max_ivf`` feasible (D_s, K) with the fewest estimated FLOPs per query.
        nprobes: the IVF nprobe grid, tried in order until the target is met.
        margin: the measured recall must reach target + margin, so the choice holds on unseen
            queries (default: two standard errors, `margin_for`).
        max_memory: a memory budget in bytes (`MatryoshkaIndex.memory_bytes` of the
            configuration: rerank vectors, norms, ids and the shortlist structure); only
            configurations within it are eligible. None = no budget.
        apply: store the choice as ``index.config`` and the report as ``index.tuned``, and drop
            the cached shortlist matrices and graphs the choice does not use.
        log: optional callable(str) for progress lines.
        reference: the original full-precision database [N, D] (row i = index row i). With
            int8/float16 rerank vectors, the exact answer (and held-out queries) then come from
            it, so the measured recall includes the quantisation error; without it, recall is
            measured against exact search over the stored (quantised) vectors.
        centered: ``queries`` and ``reference`` had the index's ``center`` subtracted already
            (as `MatryoshkaIndex.add` / `search` take it); by default they are raw, as given to
            ``add``, and tune centres them. Held-out rows are taken from the index as stored.
    """
    _check_tune_args(index, target_recall, k, max_memory, reference)
    _check_search_space(backends, nprobes, max_hnsw, max_ivf, margin, n_queries, seed)
    index._check_centered(centered)
    say = log or (lambda s: None)
    if reference is not None and index.center is not None and not centered:
        # into the index's space (a raw one on a centred index reported recall 0.05); only
        # then a float32 copy in memory: otherwise exact_search streams it (a memmap) by block
        reference = index._centred(np.asarray(reference, dtype=np.float32), False)
    trial = _ground_truth(index, k, queries, n_queries, seed, reference, centered, say)
    trial.need = min(
        1.0,
        target_recall
        + (margin_for(target_recall, len(trial.queries), k) if margin is None else margin),
    )
    if margin is None:
        _warn_small_sample(target_recall, len(trial.queries), k)
    nest, d = index.nesting, index.nesting.dim
    dims = (
        shortlist_dims or tuple(m for m in nest.sizes if m <= min(d // 4, 256)) or (nest.sizes[0],)
    )
    for m in dims:
        nest.index(m)
    grid = sorted(shortlists or _shortlist_grid(trial.kk, index.count))
    before = index._built()  # what the tuner builds is dropped again unless it is the choice
    try:
        feasible = _feasible_shortlists(trial, dims, grid)
        _measure_variants(trial, feasible, backends, try_funnel, max_hnsw, max_ivf, nprobes)
        result = _choose(trial, target_recall, max_memory)
    except BaseException:  # a failed tuning (no config within max_memory) kept every
        index._drop_built(before)  # candidate's graphs and IVFs: a save grew 2.5x
        raise
    if apply:
        index.config = result.config
        index.tuned = result.to_dict()
        index.release(result.config)
    else:
        index._drop_built(before)
    return result


@dataclass
class _Trial:
    """What every measurement of one tuning run shares: the sample queries [Q, D], their held-out
    rows (None for user queries), the exact top-k [Q, k], the recall to reach, and the list of
    measured candidates (grows as configurations are tried)."""

    index: MatryoshkaIndex
    queries: np.ndarray
    rows: np.ndarray | None
    truth: np.ndarray
    k: int
    say: Any
    need: float = 1.0
    candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kk(self) -> int:
        return self.k + 1 if self.rows is not None else self.k  # room to drop the query's row

    def measure(self, cfg: SearchConfig) -> dict[str, Any]:
        """Run ``cfg`` for real, record the result among the candidates and return it."""
        res = _measure(self.index, cfg, self.queries, self.rows, self.truth, self.k, self.say)
        self.candidates.append(res)
        return res


def _check_tune_args(index, target_recall, k, max_memory, reference) -> None:
    if not (isinstance(target_recall, (int, float)) and 0 < target_recall <= 1):
        raise ValueError(f"target_recall must be in (0, 1], got target_recall={target_recall!r}")
    if not is_int(k) or not 1 <= k < index.count:  # np.int64(10) was "got k=10" refused
        raise ValueError(f"k must be an int in [1, number of database items ({index.count})), "
                         f"got k={k!r}")
    if max_memory is not None and (not isinstance(max_memory, numbers.Real)
                                   or isinstance(max_memory, bool) or not max_memory > 0):
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    shape = (index.count, index.nesting.dim)
    if reference is not None and np.shape(reference) != shape:
        raise ValueError(f"reference must have shape {shape}, got {np.shape(reference)}")


def _check_search_space(backends, nprobes, max_hnsw, max_ivf, margin, n_queries, seed) -> None:
    """The tuner's own options, each named: "ivfpq" as a string was read by substring (plain
    IVF was tuned), a negative margin accepted recall below the target, an empty nprobes
    failed with an UnboundLocalError."""
    from mrl.retrieval.funnel.index import BACKENDS

    if isinstance(backends, str) or not backends or any(b not in BACKENDS for b in backends):
        raise ValueError(f"backends must be a non-empty sequence of {list(BACKENDS)}, got "
                         f"backends={backends!r}")
    if isinstance(nprobes, str) or not nprobes or any(not is_int(v) or v < 1 for v in nprobes):
        raise ValueError(f"nprobes must be a non-empty sequence of positive ints, got "
                         f"nprobes={nprobes!r}")
    check_int(max_hnsw, "max_hnsw", 0)
    check_int(max_ivf, "max_ivf", 0)
    check_int(n_queries, "n_queries", 1)
    check_int(seed, "seed", 0)
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, numbers.Real)
                               or not 0 <= margin < 1):  # NaN too
        raise ValueError(f"margin must be a recall in [0, 1) or None, got margin={margin!r}")


def _ground_truth(index, k, queries, n_queries, seed, reference, centered, say) -> _Trial:
    """Step 1: the sample queries and their exact full-size top-k (against ``reference`` when
    given, so that the quantisation of the stored vectors counts as error)."""
    rows = None
    if queries is None:
        queries, rows = held_out_queries(index, n_queries, seed)
        if reference is not None:
            queries = np.asarray(reference[rows], dtype=np.float32)
    else:  # user queries: into the index's space (minus its center, unless centered)
        queries = index._centred(index._check_queries(queries), centered)
    kk = k + 1 if rows is not None else k
    if reference is not None:
        _, truth = exact_search(reference, queries, kk, metric=index.metric)
    else:
        _, truth = exact_search(
            index._vectors, queries, kk, metric=index.metric, column_scale=index._col_scale
        )
    return _Trial(index, queries, rows, _drop_self(truth, rows, k), k, say)


def _feasible_shortlists(trial: _Trial, dims, grid: list[int]) -> list[tuple[int, int]]:
    """Step 2: for every D_s, the smallest K on the grid whose exact D_s shortlist holds enough
    of the true top-k (one scan per D_s serves the whole grid)."""
    index, n, feasible = trial.index, trial.index.count, []
    for m in dims:
        qm = index._norm_q(trial.queries, m)  # [Q, m] normalised prefix
        _, short = exact_search(index.shortlist_matrix(m), qm, min(max(grid), n), metric="dot")
        for kshort in grid:
            if kshort < trial.kk:
                continue
            r = recall_at_k_in(short[:, :kshort], trial.truth)
            if r >= trial.need:
                feasible.append((m, kshort))
                trial.say(f"D_s={m}: shortlist {kshort} reaches recall {r:.4f}")
                break
        else:
            trial.say(f"D_s={m}: no shortlist on the grid reaches {trial.need:.4f}")
            index._short.pop(m, None)  # free memory early (1M x 256 floats is 1 GB)
    return feasible


def _measure_variants(trial, feasible, backends, try_funnel, max_hnsw, max_ivf, nprobes) -> None:
    """Step 3: run the variants of every feasible (D_s, K) for real (into trial.candidates)."""
    index, kk = trial.index, trial.kk
    nest, d, n = index.nesting, index.nesting.dim, index.count
    base = replace(index.config, stages=())
    hnsw_dims = [m for m, kshort in feasible if kshort <= 100][:max_hnsw]
    ivf_dims = _cheapest_ivf(feasible, base, n, d, kk, nest, max_ivf) if "ivf" in backends else []
    # IVF-PQ multiplies the shortlist by 5-20: only where the exact scan's K is small
    small = [(m, kshort) for m, kshort in feasible if kshort <= 100]
    pq_dims = _cheapest_ivf(small, base, n, d, kk, nest, max_ivf) if "ivfpq" in backends else []
    exact_backend = next((b for b in ("flat", "numpy", "torch") if b in backends), None)
    for m, kshort in feasible:
        variants = []
        if exact_backend:
            variants.append(replace(base, backend=exact_backend, shortlist_dim=m, shortlist=kshort))
        if m in pq_dims:  # measured with its funnel, not re-run below
            _tune_ivfpq(trial, replace(base, shortlist_dim=m), kshort, nprobes)
        if m in ivf_dims:
            ivf = replace(base, backend="ivf", shortlist_dim=m)
            ivf = _tune_nprobe(trial, ivf, kshort, nprobes)
            variants += [ivf] if ivf is not None else []
        if "hnsw" in backends and m in hnsw_dims:
            variants += _tune_ef(trial, replace(base, backend="hnsw", shortlist_dim=m), kshort)
        st = funnel_stages(m, kshort, d, kk, nest, min_keep=2 * kk)
        funnel = try_funnel and len(st) > 1  # a one-stage "funnel" is the single rerank itself
        for cfg in variants:
            measured = cfg.backend in ("hnsw", "ivf")  # already measured while sweeping
            # a large K is measured as a funnel only; where there is none (D_s just below D),
            # the single rerank was measured by neither branch and the tuner found nothing
            if not measured and (kshort <= 400 or not funnel):
                trial.measure(cfg)
            if funnel:
                trial.measure(replace(cfg, stages=st))


def _tune_ef(trial: _Trial, base: SearchConfig, kshort: int) -> list[SearchConfig]:
    """HNSW with growing efSearch until the target is met: [that config], or [] if never."""
    for ef in (max(kshort, 32), max(2 * kshort, 64), max(4 * kshort, 128)):
        cfg = replace(base, shortlist=kshort, ef_search=ef)
        if trial.measure(cfg)["recall"] >= trial.need:
            return [cfg]
    return []


def _choose(trial: _Trial, target_recall: float, max_memory: int | None) -> TuneResult:
    """The fastest measured candidate reaching the target (within ``max_memory`` if given)."""
    k, candidates = trial.k, trial.candidates
    ok = [c for c in candidates if c["recall"] >= trial.need]
    if not candidates:  # "best 0.0000" said nothing measured, and larger K would not help
        raise ValueError(
            f"no configuration could be tried for target_recall={target_recall}: the backends "
            "given had no candidate (HNSW and IVF-PQ are tried only where a shortlist of <= 100 "
            "reaches the target); allow the flat or ivf backends, or a lower target"
        )
    if not ok:
        raise ValueError(
            f"no configuration reached target_recall={target_recall} (+ margin "
            f"{trial.need - target_recall:.4f}; best "
            f"{max(c['recall'] for c in candidates):.4f}); allow larger shortlists or shortlist "
            "dims (int8 rerank vectors cap recall near 0.98: use float16, or a lower target)"
        )
    if max_memory is not None:
        fits = [c for c in ok if c["memory_bytes"] <= max_memory]
        if not fits:
            least = min(c["memory_bytes"] for c in ok)
            raise MemoryBudgetError(
                f"no configuration reaching target_recall={target_recall} fits "
                f"max_memory={max_memory} bytes (the smallest that does needs {least}); "
                "allow more memory, or use float16/int8 rerank vectors",
                _fastest(ok, k, target_recall, candidates),
            )
        ok = fits
    return _fastest(ok, k, target_recall, candidates)


def _fastest(
    ok: list[dict[str, Any]], k: int, target_recall: float, candidates: list[dict[str, Any]]
) -> TuneResult:
    """The candidate with the most queries/s among ``ok`` (those reaching the target)."""
    best = max(ok, key=lambda c: c["qps"])
    return TuneResult(
        SearchConfig.from_dict(best["config"]),
        best["recall"],
        best["qps"],
        best["flops_per_query"],
        k,
        float(target_recall),
        candidates,
    )


def _cheapest_ivf(feasible, base, n, d, kk, nest, max_ivf: int) -> list[int]:
    """The D_s of the ``max_ivf`` feasible (D_s, K) with the fewest estimated FLOPs per query
    for an IVF shortlist (nprobe 16) and the funnel rerank."""

    def cost(pair: tuple[int, int]) -> float:
        m, kshort = pair
        cfg = replace(base, backend="ivf", shortlist_dim=m, shortlist=kshort, nprobe=16)
        cfg = replace(cfg, stages=funnel_stages(m, kshort, d, kk, nest, min_keep=2 * kk))
        return flops_per_query(n, cfg, d, kk)

    return [m for m, _ in sorted(feasible, key=cost)[: max(0, max_ivf)]]


def _tune_nprobe(trial: _Trial, base: SearchConfig, kshort: int, nprobes) -> SearchConfig | None:
    """The smallest nprobe on the grid whose single-rerank search reaches the target (each try
    is measured into the candidates); None when even nprobe = nlist falls short."""
    cfg = replace(base, shortlist=kshort)
    nlist = trial.index.ivf_nlist(cfg)
    for p in sorted({min(p, nlist) for p in nprobes}):
        if trial.measure(replace(cfg, nprobe=p))["recall"] >= trial.need:
            return replace(cfg, nprobe=p)
    return None


def _tune_ivfpq(trial: _Trial, base: SearchConfig, kshort: int, nprobes) -> None:
    """IVF-PQ on the D_s prefix: PQ scores are approximate, so the shortlist is 5-20x the exact
    scan's K and the first stage re-scores it exactly at D_s down to that K (>= 2k), then the
    paper's funnel. For each shortlist size, the smallest nprobe on the grid that reaches the
    target, stopping early once recall stops growing (each try measured into the candidates)."""
    index, kk = trial.index, trial.kk
    m, d, nest, n = base.shortlist_dim, index.nesting.dim, index.nesting, index.count
    nlist = index.ivf_nlist(replace(base, backend="ivfpq"))
    grid = sorted({min(p, nlist) for p in nprobes})
    for mult in (5, 10, 20):
        big = min(n, mult * kshort)
        keep = min(big, max(kshort, 2 * kk))
        stages = ((m, keep), *funnel_stages(m, keep, d, kk, nest, min_keep=2 * kk))
        # the exact re-score at D_s, then one rerank at D; the full funnel at the chosen nprobe
        rescore = ((m, keep), (d, kk)) if m < d else ((d, kk),)  # D_s = D: one exact re-score
        cfg = replace(base, backend="ivfpq", shortlist=big, stages=rescore)
        last = -1.0
        for p in grid:
            recall = trial.measure(replace(cfg, nprobe=p))["recall"]
            if recall >= trial.need or recall < last + 5e-4:  # met, or a plateau
                break
            last = recall
        if len(stages) > 2:
            trial.measure(replace(cfg, nprobe=p, stages=stages))
        if big == n:
            break


def recall_at_k_in(shortlist: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true top-k inside each row's shortlist [Q, K] (mean over queries)."""
    hits = [np.isin(t, s).sum() for s, t in zip(shortlist, truth)]
    return float(np.mean(hits) / truth.shape[1])


_WARMUP = 8  # queries searched untimed before a config is timed
_REPEATS = 3  # timed runs per config; the fastest counts


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds it took); `mrl.retrieval.bench` times with it too."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _measure(index, cfg, queries, rows, truth, k, say) -> dict[str, Any]:
    kk = k + 1 if rows is not None else k
    index.build(cfg)  # build time is not search time
    ndis = None
    # the trial's queries are in the index's space already (centred where it has a center)
    kwargs = dict(centered=index.center is not None, **cfg.to_dict() | {"stages": cfg.stages})
    index.search(queries[:_WARMUP], kk, **kwargs)  # untimed: a first search after a build is
    # slow (HNSW 12.7k vs 16k q/s); one timing per config picked by noise (choices varied 3 ways)
    if cfg.backend == "hnsw":
        faiss = __import__("faiss")
        faiss.cvar.hnsw_stats.reset()
    res, elapsed = timed(lambda: index.search(queries, kk, **kwargs))
    if cfg.backend == "hnsw":
        ndis = faiss.cvar.hnsw_stats.ndis / len(queries)
    for _ in range(_REPEATS - 1):  # the best of a few runs: a shared machine's noise is slower
        elapsed = min(elapsed, timed(lambda: index.search(queries, kk, **kwargs))[1])
    rec = recall_at_k(_drop_self(res.indices, rows, k), truth)
    out = {
        "config": cfg.to_dict(),
        "recall": rec,
        "qps": len(queries) / elapsed,
        "memory_bytes": index.memory_bytes(cfg),
        "flops_per_query": flops_per_query(
            index.count, cfg, index.nesting.dim, kk, ndis, index.ivf_nlist(cfg)
        ),
    }
    extra = f"nprobe={cfg.nprobe}/{index.ivf_nlist(cfg)}" if cfg.backend in IVF_BACKENDS else ""
    say(
        f"  {cfg.backend} D_s={cfg.shortlist_dim} K={cfg.shortlist} ef={cfg.ef_search} {extra} "
        f"stages={len(cfg.stages) or 1}: recall {rec:.4f}, {out['qps']:.0f} q/s"
    )
    return out
