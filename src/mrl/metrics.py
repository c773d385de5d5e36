"""Evaluation metrics as pure functions over numpy arrays: per query, then the mean.

Ranking metrics take what was retrieved, in rank order, as a relevance matrix ``rel [Q, K]``
(bool or 0/1 for labelled corpora, graded gains for qrels) plus what the ranking could have found
(``num_relevant [Q]``, or the query's judged gains for nDCG). This one input shape serves both:

- labelled corpora (relevant = same label): `label_relevance` builds ``rel`` and
  ``num_relevant`` from retrieved labels;
- qrels ``{query: {doc: gain}}``: `qrels_relevance` builds ``gains``, ``num_relevant`` and the
  ideal gains from retrieved indices.

Every ranking metric has ``reduce="mean"`` (a float) or ``reduce="none"`` (the [Q] per-query
values). A query with no relevant item scores 0 (as scikit-learn's ``ndcg_score`` does); drop
such queries beforehand if you prefer to skip them.

Shapes: Q queries, K retrieved per query (rank order, best first), k the cut-off (<= K).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mrl.arrays import as_numpy
from mrl.params import check_int, is_int

__all__ = [
    "accuracy",
    "check_label_kinds",
    "average_precision_at_k",
    "knn_accuracy",
    "knn_predict",
    "label_relevance",
    "map_at_k",
    "mrr",
    "ndcg_at_k",
    "precision_at_k",
    "qrels_relevance",
    "recall_at_k",
]

AP_NORMALIZE = ("min(k,R)", "k")


# ----------------------------------------------------------------------------- checks
def _array(x: Any, name: str, ndim: int) -> np.ndarray:
    a = as_numpy(x)  # a bfloat16 tensor too (numpy has no bfloat16: a TypeError)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {a.shape}")
    return a


def _rel(rel: Any, k: int | None, name: str = "relevance") -> tuple[np.ndarray, int]:
    """rel as float [Q, k] (first k columns) and k; validated."""
    r = _array(rel, name, 2)
    if r.dtype == bool:
        r = r.astype(np.float64)
    elif not np.issubdtype(r.dtype, np.number):
        raise ValueError(f"{name} must be numeric or bool, got dtype {r.dtype}")
    r = r.astype(np.float64)
    if not np.isfinite(r).all():
        raise ValueError(f"{name} must be finite, got {r[~np.isfinite(r)][0]}")
    if (r < 0).any():
        raise ValueError(f"{name} must be >= 0, got {r[r < 0][0]}")
    if k is None:
        k = r.shape[1]
    k = check_int(k, "k", minimum=1)
    if k > r.shape[1]:
        raise ValueError(
            f"k must be <= the number of retrieved items per query ({r.shape[1]}), got k={k}"
        )
    return r[:, :k], int(k)


def _num_relevant(num_relevant: Any, num_queries: int) -> np.ndarray:
    n = _array(num_relevant, "num_relevant", 1).astype(np.float64)
    if n.shape[0] != num_queries:
        raise ValueError(
            f"num_relevant must have one entry per query ({num_queries}), got {n.shape[0]}"
        )
    if (n < 0).any() or not np.isfinite(n).all():
        raise ValueError(
            f"num_relevant must be finite and >= 0, got {n[(n < 0) | ~np.isfinite(n)][0]}"
        )
    return n


def _check_hits(hits: np.ndarray, n: np.ndarray) -> None:
    """More relevant items retrieved than exist means rel and num_relevant disagree (a metric
    above 1 would be reported without this check)."""
    bad = np.flatnonzero(hits > n)
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"query {i} has {int(hits[i])} relevant items in its ranking but "
                         f"num_relevant[{i}] = {n[i]:g}; they must describe the same judgments")


def _reduce(per_query: np.ndarray, reduce: str) -> float | np.ndarray:
    if reduce == "mean":
        return float(per_query.mean())
    if reduce == "none":
        return per_query
    raise ValueError(f"reduce must be 'mean' or 'none', got reduce={reduce!r}")


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den == 0 (a query with nothing relevant scores 0)."""
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


# ----------------------------------------------------------------------------- classification
def accuracy(pred: Any, target: Any) -> float:
    """Fraction of ``pred [Q]`` equal to ``target [Q]``."""
    p, t = _array(pred, "pred", 1), _array(target, "target", 1)
    if p.shape != t.shape:
        raise ValueError(
            f"pred and target must have the same length, got {p.shape[0]} and {t.shape[0]}"
        )
    check_label_kinds(p, t, "pred", "target")
    return float((p == t).mean())


def check_label_kinds(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Labels compared for equality must be of one kind: the string '1' never equals the
    number 1 (nor b'a' the string 'a'), so mixed kinds scored 0 without a word."""
    kind_a, kind_b = _label_kind(a), _label_kind(b)
    if kind_a and kind_b and kind_a != kind_b:
        raise ValueError(f"{name_a} ({kind_a}, dtype {a.dtype}) and {name_b} ({kind_b}, dtype "
                         f"{b.dtype}) must be labels of one kind")


def _label_kind(a: np.ndarray) -> str | None:
    """"numbers", "strings" or "bytes"; an object array by its elements (None when they mix)."""
    kinds = {"b": "numbers", "i": "numbers", "u": "numbers", "f": "numbers", "U": "strings",
             "S": "bytes"}  # fmt: skip
    if a.dtype.kind != "O":
        return kinds.get(a.dtype.kind)
    found = {"numbers" if isinstance(v, (numbers.Number, np.number)) else
             "strings" if isinstance(v, str) else "bytes" if isinstance(v, bytes) else None
             for v in a.ravel().tolist()}  # fmt: skip
    return found.pop() if len(found) == 1 else None


def knn_predict(neighbor_labels: Any, k: int) -> np.ndarray:
    """Majority vote over the first ``k`` neighbour labels ``[Q, K]`` (nearest first) -> [Q].

    Ties between classes go to the class whose first occurrence is nearest, so k=1 is 1-NN and
    a tie never depends on label values.
    """
    lab = _array(neighbor_labels, "neighbor_labels", 2)
    k = check_int(k, "k", minimum=1)
    if k > lab.shape[1]:
        raise ValueError(f"k must be <= the number of neighbours given ({lab.shape[1]}), got k={k}")
    lab = lab[:, :k]
    votes = (lab[:, :, None] == lab[:, None, :]).sum(2)  # [Q, k]: votes for the label at each rank
    # argmax returns the first (nearest) rank among those with the most votes.
    best = votes.argmax(1)
    return lab[np.arange(lab.shape[0]), best]


def knn_accuracy(neighbor_labels: Any, query_labels: Any, k: int = 1) -> float:
    """k-NN accuracy: majority vote of the ``k`` nearest labels (`knn_predict`) vs the truth."""
    pred = knn_predict(neighbor_labels, k)
    t = _array(query_labels, "query_labels", 1)
    if t.shape[0] != pred.shape[0]:
        raise ValueError(
            f"query_labels must have one entry per query ({pred.shape[0]}), got {t.shape[0]}"
        )
    return accuracy(pred, t)


# ----------------------------------------------------------------------------- ranking
def precision_at_k(rel: Any, k: int | None = None, reduce: str = "mean") -> float | np.ndarray:
    """P@k = (number of relevant items in the top k) / k; rel > 0 counts as relevant."""
    r, k = _rel(rel, k)
    return _reduce((r > 0).sum(1) / k, reduce)


def recall_at_k(
    rel: Any, num_relevant: Any, k: int | None = None, reduce: str = "mean"
) -> float | np.ndarray:
    """R@k = (number of relevant items in the top k) / (number of relevant items R); 0 if R = 0."""
    r, k = _rel(rel, k)
    n = _num_relevant(num_relevant, r.shape[0])
    hits = (r > 0).sum(1).astype(np.float64)
    _check_hits(hits, n)
    return _reduce(_safe_div(hits, n), reduce)


def average_precision_at_k(
    rel: Any,
    num_relevant: Any = None,
    k: int | None = None,
    normalize: str = "min(k,R)",
) -> np.ndarray:
    """Per-query AP@k, [Q].

    ``AP@k = (1 / Z) * sum_{i=1..k} P@i * rel_i`` with ``rel_i`` in {0, 1} (rel > 0) and

    - ``normalize="min(k,R)"`` (standard): ``Z = min(k, R)``, R = ``num_relevant`` of the query,
      so a perfect ranking scores 1;
    - ``normalize="k"`` (the MRL paper's notebooks): ``Z = k``; lower whenever R < k.

    A query with R = 0 scores 0.
    """
    if normalize not in AP_NORMALIZE:
        raise ValueError(f"normalize must be one of {AP_NORMALIZE}, got normalize={normalize!r}")
    r, k = _rel(rel, k)
    hits = (r > 0).astype(np.float64)  # [Q, k]
    prec_at_i = hits.cumsum(1) / np.arange(1, k + 1)  # P@i, [Q, k]
    total = (prec_at_i * hits).sum(1)
    if normalize == "k":
        return total / k
    if num_relevant is None:
        raise ValueError("num_relevant is required for normalize='min(k,R)', got None")
    n = _num_relevant(num_relevant, r.shape[0])
    _check_hits(hits.sum(1), n)
    return _safe_div(total, np.minimum(n, k))


def map_at_k(
    rel: Any, num_relevant: Any = None, k: int | None = None, normalize: str = "min(k,R)"
) -> float:
    """mAP@k: the mean over queries of `average_precision_at_k` (same formula and options)."""
    return float(average_precision_at_k(rel, num_relevant, k, normalize).mean())


def _dcg(gains: np.ndarray) -> np.ndarray:
    """DCG of gains [Q, k] in rank order: sum_i g_i / log2(i + 1), i = 1..k (linear gain)."""
    discounts = 1.0 / np.log2(np.arange(2, gains.shape[1] + 2))
    return gains @ discounts


def _ideal(ideal_gains: Any, num_queries: int) -> list[np.ndarray]:
    if np.isscalar(ideal_gains) or getattr(ideal_gains, "ndim", None) == 0:  # ndcg_at_k(g, 3)
        raise ValueError(f"ideal_gains must hold one sequence of judged gains per query (k is "
                         f"the next argument), got ideal_gains={ideal_gains!r}")
    if isinstance(ideal_gains, np.ndarray) and ideal_gains.ndim == 2:
        rows = list(ideal_gains)
    else:
        rows = [np.asarray(g, dtype=np.float64).reshape(-1) for g in ideal_gains]
    if len(rows) != num_queries:
        raise ValueError(
            f"ideal_gains must have one entry per query ({num_queries}), got {len(rows)}"
        )
    for i, g in enumerate(rows):
        if g.size and (not np.isfinite(g).all() or (g < 0).any()):
            raise ValueError(f"ideal_gains[{i}] must be finite and >= 0, got {g.tolist()}")
    return rows


def ndcg_at_k(
    gains: Any, ideal_gains: Any, k: int | None = None, reduce: str = "mean"
) -> float | np.ndarray:
    """nDCG@k with graded relevance (linear gain, log2 discount, as scikit-learn's ndcg_score).

    ``DCG@k = sum_{i=1..k} g_i / log2(i + 1)`` over the retrieved items' gains ``gains [Q, K]``;
    ``IDCG@k`` is the DCG of the query's judged gains ``ideal_gains`` (one 1-D sequence per query,
    any length, or a zero-padded [Q, M] array) sorted in decreasing order and cut at k.
    nDCG = DCG / IDCG, 0 when IDCG = 0. For binary labels, ``ideal_gains[q]`` is R ones.
    """
    g, k = _rel(gains, k, "gains")
    ideal = _ideal(ideal_gains, g.shape[0])
    ideal_mat = np.zeros((g.shape[0], k))
    for i, row in enumerate(ideal):
        top = np.sort(row)[::-1][:k]
        ideal_mat[i, : top.size] = top
    dcg, idcg = _dcg(g), _dcg(ideal_mat)
    bad = np.flatnonzero(dcg > idcg * (1 + 1e-9) + 1e-12)
    if len(bad):  # nDCG > 1: the retrieved gains are not among the query's judged gains
        i = int(bad[0])
        raise ValueError(f"query {i}: the gains retrieved (DCG {dcg[i]:.4g}) exceed its "
                         f"ideal_gains (ideal DCG {idcg[i]:.4g}); they must come from the same "
                         "judgments")
    return _reduce(_safe_div(dcg, idcg), reduce)


def mrr(rel: Any, k: int | None = None, reduce: str = "mean") -> float | np.ndarray:
    """Mean reciprocal rank: 1 / (rank of the first relevant item in the top k), 0 if none."""
    r, k = _rel(rel, k)
    hit = r > 0
    first = hit.argmax(1)  # 0-based rank of the first hit (0 also when there is none)
    return _reduce(np.where(hit.any(1), 1.0 / (first + 1), 0.0), reduce)


# ----------------------------------------------------------------------------- input builders
def label_relevance(
    retrieved_labels: Any, query_labels: Any, db_labels: Any = None, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Relevance for labelled corpora: relevant = same label as the query.

    Args:
        retrieved_labels: [Q, K] labels of the retrieved items, rank order.
        query_labels: [Q].
        db_labels: [N] labels of the whole database, to count R per query (optional).
        exclude_self: the queries are database items that were excluded from their own results,
            so R is one less.

    Returns:
        (rel [Q, K] bool, num_relevant [Q] or None when ``db_labels`` is None).
    """
    lab = _array(retrieved_labels, "retrieved_labels", 2)
    ql = _array(query_labels, "query_labels", 1)
    if ql.shape[0] != lab.shape[0]:
        raise ValueError(
            f"query_labels must have one entry per query ({lab.shape[0]}), got {ql.shape[0]}"
        )
    check_label_kinds(lab, ql, "retrieved_labels", "query_labels")
    rel = lab == ql[:, None]
    if db_labels is None:
        return rel, None
    db = _array(db_labels, "db_labels", 1)
    check_label_kinds(db, ql, "db_labels", "query_labels")  # "1" vs 1: R was 0, AP 0
    classes, counts = np.unique(db, return_counts=True)
    pos = np.searchsorted(classes, ql).clip(0, len(classes) - 1)
    num = np.where(classes[pos] == ql, counts[pos], 0) - int(bool(exclude_self))
    return rel, np.maximum(num, 0)


def _check_qrels_keys(qrels: Any, ids: list) -> None:
    """Judgements keyed as the rows are (ids in ``qrels``, doc positions as ints): BEIR-style
    string ids matched nothing and every metric was 0 without a word."""
    if not isinstance(qrels, Mapping):
        raise ValueError(f"qrels must be a mapping {{query: {{doc: gain}}}}, got "
                         f"{type(qrels).__name__}")
    if ids and qrels and not any(q in qrels for q in ids):
        raise ValueError(f"no query id of the rows ({ids[:3]}...) is a key of qrels (keys "
                         f"{list(qrels)[:3]}...): pass query_ids as qrels is keyed")
    for q, judged in qrels.items():
        bad = [d for d in judged if not is_int(d)]
        if bad:
            raise ValueError(f"qrels[{q!r}] must be keyed by doc positions (ints, as in "
                             f"indices), got {bad[0]!r}; map document ids to positions first")
        negative = [d for d in judged if d < 0]
        if negative:  # -1 is the padding of indices: it would pick up this gain
            raise ValueError(f"qrels[{q!r}] doc positions must be >= 0, got {negative[0]!r}")


def _check_no_repeats(idx: np.ndarray) -> None:
    """Refuse a doc index listed twice in one ranking (ignoring negative padding)."""
    if idx.shape[1] < 2 or idx.dtype.kind not in "iuf":
        return
    srt = np.sort(idx, axis=1)
    rep = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)  # [Q, K-1]
    rows = np.flatnonzero(rep.any(1))
    if len(rows):
        i = int(rows[0])
        doc = int(srt[i, 1:][rep[i]][0])
        raise ValueError(f"indices row {i} lists doc {doc} more than once; a ranking must list "
                         "each document once (its gain would count twice)")


def qrels_relevance(
    indices: Any, qrels: Mapping[int, Mapping[int, float]], query_ids: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Relevance from graded judgements ``qrels = {query: {doc: gain}}`` (unjudged docs: gain 0).

    Args:
        indices: [Q, K] retrieved doc indices per query, rank order.
        qrels: judgements keyed by query id, then doc index.
        query_ids: the query id of each row of ``indices`` (default 0..Q-1).

    Returns:
        (gains [Q, K], num_relevant [Q] = number of docs with gain > 0, ideal_gains: per query the
        array of all its judged gains) -- the inputs of `ndcg_at_k`, `recall_at_k`, `mrr`.

    A doc index repeated within a row is refused (a ranking lists a document once; a repeat would
    count its gain twice in recall and nDCG); negative indices (-1 padding) are not compared.
    """
    idx = _array(indices, "indices", 2)
    if idx.dtype.kind not in "iu":  # 1.7 was read as doc 1
        raise ValueError(f"indices must be integer doc positions, got dtype {idx.dtype}")
    _check_no_repeats(idx)
    ids = list(range(idx.shape[0])) if query_ids is None else list(query_ids)
    if len(ids) != idx.shape[0]:
        raise ValueError(
            f"query_ids must have one entry per row of indices ({idx.shape[0]}), got {len(ids)}"
        )
    _check_qrels_keys(qrels, ids)
    gains = np.zeros(idx.shape, dtype=np.float64)
    num = np.zeros(idx.shape[0], dtype=np.float64)
    ideal = []
    for row, qid in enumerate(ids):
        judged = qrels.get(qid, {})
        gains[row] = [float(judged.get(int(d), 0.0)) for d in idx[row]]
        values = np.asarray(list(judged.values()), dtype=np.float64)
        num[row] = float((values > 0).sum())
        ideal.append(values)
    return gains, num, ideal
