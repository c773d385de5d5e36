"""Few-shot and long-tail classification at every prefix: nearest class mean (NCM).

For a prefix size m, the class mean of class c is the mean of the support embeddings' prefixes
``x[:m]`` of that class; a query is assigned the class whose mean has the highest cosine similarity
with the query's prefix (both re-normalised at m, as every truncated embedding must be). With
``center=True`` the mean of the support set is subtracted first (from support and queries).

Efficiency: the mean of prefixes is the prefix of the means (and so is the centre), so the class
means are computed once at full size D, ``[C, D]``. Scores at every prefix then come from one pass
over D: per chunk ``[m_{g-1}, m_g)`` a partial dot product ``[Q, C]`` and partial squared norms,
accumulated with a cumulative sum into ``[G, Q, C]`` dot products and ``[G, Q]``, ``[G, C]`` norms.
`ncm_scores_reference` slices every prefix separately and is the reference the tests compare with.

Protocols (seeded; several draws; the query set is fixed):

* few-shot: n examples per class (n in 1, 5, 10, ...) drawn from a labelled pool;
* long-tail: a random subset of "tail" classes gets n examples each, the other ("head") classes get
  ``head_shots`` each (or all they have); accuracy over all queries and over head / tail queries.

Records (`mrl.records`): metric ``ncm_{n}shot`` and ``lt{n}_all`` / ``lt{n}_head`` / ``lt{n}_tail``
(value = mean accuracy over draws; context ``std``, ``draws``, ``seed``, ``center``). One seeded
generator draws for every n in turn, so a record reproduces with the same ``seed`` *and* the same
list of shots (``shots=(5,)`` draws other 5-shot supports than ``shots=(1, 5)``).
Shapes: N pool, Q queries, D full dim, m prefix, G prefixes, C classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mrl.arrays import as_numpy
from mrl.nesting import Nesting
from mrl.params import check_flag, check_int, is_int
from mrl.records import Record, make_record
from mrl.similarity import prefix_scores

__all__ = [
    "class_means",
    "few_shot_eval",
    "long_tail_eval",
    "ncm_accuracy",
    "ncm_scores",
    "ncm_scores_reference",
    "sample_support",
]

_EPS = 1e-12


def _as_array(x: Any, name: str, ndim: int) -> np.ndarray:
    arr = as_numpy(x)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)}")
    return arr


def _check_xy(x: Any, y: Any, nesting: Nesting, name: str,
              labels_name: str | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Embeddings ``[N, D]`` (float64) and integer labels ``[N]`` (named ``labels_name``,
    default NAME_labels)."""
    lname = labels_name or f"{name}_labels"
    xs = _as_array(x, name, 2).astype(np.float64, copy=False)
    nesting.check_dim(xs.shape[1], name)
    bad = np.flatnonzero(~np.isfinite(xs).all(axis=1))
    if bad.size:
        raise ValueError(f"{name} must be finite, row {bad[0]} has NaN or inf")
    ys = _as_array(y, lname, 1)
    if ys.shape[0] != xs.shape[0]:
        raise ValueError(
            f"{lname} must have one label per row of {name} ({xs.shape[0]}), "
            f"got {ys.shape[0]}"
        )
    if not np.issubdtype(ys.dtype, np.integer):
        raise ValueError(f"{lname} must be non-negative integers, got dtype {ys.dtype}")
    if len(ys) and ys.min() < 0:  # the value, not the (integer) dtype
        raise ValueError(f"{lname} must be non-negative integers, got {int(ys.min())} "
                         f"(row {int(np.argmin(ys))})")
    return xs, ys.astype(np.int64, copy=False)


def class_means(x: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class mean rows ``[C, D]``; every class needs at least one example."""
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    if (counts == 0).any():
        raise ValueError(
            f"every class needs a support example, got none for classes "
            f"{np.flatnonzero(counts == 0).tolist()}"
        )
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, labels, x)  # [C, D]
    return sums / counts[:, None]


def ncm_scores(
    support: Any,
    support_labels: Any,
    queries: Any,
    nesting: Nesting,
    *,
    num_classes: int | None = None,
    center: bool = False,
) -> np.ndarray:
    """Cosine scores ``[G, Q, C]`` of every query against every class mean, at every prefix."""
    xs, ys = _check_xy(support, support_labels, nesting, "support")
    q = _as_array(queries, "queries", 2).astype(np.float64, copy=False)
    nesting.check_dim(q.shape[1], "queries")
    # 2.5 was truncated to 2, then a misleading label error
    C = int(ys.max()) + 1 if num_classes is None else check_int(num_classes, "num_classes", 1)
    if len(ys) and ys.max() >= C:
        raise ValueError(f"support_labels must be < num_classes={C}, got label {int(ys.max())}")
    if center:
        mu = xs.mean(axis=0)  # [D]; the prefix of the centre is the centre of the prefix
        xs, q = xs - mu, q - mu
    means = class_means(xs, ys, C)  # [C, D], once for all prefixes
    # Cosine at every prefix in one pass over D (chunk partial products + running norms).
    return prefix_scores(q, means, nesting, metric="cosine")  # [G, Q, C]


def ncm_scores_reference(
    support: Any,
    support_labels: Any,
    queries: Any,
    nesting: Nesting,
    *,
    num_classes: int | None = None,
    center: bool = False,
) -> np.ndarray:
    """Reference for `ncm_scores`: slice, centre, average and re-normalise each prefix apart."""
    xs, ys = _check_xy(support, support_labels, nesting, "support")
    q = np.asarray(queries, dtype=np.float64)
    C = int(ys.max()) + 1 if num_classes is None else int(num_classes)
    out = []
    for m in nesting.sizes:
        s, qm = xs[:, :m], q[:, :m]
        if center:
            mu = s.mean(axis=0)
            s, qm = s - mu, qm - mu
        means = np.stack([s[ys == c].mean(axis=0) for c in range(C)])  # [C, m]
        # norms clamped at _EPS, as `mrl.similarity` (and F.normalize) do: clamping at
        # sqrt(_EPS) = 1e-6 shrank the cosine of any prefix with a norm below 1e-6
        means = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), _EPS)
        qm = qm / np.maximum(np.linalg.norm(qm, axis=1, keepdims=True), _EPS)
        out.append(qm @ means.T)
    return np.stack(out)


def ncm_accuracy(scores: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """Accuracy per prefix ``[G]`` from scores ``[G, Q, C]``."""
    scores, labels = np.asarray(scores), np.asarray(query_labels)
    if scores.ndim != 3 or labels.shape != (scores.shape[1],):  # [1] broadcast: a wrong accuracy
        raise ValueError(f"query_labels must be [Q] for scores [G, Q, C], got shapes "
                         f"{labels.shape} and {scores.shape}")
    return (scores.argmax(axis=2) == labels[None, :]).mean(axis=1)


def sample_support(
    labels: np.ndarray, shots: dict[int, int | None], rng: np.random.Generator
) -> np.ndarray:
    """Indices into ``labels``: ``shots[c]`` examples of class c without replacement (None: all)."""
    picked = []
    for c, n in shots.items():
        idx = np.flatnonzero(labels == c)
        if n is None:
            picked.append(idx)
            continue
        if n > len(idx):
            raise ValueError(f"class {c} has {len(idx)} pool examples, fewer than shots={n}")
        picked.append(rng.choice(idx, size=n, replace=False))
    return np.concatenate(picked)


def _head(head_shots: int | None, available: int) -> int | None:
    """A head class's support: ``head_shots`` examples, or all it has when fewer (None: all)."""
    return None if head_shots is None or head_shots >= available else int(head_shots)


def _check_shots(shots: Any, draws: int, seed: int, name: str = "shots") -> tuple[int, ...]:
    """``shots`` as a tuple of positive ints (5.0 named its records ncm_5.0shot; 5 and NaN
    were bare TypeErrors); ``draws`` and ``seed`` (numpy's "expected non-negative integer"
    named nothing)."""
    if isinstance(shots, (str, bytes)) or not isinstance(shots, Sequence):
        raise ValueError(f"{name} must be a sequence of positive integers, got {name}={shots!r}")
    if not shots or any(not is_int(n) or n < 1 for n in shots):
        raise ValueError(f"{name} must be positive integers, got {list(shots)}")
    check_int(draws, "draws", minimum=1)  # 2.5 ran 2 draws and recorded 2
    check_int(seed, "seed", minimum=0)
    return tuple(int(n) for n in shots)


def _stat(accs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    a = np.stack(accs)  # [draws, G]
    std = a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1])
    return a.mean(axis=0), std


def few_shot_eval(
    pool: Any,
    pool_labels: Any,
    queries: Any,
    query_labels: Any,
    nesting: Nesting,
    *,
    shots: Sequence[int] = (1, 5, 10),
    draws: int = 5,
    seed: int = 0,
    center: bool = False,
    method: str = "mrl",
    **context: Any,
) -> list[Record]:
    """NCM accuracy with n support examples per class, mean over ``draws`` seeded draws."""
    shots = _check_shots(shots, draws, seed)
    center = check_flag(center, "center")  # "no" centred the data
    px, py = _check_xy(pool, pool_labels, nesting, "pool")
    qx, qy = _check_xy(queries, query_labels, nesting, "queries", "query_labels")
    absent = np.setdiff1d(qy, py)
    if absent.size:  # no support could ever be drawn for them
        raise ValueError(f"query_labels hold classes with no example in pool_labels: "
                         f"{absent[:10].tolist()}")
    classes, py, qy = _dense_labels(py, qy)
    C = len(classes)
    counts = np.bincount(py, minlength=C)  # checked here to name the class as given
    short = np.flatnonzero(counts < max(int(n) for n in shots))
    if len(short):
        c = int(short[0])
        raise ValueError(f"class {classes[c]} has {counts[c]} pool examples, fewer than "
                         f"shots={max(int(n) for n in shots)}")
    rng = np.random.default_rng(seed)
    records: list[Record] = []
    for n in shots:
        accs = []
        for _ in range(int(draws)):
            sup = sample_support(py, {c: int(n) for c in range(C)}, rng)
            s = ncm_scores(px[sup], py[sup], qx, nesting, num_classes=C, center=center)
            accs.append(ncm_accuracy(s, qy))
        ctx = dict(draws=int(draws), seed=seed, center=center, **context)
        records += _prefix_records(method, nesting, f"ncm_{n}shot", accs, ctx)
    return records


def _dense_labels(py: np.ndarray, qy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, pool labels, query labels) with the classes that occur numbered 0..C-1 in label
    order: labels that skip one (0, 2, 5) asked for supports of classes no data has. The
    identity for labels 0..C-1 that all occur (the same draws as before)."""
    classes = np.unique(np.concatenate([py, qy]))
    return classes, np.searchsorted(classes, py), np.searchsorted(classes, qy)


def _prefix_records(
    method: str, nesting: Nesting, metric: str, accs: list[np.ndarray], context: dict[str, Any]
) -> list[Record]:
    """One record per prefix: the mean over draws of ``accs`` (each [G]) with its std."""
    mean, std = _stat(accs)
    return [
        make_record(method, m, metric, mean[g], std=float(std[g]), **context)
        for g, m in enumerate(nesting.sizes)
    ]


def long_tail_eval(
    pool: Any,
    pool_labels: Any,
    queries: Any,
    query_labels: Any,
    nesting: Nesting,
    *,
    tail_shots: Sequence[int] = (1, 5),
    num_tail: int | None = None,
    head_shots: int | None = 100,
    draws: int = 5,
    seed: int = 0,
    center: bool = False,
    method: str = "mrl",
    **context: Any,
) -> list[Record]:
    """NCM with ``num_tail`` random tail classes (default half) of n examples each, the others
    up to ``head_shots`` (all they have when fewer; None: all). Accuracy over all, head and tail
    queries. Every class needs pool examples and a query; a tail class needs n pool examples."""
    tail_shots = _check_shots(tail_shots, draws, seed, "tail_shots")
    center = check_flag(center, "center")
    px, py = _check_xy(pool, pool_labels, nesting, "pool")
    qx, qy = _check_xy(queries, query_labels, nesting, "queries", "query_labels")
    classes, py, qy = _dense_labels(py, qy)
    C = len(classes)
    k = C // 2 if num_tail is None else check_int(num_tail, "num_tail")  # 1.5 became 1
    if head_shots is not None:  # True passed as one shot
        check_int(head_shots, "head_shots", minimum=1)
    no_query = np.flatnonzero(np.bincount(qy, minlength=C) == 0)
    if len(no_query):  # a tail or head part without queries would score NaN
        raise ValueError(
            f"every class needs at least one query for long-tail accuracy; classes "
            f"{classes[no_query[:10]].tolist()} have none"
        )
    if not 1 <= k < C:
        raise ValueError(f"num_tail must be in [1, {C - 1}] for {C} classes, got {num_tail}")
    counts = np.bincount(py, minlength=C)  # pool examples per class
    short = np.flatnonzero(counts < max(int(n) for n in tail_shots))
    if len(short):  # any class may be drawn into the tail
        c = int(short[0])
        raise ValueError(f"tail_shots={list(tail_shots)}: class {classes[c]} has only "
                         f"{counts[c]} pool examples (any class can be drawn as a tail class)")
    rng = np.random.default_rng(seed)
    records: list[Record] = []
    for n in tail_shots:
        parts: dict[str, list[np.ndarray]] = {"all": [], "head": [], "tail": []}
        for _ in range(int(draws)):
            tail = set(rng.choice(C, size=k, replace=False).tolist())
            plan = {c: int(n) if c in tail else _head(head_shots, counts[c]) for c in range(C)}
            sup = sample_support(py, plan, rng)
            s = ncm_scores(px[sup], py[sup], qx, nesting, num_classes=C, center=center)
            right = s.argmax(axis=2) == qy[None, :]  # [G, Q]
            is_tail = np.isin(qy, list(tail))
            parts["all"].append(right.mean(axis=1))
            parts["head"].append(right[:, ~is_tail].mean(axis=1))
            parts["tail"].append(right[:, is_tail].mean(axis=1))
        ctx = dict(draws=int(draws), seed=seed, center=center, num_tail=k,
                   head_shots=head_shots, **context)  # fmt: skip
        for part, accs in parts.items():
            records += _prefix_records(method, nesting, f"lt{n}_{part}", accs, ctx)
    return records
