"""Evaluate cascades: accuracy against expected dims, beside fixed-feature (FF) models.

The labelled evaluation set (e.g. a test set) is split at random, per seed, into a calibration part
(thresholds are tuned on it) and a test part (everything reported is measured on it). Per seed:

* the curve: cascades fitted for a sweep of tolerances below the full-size prefix's calibration
  accuracy, each measured on the test part (accuracy, expected dims, heads, head dims);
* the matched operating point: a cascade fitted to the reference accuracy minus ``match`` (0.5
  points by default) on the calibration part, then measured on the test part (no test peeking);
* the headline "N x smaller at the same accuracy": the fewest expected dims of any curve point whose
  test accuracy is within ``match`` of the reference's test accuracy, against the smallest FF model
  (or, without FF models, the smallest fixed MRL prefix) that is; the ratio of the two.

The reference ("the full-size model") is the FF model of full size D when FF logits are given,
otherwise the MRL model's own full-size prefix. Shapes: G prefixes, N samples, C classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mrl.arrays import as_numpy
from mrl.cascade.core import (
    Cascade,
    _number,
    cascade_costs,
    check_labels,
    check_scores,
    fit_cascade,
    oracle,
)
from mrl.nesting import Nesting
from mrl.params import is_int
from mrl.records import Record, make_record

__all__ = [
    "DEFAULT_TOLERANCES",
    "cascade_curve",
    "evaluate_cascade",
    "mean_curve",
    "split_calibration",
    "summarize",
]

# Accuracy fractions below the full-size prefix's calibration accuracy (negative: above it).
DEFAULT_TOLERANCES = (
    -0.01, -0.005, -0.002, 0.0, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.0075, 0.01, 0.0125,
    0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
)  # fmt: skip


def split_calibration(
    n: int, fraction: float = 0.5, seed: int = 0, name: str = "calib_fraction"
) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint ``(calib_idx, test_idx)`` over ``range(n)``; ``fraction`` to calibration.
    ``name``: the fraction's name in errors (the CLI passes its flag)."""
    if not 0.0 < _number(name, fraction) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {fraction}")
    if not is_int(seed) or seed < 0:
        # numpy's own message was "expected non-negative integer", naming nothing
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    n_calib = int(round(n * fraction))
    if n_calib < 1 or n_calib > n - 1:
        raise ValueError(
            f"{name}={fraction} of {n} samples leaves an empty calibration or test part"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_calib]), np.sort(perm[n_calib:])


def cascade_curve(
    calib_scores: Any,
    calib_labels: Any,
    test_scores: Any,
    test_labels: Any,
    nesting: Nesting,
    tolerances: Sequence[float] = DEFAULT_TOLERANCES,
    kind: str = "logits",
) -> list[dict[str, Any]]:
    """One point per tolerance: fitted on calibration, measured on test; and the full-size end
    (tolerance None: every sample answered by the largest prefix), which a fitted cascade can
    miss by a hair, so that "matches the full size" had no point at all (sorted by dims)."""
    points = []
    for tol in tolerances:
        cascade = fit_cascade(calib_scores, calib_labels, nesting, tolerance=tol, kind=kind)
        point = {"tolerance": float(tol), "thresholds": list(cascade.thresholds)}
        point.update(cascade.evaluate(test_scores, test_labels, kind=kind))
        point["calib_accuracy"] = cascade.info["calib_accuracy"]
        points.append(point)
    points.append(_full_size_point(calib_scores, calib_labels, test_scores, test_labels, nesting))
    return sorted(points, key=lambda p: (p["expected_dims"], -p["accuracy"]))


def _full_size_point(calib_scores: Any, calib_labels: Any, test_scores: Any, test_labels: Any,
                     nesting: Nesting) -> dict[str, Any]:  # fmt: skip
    """The curve's end: the largest prefix answers every sample (all G heads run)."""
    nesting = Nesting.coerce(nesting)
    test = np.asarray(as_numpy(test_scores))
    calib = np.asarray(as_numpy(calib_scores))
    last = len(nesting) - 1
    return {
        "tolerance": None,
        "thresholds": None,
        "accuracy": _accuracy(test[-1], np.asarray(as_numpy(test_labels))),
        **cascade_costs(np.full(test.shape[1], last), nesting),
        "max_prefix": nesting.dim,
        "calib_accuracy": _accuracy(calib[-1], np.asarray(as_numpy(calib_labels))),
    }


def _accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((scores.argmax(axis=-1) == labels).mean())


def _check_ff(ff_scores: Mapping[int, Any] | None, n: int, c: int) -> dict[int, np.ndarray]:
    """FF logits ``{m: [N, C]}`` for the same samples as the cascade's scores."""
    out: dict[int, np.ndarray] = {}
    for m, s in (ff_scores or {}).items():
        # a size: 8.5 was silently FF-8, "x" an unnamed int() error ("8", from JSON, is 8)
        ok = (isinstance(m, (int, np.integer)) and not isinstance(m, bool)) or (
            isinstance(m, str) and m.isascii() and m.isdigit()  # "²".isdigit() too
        )
        if not ok or int(m) < 1:
            raise ValueError(f"ff_scores keys must be FF sizes (positive ints), got {m!r}")
        arr = as_numpy(s)
        if arr.shape != (n, c):
            raise ValueError(f"ff_scores[{m}] must have shape [N, C]=({n}, {c}), got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
            raise ValueError(f"ff_scores[{m}] must be finite numbers")
        out[int(m)] = arr
    return dict(sorted(out.items()))


def _check_calib_index(index: Any, n: int) -> np.ndarray:
    idx = np.unique(as_numpy(index))
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or len(idx) == 0:
        raise ValueError(f"calib_index must be a non-empty 1-D array of ints, got {index!r}")
    if idx[0] < 0 or idx[-1] >= n or len(idx) >= n:
        raise ValueError(
            f"calib_index must index a proper subset of the {n} samples, got indices in "
            f"[{idx[0]}, {idx[-1]}] ({len(idx)} of them)"
        )
    return idx


def _smallest_matching(accs: Mapping[int, float], ref: float, match: float) -> int | None:
    ok = [m for m, a in accs.items() if a >= ref - match - 1e-12]
    return min(ok) if ok else None


def _matched_point(scores, y, nesting, cal, tst, target, kind, ctx):
    """Fit on calibration to ``target`` (clipped to [0, 1]), measure on test; records."""
    target = min(1.0, max(0.0, target))
    cas = fit_cascade(scores[:, cal], y[cal], nesting, target_accuracy=target, kind=kind)
    res = cas.evaluate(scores[:, tst], y[tst], kind=kind)
    mctx = {**ctx, "point": "matched", "target": target, "thresholds": list(cas.thresholds),
            "expected_heads": res["expected_heads"],
            "expected_head_dims": res["expected_head_dims"]}  # fmt: skip
    recs = [
        make_record("cascade", res["max_prefix"], "accuracy", res["accuracy"], **mctx),
        make_record("cascade", res["max_prefix"], "expected_dims", res["expected_dims"], **mctx),
    ]
    return cas, {**res, "target": target}, recs


def _fixed_records(mrl_acc: dict, ff_acc: dict, ctx: dict) -> list[Record]:
    """Test accuracy of every fixed MRL prefix and FF model (FF also at its own dims)."""
    recs = [make_record("mrl", m, "accuracy", a, **ctx) for m, a in mrl_acc.items()]
    for m, a in ff_acc.items():
        recs += [
            make_record("ff", m, "accuracy", a, **ctx),
            make_record("ff", m, "expected_dims", m, **ctx),
        ]
    return recs


def _oracle_records(o_labels, o_used, y, nesting: Nesting, ctx: dict) -> list[Record]:
    """The oracle's accuracy and expected dims (it stops at the first correct prefix)."""
    o_ctx = {**ctx, "expected_heads": float((np.searchsorted(nesting.sizes, o_used) + 1).mean())}
    return [
        make_record("oracle", None, "accuracy", float((o_labels == y).mean()), **o_ctx),
        make_record("oracle", None, "expected_dims", float(o_used.mean()), **o_ctx),
    ]


def _curve_records(curve: list[dict[str, Any]], ctx: dict) -> list[Record]:
    recs: list[Record] = []
    for p in curve:
        pctx = {**ctx, "point": "curve", "tolerance": p["tolerance"],
                "expected_heads": p["expected_heads"],
                "expected_head_dims": p["expected_head_dims"]}  # fmt: skip
        recs += [
            make_record("cascade", p["max_prefix"], "accuracy", p["accuracy"], **pctx),
            make_record("cascade", p["max_prefix"], "expected_dims", p["expected_dims"], **pctx),
        ]
    return recs


def _fewest_dims(curve: list[dict[str, Any]], accuracy: float, match: float) -> float | None:
    """Fewest expected dims of a curve point within ``match`` of ``accuracy`` (None if none)."""
    ok = [p["expected_dims"] for p in curve if p["accuracy"] >= accuracy - match - 1e-12]
    return min(ok) if ok else None


def _evaluate_seed(
    scores: np.ndarray,
    y: np.ndarray,
    nesting: Nesting,
    ff: dict[int, np.ndarray],
    seed: int,
    *,
    calib_fraction: float,
    match: float,
    tolerances: Sequence[float],
    kind: str,
    context: dict[str, Any],
    calib_index: np.ndarray | None = None,
) -> tuple[list[Record], dict[str, Any]]:
    if calib_index is None:
        cal, tst = split_calibration(len(y), calib_fraction, seed)
    else:  # a fixed split given by the caller
        cal = np.asarray(calib_index)
        tst = np.setdiff1d(np.arange(len(y)), cal)
    ctx = {
        "split": "test",  # the caller's context names another split
        **context,
        "seed": seed,
        # with a fixed calib_index, the fraction it is (was the unused calib_fraction argument)
        "calib_fraction": calib_fraction if calib_index is None else len(cal) / len(y),
        "n_calib": len(cal),
        "n_test": len(tst),
    }
    mrl_acc = {m: _accuracy(scores[g, tst], y[tst]) for g, m in enumerate(nesting.sizes)}
    ff_acc = {m: _accuracy(s[tst], y[tst]) for m, s in ff.items()}
    recs = _fixed_records(mrl_acc, ff_acc, ctx)

    # Reference: FF of full size if given, else the MRL full-size prefix.
    use_ff = nesting.dim in ff
    ref_name = f"ff-{nesting.dim}" if use_ff else f"mrl-{nesting.dim}"
    ref_test = ff_acc[nesting.dim] if use_ff else mrl_acc[nesting.dim]
    ref_cal = _accuracy(ff[nesting.dim][cal] if use_ff else scores[-1, cal], y[cal])

    o_labels, o_used = oracle(scores[:, tst], y[tst], nesting, kind)
    recs += _oracle_records(o_labels, o_used, y[tst], nesting, ctx)
    curve = cascade_curve(scores[:, cal], y[cal], scores[:, tst], y[tst], nesting, tolerances, kind)
    recs += _curve_records(curve, ctx)

    mctx = {**ctx, "match": match}
    matched, mres, mrecs = _matched_point(
        scores, y, nesting, cal, tst, ref_cal - match, kind, {**mctx, "reference": ref_name}
    )
    recs += mrecs
    own_cal = _accuracy(scores[-1, cal], y[cal])
    _, own_res, own_recs = _matched_point(
        scores, y, nesting, cal, tst, own_cal - match, kind,
        {**mctx, "reference": f"mrl-{nesting.dim}"},
    )  # fmt: skip
    recs += own_recs if use_ff else []

    # Headline from the test curve.
    cas_dims = _fewest_dims(curve, ref_test, match)
    fixed_name = "ff" if ff else "mrl"
    fixed_m = _smallest_matching(ff_acc if ff else mrl_acc, ref_test, match)
    ratio = None if cas_dims is None or fixed_m is None else fixed_m / cas_dims
    hctx = {**ctx, "point": "match", "match": match, "reference": ref_name}
    if cas_dims is not None:
        recs.append(make_record("cascade", None, "dims_to_match", cas_dims, **hctx))
    if fixed_m is not None:
        recs.append(make_record(fixed_name, None, "dims_to_match", fixed_m, **hctx))
    if ratio is not None:
        recs.append(
            make_record("cascade", None, "x_smaller", ratio, compared_to=fixed_name, **hctx)
        )
    # Also against the MRL model's own full-size prefix (differs from the above when FF-D is used).
    own = mrl_acc[nesting.dim]
    own_dims = _fewest_dims(curve, own, match)
    if own_dims is not None and use_ff:
        recs.append(make_record("cascade", None, "dims_to_match", own_dims,
                                **{**hctx, "reference": f"mrl-{nesting.dim}"}))  # fmt: skip
    summary = {
        "seed": seed,
        "match": match,
        "own_reference_test_accuracy": own,
        "cascade_dims_to_match_own": own_dims,
        "reference": ref_name,
        "reference_test_accuracy": ref_test,
        "reference_calib_accuracy": ref_cal,
        "mrl_accuracy": mrl_acc,
        "ff_accuracy": ff_acc,
        "oracle_accuracy": float((o_labels == y[tst]).mean()),
        "oracle_expected_dims": float(o_used.mean()),
        "matched": {**mres, "thresholds": list(matched.thresholds)},
        "matched_own": own_res,
        "cascade_dims_to_match": cas_dims,
        "fixed_name": fixed_name,
        "fixed_dims_to_match": fixed_m,
        "x_smaller": ratio,
        "curve": curve,
        "n_calib": len(cal),
        "n_test": len(tst),
    }
    return recs, summary


def evaluate_cascade(
    scores: Any,
    labels: Any,
    nesting: Nesting,
    *,
    ff_scores: Mapping[int, Any] | None = None,
    calib_fraction: float = 0.5,
    seeds: Sequence[int] = (0, 1, 2),
    match: float = 0.005,
    tolerances: Sequence[float] = DEFAULT_TOLERANCES,
    kind: str = "logits",
    calib_index: Any = None,
    **context: Any,
) -> tuple[list[Record], list[dict[str, Any]]]:
    """Records and per-seed summaries for MRL logits ``scores [G, N, C]`` with ``labels [N]``.

    ``ff_scores`` maps FF size m to that model's logits ``[N, C]`` on the same samples. ``match``
    is an accuracy fraction (0.005 = 0.5 points). ``calib_index`` (indices into N) fixes the
    calibration part instead of drawing it per seed (the rest is the test part); ``context``
    (e.g. dataset="fashion-mnist") is added to every record.
    """
    nesting = Nesting.coerce(nesting)  # a list or "8,16,32" as elsewhere (was AttributeError)
    arr = check_scores(scores, nesting)
    y = check_labels(labels, arr.shape[1], arr.shape[2])
    ff = _check_ff(ff_scores, arr.shape[1], arr.shape[2])
    if not 0.0 <= _number("match", match) < 1.0:  # also rejects NaN
        raise ValueError(f"match must be in [0, 1) (an accuracy fraction), got {match}")
    if not 0.0 < _number("calib_fraction", calib_fraction) < 1.0:
        raise ValueError(f"calib_fraction must be in (0, 1), got {calib_fraction}")
    _check_context(context)
    tolerances = _check_tolerances(tolerances)  # a generator gave seeds 1.. an empty curve
    seeds = tuple(seeds)  # an iterator is read once (len() and the loop below)
    if calib_index is not None:
        calib_index = _check_calib_index(calib_index, arr.shape[1])
        seeds = tuple(seeds)[:1] or (0,)  # one fixed split: one "seed"
    if not seeds:
        raise ValueError(f"seeds must not be empty, got {list(seeds)}")
    for i, seed in enumerate(seeds):  # int() truncated 0.5 to seed 0 without a word
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seeds[{i}] must be a non-negative int, got {seed!r}")
    if len(set(map(int, seeds))) != len(seeds):  # one split counted twice: a smaller std, n
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    records: list[Record] = []
    summaries = []
    for seed in seeds:
        recs, summ = _evaluate_seed(
            arr,
            y,
            nesting,
            ff,
            int(seed),
            calib_fraction=calib_fraction,
            match=match,
            tolerances=tolerances,
            kind=kind,
            context=context,
            calib_index=calib_index,
        )
        records += recs
        summaries.append(summ)
    summary = summarize(summaries)
    records += _mean_curve_records(summary["mean_curve_headline"], summary, context,
                                   summary["reference"])  # fmt: skip
    if ff:  # also at the accuracy of the MRL model's own full-size prefix
        records += _mean_curve_records(summary["mean_curve_headline_own"], summary, context,
                                       f"mrl-{nesting.dim}")  # fmt: skip
    return records, summaries


# keys the evaluation writes itself: in ``context`` they were overwritten per seed (seed=5 read
# as one seed, records labelled 5 beside seeds [0, 1, 2]) or a make_record TypeError
_RESERVED = ("seed", "seeds", "tolerance", "point", "method", "prefix", "metric", "value",
             "match", "reference", "compared_to", "test_accuracy", "calib_fraction", "n_calib",
             "n_test", "expected_heads", "expected_head_dims")  # fmt: skip


def _check_context(context: dict[str, Any]) -> None:
    taken = sorted(set(context) & set(_RESERVED))
    if taken:
        raise ValueError(f"evaluate_cascade sets {taken} itself; pass seeds=(...) for the "
                         "splits, tolerances=(...) for the curve, and other keys as context")


def _check_tolerances(tolerances: Any) -> tuple[float, ...]:
    """The curve's tolerances as a tuple (read once per seed), non-empty and distinct."""
    if isinstance(tolerances, (str, bytes)) or not isinstance(tolerances, Iterable):
        raise ValueError(f"tolerances must be a sequence of accuracy fractions, got "
                         f"tolerances={tolerances!r}")
    out = tuple(_number("tolerances", t) for t in tolerances)
    if not out:
        raise ValueError("tolerances must not be empty (the curve would have no fitted point)")
    if len(set(out)) != len(out):  # averaged as if they were seeds
        raise ValueError(f"tolerances must be distinct, got {list(out)}")
    return out


def _mean_curve_records(
    h: dict[str, Any], summary: dict[str, Any], context: dict[str, Any], reference: str
) -> list[Record]:
    """A headline read from the seed-averaged curve, as records (seed None)."""
    ctx = {**context, "point": "match_mean_curve", "match": h["match"],
           "reference": reference, "seeds": summary["seeds"]}  # fmt: skip
    out = []
    if h["cascade_dims"] is not None:
        out.append(make_record("cascade", None, "dims_to_match", h["cascade_dims"],
                               tolerance=h["tolerance"], test_accuracy=h["cascade_accuracy"],
                               **ctx))  # fmt: skip
    if h["fixed_dims"] is not None:
        out.append(
            make_record(summary["fixed_name"], None, "dims_to_match", h["fixed_dims"], **ctx)
        )
    if h["x_smaller"] is not None:
        out.append(make_record("cascade", None, "x_smaller", h["x_smaller"],
                               compared_to=summary["fixed_name"], **ctx))  # fmt: skip
    return out


_CURVE_KEYS = (
    "accuracy",
    "calib_accuracy",
    "expected_dims",
    "expected_heads",
    "expected_head_dims",
)


def mean_curve(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curve averaged over seeds, one point per tolerance (sorted by mean expected dims)."""
    by_tol: dict[float, list[dict[str, Any]]] = {}
    for s in summaries:
        for p in s["curve"]:
            by_tol.setdefault(p["tolerance"], []).append(p)
    rows = []
    for tol, pts in by_tol.items():
        row: dict[str, Any] = {"tolerance": tol}
        for k in _CURVE_KEYS:
            v = np.asarray([p[k] for p in pts], dtype=np.float64)
            row[k] = float(v.mean())
            row[k + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        rows.append(row)
    return sorted(rows, key=lambda r: (r["expected_dims"], -r["accuracy"]))


def _mean_curve_headline(
    summaries: Sequence[dict[str, Any]], ref_key: str = "reference_test_accuracy"
) -> dict[str, Any]:
    """Fewest mean expected dims within ``match`` of the mean reference accuracy, against the
    smallest fixed model (FF, else MRL prefix) whose mean accuracy is within ``match``.

    ``ref_key="own_reference_test_accuracy"`` uses the MRL model's own full-size accuracy as the
    level to match (useful when the MRL model is below FF-D: the same accuracy for both sides)."""
    match = summaries[0]["match"]
    ref = float(np.mean([s[ref_key] for s in summaries]))
    curve = mean_curve(summaries)
    ok = [r for r in curve if r["accuracy"] >= ref - match - 1e-12]
    best = min(ok, key=lambda r: r["expected_dims"]) if ok else None
    fixed_key = "ff_accuracy" if summaries[0]["ff_accuracy"] else "mrl_accuracy"
    sizes = summaries[0][fixed_key].keys()
    fixed_acc = {m: float(np.mean([s[fixed_key][m] for s in summaries])) for m in sizes}
    fixed = _smallest_matching(fixed_acc, ref, match)
    dims = None if best is None else best["expected_dims"]
    return {
        "match": match,
        "reference_accuracy": ref,
        "cascade_dims": dims,
        "cascade_dims_std": None if best is None else best["expected_dims_std"],
        "n_seeds": len(summaries),
        "cascade_accuracy": None if best is None else best["accuracy"],
        "tolerance": None if best is None else best["tolerance"],
        "fixed_accuracy": fixed_acc,
        "fixed_dims": fixed,
        "x_smaller": None if dims is None or fixed is None else fixed / dims,
    }


def summarize(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds of the headline numbers (None where any seed has none)."""

    def stat(key: str, sub: str | None = None) -> dict[str, float] | None:
        vals = [(s[key] if sub is None else s[key][sub]) for s in summaries]
        if any(v is None for v in vals):
            return None
        v = np.asarray(vals, dtype=np.float64)
        std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        return {"mean": float(v.mean()), "std": std, "n": len(v)}

    return {
        "mean_curve_headline": _mean_curve_headline(summaries),
        "mean_curve_headline_own": _mean_curve_headline(summaries, "own_reference_test_accuracy"),
        "seeds": [s["seed"] for s in summaries],
        "reference": summaries[0]["reference"],
        "reference_test_accuracy": stat("reference_test_accuracy"),
        "cascade_dims_to_match": stat("cascade_dims_to_match"),
        "own_reference_test_accuracy": stat("own_reference_test_accuracy"),
        "cascade_dims_to_match_own": stat("cascade_dims_to_match_own"),
        "fixed_name": summaries[0]["fixed_name"],
        "fixed_dims_to_match": stat("fixed_dims_to_match"),
        "x_smaller": stat("x_smaller"),
        "matched_accuracy": stat("matched", "accuracy"),
        "matched_expected_dims": stat("matched", "expected_dims"),
        "matched_expected_head_dims": stat("matched", "expected_head_dims"),
        "matched_own_accuracy": stat("matched_own", "accuracy"),
        "matched_own_expected_dims": stat("matched_own", "expected_dims"),
        "matched_own_expected_head_dims": stat("matched_own", "expected_head_dims"),
        "oracle_accuracy": stat("oracle_accuracy"),
        "oracle_expected_dims": stat("oracle_expected_dims"),
    }


def costs_of(cascade: Cascade, scores: Any, kind: str = "logits") -> dict[str, float]:
    """Costs of a cascade on unlabelled data (see `mrl.cascade.core` for their definitions)."""
    return cascade_costs(cascade.stop_index(scores, kind), cascade.nesting)
