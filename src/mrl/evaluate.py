"""Evaluate embeddings at every prefix of a nesting in one pass, with baselines, as tidy records.

Two settings:

- `evaluate_labelled`: a labelled database and labelled queries (image retrieval, 1-NN
  classification). Relevant = same label. Metrics ``"1nn"`` (the nearest neighbour's label is
  the query's), ``"map@k"`` (standard AP@k, divided by min(k, R); see `mrl.metrics`) and ``"p@k"``.
- `evaluate_ranking`: queries, documents and graded judgements ``qrels = {query: {doc: gain}}``
  (text retrieval). Metrics ``"ndcg@k"`` and ``"recall@k"`` for every k in ``ks``, and ``"mrr"``
  (reciprocal rank of the first relevant doc within the top ``max(ks)``).

Both run `mrl.similarity.prefix_topk` once per method (all prefixes in one pass over D) and return
records made with `mrl.records.make_record`:
``{"method", "prefix", "metric", "value", ...context}``.
Baselines are evaluated in the same call on the same data: ``"pca"`` (PCA fitted on the database,
project then truncate), ``"pca_uncentered"`` and ``"random"`` (a seeded random coordinate subset).

Example:
    >>> recs = evaluate_labelled(db, db_y, q, q_y, Nesting.doubling(8, 2048),
    ...                          baselines=("pca", "random"), center=True)
    >>> print(mrl.records.to_markdown(recs, metric="1nn"))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mrl.arrays import torch_shareable
from mrl.baselines import PCA, random_permutation
from mrl.metrics import (
    accuracy,
    check_label_kinds,
    label_relevance,
    map_at_k,
    mrr,
    ndcg_at_k,
    precision_at_k,
    qrels_relevance,
    recall_at_k,
)
from mrl.nesting import Nesting
from mrl.params import check_flag, is_int
from mrl.records import Record, make_record
from mrl.similarity import as_nesting, check_finite, prefix_topk

__all__ = ["BASELINES", "evaluate_labelled", "evaluate_ranking"]

BASELINES = ("pca", "pca_uncentered", "random")


# ----------------------------------------------------------------------------- input checks
def _embeddings(x: Any, name: str) -> torch.Tensor:
    """A finite, non-empty, floating [rows, D] tensor (numpy arrays are shared, not copied)."""
    t = torch.from_numpy(torch_shareable(x)) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    t = t if t.is_floating_point() else t.float()
    check_finite(t, name)
    return t


def _labels(y: Any, name: str, rows: int, rows_name: str) -> np.ndarray:
    a = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.shape[0] != rows:
        raise ValueError(
            f"{name} must have one label per row of {rows_name} ({rows}), got {a.shape[0]}"
        )
    return a


def _same_dim(db: torch.Tensor, queries: torch.Tensor, db_name: str) -> None:
    if db.shape[1] != queries.shape[1]:
        raise ValueError(
            f"queries and {db_name} must have the same dimension, got queries "
            f"{tuple(queries.shape)} and {db_name} {tuple(db.shape)}"
        )


def _check_baselines(baselines: Sequence[str]) -> tuple[str, ...]:
    baselines = (baselines,) if isinstance(baselines, str) else tuple(baselines)
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"baselines must be among {BASELINES}, got {b!r}")
    return baselines


def _center_dtype(db: torch.Tensor) -> torch.dtype:
    """The centre's dtype: float32 at least, as the scores (`mrl.similarity`). A float16 mean of
    a float16 database is rounded to float16 (half a unit in the last place of the mean: at an
    offset of 1000 that is up to 0.25, more than the spread of the data)."""
    return torch.promote_types(db.dtype, torch.float32)


def _mean(db: torch.Tensor) -> torch.Tensor:
    """The database mean [D], accumulated and kept in float32 at least."""
    return db.mean(0, dtype=_center_dtype(db))


def _center_vector(center: Any, db: torch.Tensor) -> torch.Tensor | None:
    """False/None -> None; True -> database mean; a [D] vector -> itself (float32 at least)."""
    if isinstance(center, np.bool_):  # numpy's True / False, as Python's
        center = bool(center)
    if center is None or center is False:
        return None
    if center is True:
        return _mean(db)
    if isinstance(center, (str, bytes)):  # "mean" was a bare torch TypeError
        raise ValueError(
            f"center must be a [{db.shape[1]}] vector, True or None, got center={center!r}"
        )
    c = torch.as_tensor(np.asarray(center) if not isinstance(center, torch.Tensor) else center)
    c = c.detach().to(_center_dtype(db)).reshape(-1)  # a model output's mean: not tracked
    if c.shape[0] != db.shape[1]:
        raise ValueError(
            f"center must have one entry per dimension ({db.shape[1]}), got {c.shape[0]}"
        )
    return c


# ----------------------------------------------------------------------------- methods
def _variants(
    method: str,
    db: torch.Tensor,
    queries: torch.Tensor,
    center: Any,
    baselines: tuple[str, ...],
    seed: int,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(method name, db [N, D], queries [Q, D], centre [D] | None) for the embedding and baselines.

    Baselines transform the database and queries (and an explicit centre) the same way, so their
    prefixes are evaluated exactly like the embedding's.
    """
    c = _center_vector(center, db)
    yield method, db, queries, c
    for name in baselines:
        if name == "random":
            perm = torch.from_numpy(random_permutation(db.shape[1], seed))
            tf = lambda x, p=perm: x[:, p]  # noqa: E731 - a one-line transform
        else:
            pca = PCA(centered=(name == "pca"), seed=seed).fit(db)
            tf = pca.transform
        dbv = tf(db)
        cv = None if c is None else (_mean(dbv) if center is True else tf(c[None])[0])
        yield name, dbv, tf(queries), cv


def _context(k: int | None, n_db: int, n_queries: int, seed: int, context: Any) -> dict:
    ctx = {"n_db": n_db, "n_queries": n_queries, "seed": seed}
    if k is not None:
        ctx["k"] = k
    ctx.update(dict(context or {}))
    return ctx


def evaluate_labelled(
    db: Any,
    db_labels: Any,
    queries: Any,
    query_labels: Any,
    nesting: Nesting | str | Sequence[int],
    *,
    method: str = "mrl",
    k: int = 10,
    center: Any = False,
    baselines: Sequence[str] = (),
    seed: int = 0,
    exclude_self: bool = False,
    context: Mapping[str, Any] | None = None,
    metric: str = "cosine",
    tile_size: int = 4096,
) -> list[Record]:
    """1-NN accuracy, mAP@k and P@k at every prefix (relevant = same label), one pass per method.

    Args:
        db: [N, D] database embeddings; db_labels: [N] labels (any comparable values).
        queries: [Q, D]; query_labels: [Q].
        nesting: prefix sizes (largest <= D).
        method: the name recorded for these embeddings.
        k: cut-off of mAP@k and P@k (<= N).
        center: False, True (subtract the database mean from both sides first; strongly helps
            cosine search on non-negative post-ReLU features) or a [D] vector.
        baselines: any of ``"pca"``, ``"pca_uncentered"``, ``"random"`` (seeded by ``seed``).
        exclude_self: queries are the database itself (same rows, Q = N): each query skips its
            own row (leave-one-out), and R counts one less.
        context: extra keys added to every record (e.g. ``{"dataset": "cifar10"}``).
        metric: ``"cosine"`` (each prefix re-normalised) or ``"dot"``.

    Returns:
        records with metrics ``"1nn"``, ``f"map@{k}"``, ``f"p@{k}"`` for every (method, prefix);
        context keys ``k``, ``n_db``, ``n_queries``, ``seed`` plus ``context``.
    """
    x, qs = _embeddings(db, "db"), _embeddings(queries, "queries")
    _same_dim(x, qs, "db")
    ydb = _labels(db_labels, "db_labels", x.shape[0], "db")
    yq = _labels(query_labels, "query_labels", qs.shape[0], "queries")
    check_label_kinds(ydb, yq, "db_labels", "query_labels")  # before the search, not after
    n = as_nesting(nesting, x.shape[1])
    exclude = None
    if check_flag(exclude_self, "exclude_self"):  # "no" was truthy
        if qs.shape != x.shape:
            raise ValueError(
                f"exclude_self needs the queries to be the database rows, got queries "
                f"{tuple(qs.shape)} and db {tuple(x.shape)}"
            )
        exclude = torch.arange(qs.shape[0], device=qs.device)
    ctx = _context(k, x.shape[0], qs.shape[0], seed, context)
    records: list[Record] = []
    for name, dbv, qv, c in _variants(method, x, qs, center, _check_baselines(baselines), seed):
        _, idx = prefix_topk(qv, dbv, n, k, metric, tile_size=tile_size, center=c, exclude=exclude)
        for g, m in enumerate(n.sizes):
            got = ydb[idx[g].cpu().numpy()]  # [Q, k] labels of the retrieved items
            rel, num_rel = label_relevance(got, yq, ydb, exclude_self=exclude_self)
            records += [
                make_record(name, m, "1nn", accuracy(got[:, 0], yq), **ctx),
                make_record(name, m, f"map@{k}", map_at_k(rel, num_rel, k), **ctx),
                make_record(name, m, f"p@{k}", precision_at_k(rel, k), **ctx),
            ]
    return records


def _not_number(x: Any) -> bool:
    """Not a real number (a string or None gave a bare numpy TypeError)."""
    return isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer,
                                                                  np.floating))


def _check_qrels(qrels: Any, num_queries: int, num_docs: int) -> list[int]:
    """Validate ``{query: {doc: gain}}``; returns the judged query indices, sorted."""
    if not isinstance(qrels, Mapping) or len(qrels) == 0:
        raise ValueError(
            f"qrels must be a non-empty mapping {{query: {{doc: gain}}}}, got {qrels!r}"
        )
    for qid, judged in qrels.items():
        if not is_int(qid) or not 0 <= qid < num_queries:
            raise ValueError(f"qrels query index must be in [0, {num_queries}), got {qid!r}")
        if not isinstance(judged, Mapping):
            raise ValueError(f"qrels[{qid}] must be a mapping {{doc: gain}}, got {judged!r}")
        for doc, gain in judged.items():
            if not is_int(doc) or not 0 <= doc < num_docs:
                raise ValueError(f"qrels[{qid}] doc index must be in [0, {num_docs}), got {doc!r}")
            if _not_number(gain) or not np.isfinite(gain) or gain < 0:
                raise ValueError(f"qrels[{qid}][{doc}] gain must be finite and >= 0, got {gain!r}")
    return sorted(int(q) for q in qrels)


def evaluate_ranking(
    queries: Any,
    docs: Any,
    qrels: Mapping[int, Mapping[int, float]],
    nesting: Nesting | str | Sequence[int],
    *,
    method: str = "mrl",
    ks: Sequence[int] = (10, 100),
    center: Any = False,
    baselines: Sequence[str] = (),
    seed: int = 0,
    context: Mapping[str, Any] | None = None,
    metric: str = "cosine",
    tile_size: int = 4096,
) -> list[Record]:
    """nDCG@k, recall@k (every k in ``ks``) and MRR at every prefix, from graded judgements.

    Args:
        queries: [Q, D]; docs: [N, D].
        qrels: ``{query_index: {doc_index: gain}}`` (gain >= 0; > 0 is relevant; unjudged docs
            have gain 0). Only the queries present in qrels are evaluated, as trec_eval does.
        ks: cut-offs; the largest (<= N) is how many docs are retrieved per query.
        Others: as in `evaluate_labelled`.

    Returns:
        records with metrics ``f"ndcg@{k}"`` and ``f"recall@{k}"`` for each k in ``ks``, and
        ``"mrr"`` (within the top ``max(ks)``); context ``n_db``, ``n_queries`` (judged queries),
        ``seed`` plus ``context``.
    """
    qs, x = _embeddings(queries, "queries"), _embeddings(docs, "docs")
    _same_dim(x, qs, "docs")
    ks = tuple(ks)
    if not ks or any(
        not is_int(k) or k < 1 for k in ks
    ):
        raise ValueError(f"ks must be positive integers, got ks={ks!r}")
    kmax = max(ks)
    if kmax > x.shape[0]:
        raise ValueError(f"ks must be <= number of docs ({x.shape[0]}), got k={kmax}")
    n = as_nesting(nesting, x.shape[1])
    judged = _check_qrels(qrels, qs.shape[0], x.shape[0])
    qsel = qs[torch.tensor(judged)]
    ctx = _context(None, x.shape[0], len(judged), seed, context)
    records: list[Record] = []
    for name, dbv, qv, c in _variants(method, x, qsel, center, _check_baselines(baselines), seed):
        _, idx = prefix_topk(qv, dbv, n, kmax, metric, tile_size=tile_size, center=c)
        for g, m in enumerate(n.sizes):
            gains, num_rel, ideal = qrels_relevance(idx[g].cpu().numpy(), qrels, judged)
            for k in ks:
                records.append(make_record(name, m, f"ndcg@{k}", ndcg_at_k(gains, ideal, k), **ctx))
                records.append(
                    make_record(name, m, f"recall@{k}", recall_at_k(gains, num_rel, k), **ctx)
                )
            records.append(make_record(name, m, "mrr", mrr(gains, kmax), **ctx))
    return records
