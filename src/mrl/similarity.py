"""Similarity scores at every prefix of a Matryoshka embedding, in one pass over D.

The score of query q and item x at prefix m is ``<q[:m], x[:m]>`` (``metric="dot"``) or
``<q[:m], x[:m]> / (|q[:m]| |x[:m]|)`` (``metric="cosine"``; each prefix is *re-normalised*, which
is not the same as truncating unit-norm full-size vectors). Scoring G prefixes one by one costs
``sum(m) / D`` full-size products (about 2x for doubling nestings). Instead we split D into the
chunks between consecutive prefix sizes, ``[m_{g-1}, m_g)``, and accumulate

    S_g = S_{g-1} + q[:, m_{g-1}:m_g] @ x[:, m_{g-1}:m_g].T        (in place: one addmm per chunk)
    |x[:m_g]|^2 = cumsum_g |x[:, m_{g-1}:m_g]|^2                       (running squared norms)

so all G prefixes cost one full-size matrix product plus G cheap elementwise passes.
`prefix_topk` tiles this over the items (and over the queries), merging a running top-k per
prefix, so memory stays ``O(Q_block * tile_size)`` however large N is; ``Q x N x G`` is never held.

Inputs may be torch tensors or numpy arrays; outputs are the same kind as ``queries``. Scores
are computed in float32 at least (float16/bfloat16 inputs are converted tile by tile), on the
inputs' device, and never tracked by autograd.
`prefix_scores_reference` / `prefix_topk_reference` are the plain per-prefix loops the fast
paths are tested against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mrl.arrays import torch_shareable
from mrl.nesting import Nesting
from mrl.params import check_int

__all__ = [
    "as_nesting",
    "prefix_scores",
    "prefix_scores_reference",
    "prefix_topk",
    "prefix_topk_reference",
]

METRICS = ("cosine", "dot")
_EPS = 1e-12  # norms below this count as zero (as in F.normalize): a zero vector scores 0


# ----------------------------------------------------------------------------- validation
def as_nesting(nesting: Nesting | str | Sequence[int], dim: int) -> Nesting:
    """A `Nesting` whose largest prefix fits an embedding of size ``dim``.

    A nesting ending below ``dim`` is allowed (only the first ``nesting.dim`` columns are read);
    one ending above ``dim`` is an error.
    """
    if isinstance(nesting, str):
        text = nesting.strip()
        if text.startswith("doubling:") or text == "full":
            return Nesting.parse(text, dim=dim)
    n = Nesting.parse(nesting)
    if n.dim > dim:
        raise ValueError(
            f"nesting prefix {n.dim} is larger than the embedding dimension {dim} "
            f"(nesting {list(n.sizes)})"
        )
    return n


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    """A 2-D floating tensor (numpy arrays are shared, not copied)."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(torch_shareable(x))
    elif isinstance(x, torch.Tensor):
        t = x
    else:
        raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if t.is_complex():  # the cast below would drop the imaginary part with only a warning
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.float()
    return t.detach()  # scores are for ranking: never part of an autograd graph


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise naming the first non-finite entry (NaN/inf would silently poison a ranking)."""
    # Fast path: one reduction pass, no [rows, dim] temporary. NaN/inf propagate into the sum; a
    # non-finite sum of finite values (overflow) falls through to the exact check.
    if bool(torch.isfinite(t.sum())):
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must be finite, got {t[pos].item()} at index {pos}")


def _prepare(
    queries: Any,
    items: Any,
    nesting: Nesting | str | Sequence[int],
    metric: str,
    center: Any,
) -> tuple[torch.Tensor, torch.Tensor, Nesting, torch.Tensor | None, bool]:
    """Validate and convert; returns (q [Q,Dn], items [N,Dn], nesting, center [Dn]|None, numpy?)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got metric={metric!r}")
    as_numpy = isinstance(queries, np.ndarray)
    q = _to_tensor(queries, "queries")
    x = _to_tensor(items, "items")
    if q.shape[1] != x.shape[1]:
        raise ValueError(
            f"queries and items must have the same dimension, got queries {tuple(q.shape)} "
            f"and items {tuple(x.shape)}"
        )
    if q.device != x.device:
        raise ValueError(f"queries and items must be on one device, got {q.device} and {x.device}")
    n = as_nesting(nesting, q.shape[1])
    # Scores are accumulated in float32 at least: float16/bfloat16 sums of squares overflow
    # (|x|^2 > 65504) or lose the digits that order near-ties. Items keep their storage dtype
    # here (a float16 database is not copied whole); callers convert tile by tile.
    dtype = torch.promote_types(torch.promote_types(q.dtype, x.dtype), torch.float32)
    d = q.shape[1]  # the full width, before the nesting's prefix is cut
    q, x = q[:, : n.dim].to(dtype), x[:, : n.dim]
    check_finite(q, "queries")
    check_finite(x, "items")
    return q, x, n, _center(center, x, d, n.dim, dtype), as_numpy


def _center(
    center: Any, x: torch.Tensor, d: int, dim: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """The centre [dim] in ``dtype``: None/False = none; True = the items' mean (as in
    `mrl.evaluate.evaluate_labelled`); else a [d] vector (one entry per input dimension)."""
    if center is None or center is False:
        return None
    if center is True:  # summed in dtype: no float32 copy of a float16 database
        return x.sum(0, dtype=dtype) / x.shape[0]
    if isinstance(center, (bool, np.bool_, str, bytes)):  # "mean" was a torch dtype error
        raise ValueError(f"center must be a [{d}] vector, True or None, got center={center!r}")
    # detached: a center computed from a model's output (db.mean(0)) made cosine scoring fail
    # ("out= arguments don't support automatic differentiation") and dot scores tracked
    c = torch.as_tensor(center).detach().to(dtype=dtype, device=x.device).reshape(-1)
    if c.shape[0] != d:
        raise ValueError(
            f"center must have one entry per dimension ({d}), got shape {tuple(c.shape)}"
        )
    c = c[:dim]
    check_finite(c, "center")
    return c


def _out(t: torch.Tensor, as_numpy: bool) -> Any:
    return t.numpy() if as_numpy else t


def _check_overflow(values: torch.Tensor) -> None:
    """Finite inputs can still overflow the scoring dtype (float32: a squared norm or a product
    above 3.4e38, entries around 1e19): cosines of 0 or NaN, or -inf scores that tie with the
    excluded items and the padding of the running top-k, so that index -1 came back. Refuse."""
    # two reductions, no bool tensor the size of values (a [G, Q, N] result doubled the time
    # of prefix_scores); NaN propagates into both, -inf / inf into one of them
    if values.numel() and not bool(torch.isfinite(values.amax()) & torch.isfinite(values.amin())):
        raise ValueError(
            f"scores overflow {values.dtype} (inputs too large in magnitude for their dtype): "
            "rescale the embeddings or pass float64"
        )


# ----------------------------------------------------------------------------- fast path
def _chunk_sq_norms(x: torch.Tensor, nesting: Nesting) -> torch.Tensor:
    """Squared norms of every prefix, [G, rows], from per-chunk sums and a cumulative sum."""
    # One elementwise pass, then per-chunk sums as a thin product with a 0/1 chunk indicator.
    ind = torch.zeros(x.shape[1], len(nesting), dtype=x.dtype, device=x.device)  # [D, G]
    for g, (a, b) in enumerate(nesting.chunks):
        ind[a:b, g] = 1
    return (x.square() @ ind).T.cumsum(0)  # [G, rows]


def _inv_norms(sq: torch.Tensor) -> torch.Tensor:
    _check_overflow(sq)  # an infinite norm would give a cosine of 0 (or NaN) without a word
    return sq.sqrt().clamp_min(_EPS).reciprocal()


def _item_inv_norms(
    x: torch.Tensor, nesting: Nesting, center: torch.Tensor | None, tile_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """1 / |x[:m] - c[:m]| for every prefix and item, [G, N], computed tile by tile in ``dtype``
    (the scoring dtype: float32 at least, float64 when either side is)."""
    parts = []
    for t0 in range(0, x.shape[0], tile_size):
        xt = x[t0 : t0 + tile_size].to(dtype)
        parts.append(_chunk_sq_norms(xt if center is None else xt - center, nesting))
    return _inv_norms(torch.cat(parts, 1))


def _iter_prefix_scores(
    q: torch.Tensor,
    x: torch.Tensor,
    nesting: Nesting,
    inv_x: torch.Tensor | None,
    buf: torch.Tensor | None = None,
    acc: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (g, scores [Q,T]) for g = 0..G-1; ``inv_x`` [G, T] = 1/|x_m| for cosine, None for dot.

    For cosine the yielded scores are ``<q_m, x_m> / |x_m|``: dividing by the query norm does not
    change a query's ranking, so callers apply it to the k survivors only. The yielded tensor is a
    reused buffer: copy it if you keep it.
    """
    if acc is None:
        acc = torch.empty(q.shape[0], x.shape[0], dtype=q.dtype, device=q.device)  # S_g [Q, T]
    out = buf
    for g, (a, b) in enumerate(nesting.chunks):
        # S_g = S_{g-1} + chunk partial product, in place; beta=0 ignores acc's old content
        acc.addmm_(q[:, a:b], x[:, a:b].T, beta=0 if g == 0 else 1)
        if inv_x is None:
            yield g, acc
        else:
            out = torch.mul(acc, inv_x[g], out=out)  # [Q, T] * [T]
            yield g, out


def prefix_scores(
    queries: Any,
    items: Any,
    nesting: Nesting | str | Sequence[int],
    metric: str = "cosine",
    center: Any = None,
) -> Any:
    """Scores between every query and item at every prefix, one pass over D.

    Args:
        queries: [Q, D] tensor or array.
        items: [N, D] tensor or array (same D).
        nesting: the prefix sizes (a `Nesting`, a list of ints, or ``"doubling:8"``); its largest
            prefix must be <= D.
        metric: ``"cosine"`` (each prefix re-normalised) or ``"dot"``.
        center: optional [D] vector subtracted from queries and items first (e.g. the database
            mean: non-negative post-ReLU features search much better centred); True = the
            items' mean.

    Returns:
        [G, Q, N] scores, the same kind (tensor/array) as ``queries``. Holds G*Q*N numbers: for
        large corpora use `prefix_topk`.
    """
    q, x, n, c, as_numpy = _prepare(queries, items, nesting, metric, center)
    x = x.to(q.dtype)  # [G, Q, N] is materialised anyway: a float32 copy of the items is cheap
    if c is not None:
        q, x = q - c, x - c
    out = torch.empty(len(n), q.shape[0], x.shape[0], dtype=q.dtype, device=q.device)
    inv_x = _inv_norms(_chunk_sq_norms(x, n)) if metric == "cosine" else None  # [G, N]
    for g, s in _iter_prefix_scores(q, x, n, inv_x):
        out[g] = s
    if metric == "cosine":
        out *= _inv_norms(_chunk_sq_norms(q, n))[:, :, None]  # divide by |q_m|, [G, Q, 1]
    _check_overflow(out)
    return _out(out, as_numpy)


def _check_exclude(exclude: Any, num_queries: int, num_items: int) -> torch.Tensor | None:
    """exclude as a [Q, E] int64 tensor (-1 = nothing), or None."""
    if exclude is None:
        return None
    e = torch.as_tensor(np.asarray(exclude) if not isinstance(exclude, torch.Tensor) else exclude)
    if e.ndim == 1:
        e = e[:, None]
    if e.ndim != 2 or e.shape[0] != num_queries:
        raise ValueError(
            f"exclude must have one row per query ({num_queries}), got shape {tuple(e.shape)}"
        )
    if e.is_floating_point() or e.dtype == torch.bool:
        raise ValueError(f"exclude must hold integer item indices, got dtype {e.dtype}")
    e = e.long()
    if e.numel() and (int(e.max()) >= num_items or int(e.min()) < -1):
        raise ValueError(
            f"exclude entries must be item indices in [0, {num_items}) or -1 (none), "
            f"got values in [{int(e.min())}, {int(e.max())}]"
        )
    return e


def _check_k(k: int, num_items: int, exclude: torch.Tensor | None) -> int:
    k = check_int(k, "k", minimum=1)
    most = _most_excluded(exclude)
    available = num_items - most
    if k > available:
        extra = "" if exclude is None else f" minus {most} excluded for one query"
        raise ValueError(f"k must be <= number of database items ({num_items}{extra}), got k={k}")
    return int(k)


def _most_excluded(exclude: torch.Tensor | None) -> int:
    """The largest number of distinct real items (not -1 padding) one query excludes."""
    if exclude is None or exclude.numel() == 0:
        return 0
    e = exclude.sort(dim=1).values  # [Q, E]
    new = torch.ones_like(e, dtype=torch.bool)
    new[:, 1:] = e[:, 1:] != e[:, :-1]  # first of each run of equal ids
    return int(((e >= 0) & new).sum(1).max())


def _merge(
    cands: list[tuple[torch.Tensor, torch.Tensor]], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the union of candidate lists [(scores [Q, k_i], indices [Q, k_i]), ...]."""
    if len(cands) == 1:
        return cands[0]
    top_s, pos = torch.cat([c[0] for c in cands], 1).topk(k, dim=1)
    return top_s, torch.cat([c[1] for c in cands], 1).gather(1, pos)


def prefix_topk(
    queries: Any,
    items: Any,
    nesting: Nesting | str | Sequence[int],
    k: int,
    metric: str = "cosine",
    tile_size: int = 4096,
    center: Any = None,
    exclude: Any = None,
    query_block: int = 1024,
) -> tuple[Any, Any]:
    """The k best items for every query at every prefix, tiled so memory stays bounded.

    Same scores as `prefix_scores`, but only ``query_block x tile_size`` scores exist at a time;
    a running top-k per prefix is merged across item tiles.

    Args:
        queries: [Q, D]; items: [N, D]; nesting, metric, center: as in `prefix_scores`.
        k: items returned per query and prefix (<= N minus the excluded ones).
        tile_size: items scored at once (memory ~ 2 * query_block * tile_size numbers).
        exclude: optional item indices a query must not retrieve, [Q] or [Q, E] ints, -1 = none
            (``exclude=arange(Q)`` is leave-one-out when the queries are the items themselves).
        query_block: queries scored at once.

    Returns:
        (scores [G, Q, k], indices [G, Q, k] int64), best first; tensors, or numpy arrays when
        ``queries`` is a numpy array.

    Ties: among items with exactly equal scores (repeated items, binary or quantised
    embeddings), which ones are returned at the cut-off, and in what order, is whatever
    `torch.topk` and the merge across tiles give: the same from run to run for the same inputs,
    ``tile_size`` and device, but not specified, and it changes with ``tile_size`` (and may with
    the device or torch version). Metrics computed from the result depend on it only where tied
    items differ in relevance; `prefix_topk_reference` breaks ties in its own way.
    """
    q, x, n, c, as_numpy = _prepare(queries, items, nesting, metric, center)
    tile_size = check_int(tile_size, "tile_size", minimum=1)
    query_block = check_int(query_block, "query_block", minimum=1)
    excl = _check_exclude(exclude, q.shape[0], x.shape[0])
    k = _check_k(k, x.shape[0], excl)
    if c is not None:
        q = q - c
    # 1/|x_m| for all items and prefixes once, [G, N] (reused by every query block)
    inv_x = _item_inv_norms(x, n, c, tile_size, q.dtype) if metric == "cosine" else None
    scores = torch.empty(len(n), q.shape[0], k, dtype=q.dtype, device=q.device)  # [G, Q, k]
    indices = torch.empty(len(n), q.shape[0], k, dtype=torch.long, device=q.device)
    for q0 in range(0, q.shape[0], query_block):
        qb = q[q0 : q0 + query_block]
        eb = None if excl is None else excl[q0 : q0 + query_block]
        s, i = _topk_block(qb, x, n, k, inv_x, tile_size, c, eb)
        scores[:, q0 : q0 + qb.shape[0]], indices[:, q0 : q0 + qb.shape[0]] = s, i
    _check_overflow(scores)  # the k returned per query: excluded items never are (see _check_k)
    return _out(scores, as_numpy), _out(indices, as_numpy)


def _topk_block(
    q: torch.Tensor,
    x: torch.Tensor,
    n: Nesting,
    k: int,
    inv_x: torch.Tensor | None,
    tile_size: int,
    center: torch.Tensor | None,
    exclude: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k for one block of (already centred) queries [Qb, D] over all items: [G, Qb, k] x2.

    A running top-k per prefix is merged with each tile's top-k.
    """
    G, Qb = len(n), q.shape[0]
    dev = q.device
    best_s = torch.full((G, Qb, k), -torch.inf, dtype=q.dtype, device=dev)  # running top-k
    best_i = torch.full((G, Qb, k), -1, dtype=torch.long, device=dev)
    buf = torch.empty(Qb, min(tile_size, x.shape[0]), dtype=q.dtype, device=dev)  # reused
    acc = torch.empty_like(buf)  # reused running sums (no fresh allocation per tile)
    for t0 in range(0, x.shape[0], tile_size):
        xt = x[t0 : t0 + tile_size].to(q.dtype)  # [T, D], float32 at least (see _prepare)
        if center is not None:
            xt = xt - center
        rows, cols = _excluded_in_tile(exclude, t0, xt.shape[0])
        inv_t = None if inv_x is None else inv_x[:, t0 : t0 + xt.shape[0]]
        for g, s in _iter_prefix_scores(
            q, xt, n, inv_t, buf[:, : xt.shape[0]], acc[:, : xt.shape[0]]
        ):
            if rows is not None:
                s = s.clone() if inv_t is None else s  # never write into the running sum
                s[rows, cols] = -torch.inf
            cs, ci = s.topk(min(k, s.shape[1]), dim=1)  # [Qb, kt]
            best_s[g], best_i[g] = _merge([(best_s[g], best_i[g]), (cs, ci + t0)], k)
    if inv_x is not None:
        best_s *= _inv_norms(_chunk_sq_norms(q, n))[:, :, None]  # now true cosines
    return best_s, best_i


def _excluded_in_tile(
    exclude: torch.Tensor | None, t0: int, size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(query rows, tile columns) of the excluded pairs that fall inside items [t0, t0+size)."""
    if exclude is None:
        return None, None
    inside = (exclude >= t0) & (exclude < t0 + size)  # [Qb, E]
    if not bool(inside.any()):
        return None, None
    rows, e = inside.nonzero(as_tuple=True)
    return rows, exclude[rows, e] - t0


# ----------------------------------------------------------------------------- references
def prefix_scores_reference(
    queries: Any,
    items: Any,
    nesting: Nesting | str | Sequence[int],
    metric: str = "cosine",
    center: Any = None,
) -> Any:
    """Plain loop over prefixes: truncate, re-normalise (cosine), multiply. [G, Q, N]."""
    q, x, n, c, as_numpy = _prepare(queries, items, nesting, metric, center)
    x = x.to(q.dtype)
    if c is not None:
        q, x = q - c, x - c
    out = []
    for m in n.sizes:
        qm, xm = q[:, :m], x[:, :m]
        if metric == "cosine":
            qm = torch.nn.functional.normalize(qm, dim=1, eps=_EPS)
            xm = torch.nn.functional.normalize(xm, dim=1, eps=_EPS)
        out.append(qm @ xm.T)
    return _out(torch.stack(out), as_numpy)


def prefix_topk_reference(
    queries: Any,
    items: Any,
    nesting: Nesting | str | Sequence[int],
    k: int,
    metric: str = "cosine",
    center: Any = None,
    exclude: Any = None,
) -> tuple[Any, Any]:
    """Top-k of `prefix_scores_reference` (materialises [G, Q, N]; small inputs only)."""
    as_numpy = isinstance(queries, np.ndarray)
    s = prefix_scores_reference(
        torch.as_tensor(queries), torch.as_tensor(items), nesting, metric, center
    )
    excl = _check_exclude(exclude, s.shape[1], s.shape[2])
    k = _check_k(k, s.shape[2], excl)
    if excl is not None:
        rows = torch.arange(s.shape[1])[:, None].expand_as(excl)
        keep = excl >= 0
        s[:, rows[keep], excl[keep]] = -torch.inf
    top_s, top_i = s.topk(k, dim=2)
    return _out(top_s, as_numpy), _out(top_i, as_numpy)
