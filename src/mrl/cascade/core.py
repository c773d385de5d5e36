"""Adaptive classification: a cascade over the prefixes of a Matryoshka classifier.

Kusupati et al. (2022, section 4.2.2): classify with the smallest prefix first and move to the next
(larger) prefix only when the prediction is not confident. Confidence is the maximum softmax
probability ``p_g = max_c softmax(logits[g])_c``; the cascade holds one threshold ``t_g`` in [0, 1]
per prefix except the last:

    answer at prefix g if p_g >= t_g, else move on to g + 1; the last prefix always answers.

``t_g = 0`` answers every sample that reaches g; ``t_g = 1`` answers only samples whose softmax is
saturated to exactly 1.0 in float64 (gap of roughly 37 nats), i.e. it effectively skips prefix g.

Thresholds are tuned greedily on a held-out calibration split, as in the paper: for each prefix in
turn (smallest first) pick the smallest threshold that keeps calibration accuracy at or above a
target, assuming every sample not yet answered goes on with later thresholds 1 (answered at the
first later prefix where it saturates, else by the full-size prefix). The target is
the full-size prefix's calibration accuracy minus a tolerance, or an absolute accuracy. A budget of
expected dimensions is met by fitting a sweep of targets and keeping the most accurate cascade whose
calibration cost fits the budget.

Costs (per sample, averaged over samples), with ``g`` the prefix that answered and ``m_g`` its size:

* ``expected_dims``: mean ``m_g``, the representation size used. This is also the classifier cost
  (dims read per class) of MRL-E, whose tied weights make the logits at prefix g the running sum of
  partial products: going from g to g + 1 only reads the new chunk, so reaching g costs ``m_g``.
* ``expected_heads``: mean ``g + 1``, the number of heads evaluated.
* ``expected_head_dims``: mean ``m_1 + ... + m_g``, dims read by the independent-heads MRL model,
  which evaluates every head it passes, each from scratch.

All shapes: G prefixes, N samples, C classes. Inputs are numpy arrays or torch tensors.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrl.arrays import as_numpy
from mrl.io import atomic_write_json
from mrl.nesting import Nesting

__all__ = [
    "Cascade",
    "FORMAT_VERSION",
    "cascade_costs",
    "confidence",
    "fit_cascade",
    "fit_cascade_reference",
    "oracle",
]

FORMAT_VERSION = 1
_KINDS = ("logits", "probs")


# ----------------------------------------------------------------------------- input checks
def check_scores(scores: Any, nesting: Nesting, name: str = "logits") -> np.ndarray:
    """Return ``scores`` as a float64 [G, N, C] array or raise naming the bad shape."""
    if scores is None:
        raise ValueError(f"{name} are required, got None")
    nesting = Nesting.coerce(nesting)
    arr = as_numpy(scores)
    if arr.ndim != 3 or arr.shape[0] != len(nesting) or arr.shape[1] == 0 or arr.shape[2] < 2:
        raise ValueError(
            f"{name} must have shape [G, N, C] with G={len(nesting)} (nesting "
            f"{list(nesting.sizes)}), N >= 1 and C >= 2, got shape {tuple(arr.shape)}"
        )
    if arr.dtype.kind not in "biuf":  # complex lost its imaginary part in the cast below
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(arr)).sum())} non-finite")
    return arr


def check_labels(labels: Any, n: int, num_classes: int, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as an int64 [N] array in [0, C) or raise naming the problem."""
    if labels is None:
        raise ValueError(f"{name} are required (one class index per sample), got None")
    arr = as_numpy(labels)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape [N]=({n},), got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {arr.dtype}")
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        bad = arr[(arr < 0) | (arr >= num_classes)][0]
        raise ValueError(f"{name} must be in [0, {num_classes}), got {int(bad)}")
    return arr.astype(np.int64, copy=False)


def check_thresholds(thresholds: Sequence[float], nesting: Nesting) -> tuple[float, ...]:
    """One threshold in [0, 1] per prefix except the last."""
    try:  # a scalar or a string was a TypeError, or float() of each character
        if isinstance(thresholds, (str, bytes)):
            raise TypeError
        items = list(thresholds)
    except TypeError:
        raise ValueError(
            f"thresholds must be a sequence of G-1={len(nesting) - 1} numbers, got {thresholds!r}"
        ) from None
    values_list = []
    for i, t in enumerate(items):  # a hand-edited cascade file: null, "a", true
        try:
            if isinstance(t, (str, bytes, bool, np.bool_)):
                raise TypeError
            values_list.append(float(t))
        except (TypeError, ValueError):
            raise ValueError(f"thresholds[{i}] must be a number in [0, 1], got {t!r}") from None
    values = tuple(values_list)
    if len(values) != len(nesting) - 1:
        raise ValueError(
            f"thresholds must have G-1={len(nesting) - 1} entries for nesting "
            f"{list(nesting.sizes)}, got {len(values)}: {list(values)}"
        )
    for i, t in enumerate(values):
        if not 0.0 <= t <= 1.0:  # also rejects NaN
            raise ValueError(f"thresholds[{i}] must be in [0, 1], got {t}")
    return values


# ----------------------------------------------------------------------------- confidences
def confidence(
    scores: Any, nesting: Nesting, kind: str = "logits"
) -> tuple[np.ndarray, np.ndarray]:
    """Max softmax probability and argmax per prefix: ``(conf [G, N], pred [G, N])``.

    ``kind="logits"``: a numerically stable softmax in float64 (max p = 1 / sum exp(l - max l));
    ``kind="probs"`` takes probabilities as given (each row must sum to 1 within 1e-3).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    arr = check_scores(scores, nesting, "logits" if kind == "logits" else "probs")
    pred = arr.argmax(axis=2)  # [G, N]
    if kind == "probs":
        sums = arr.sum(axis=2)
        if (arr < 0).any() or np.abs(sums - 1).max() > 1e-3:
            raise ValueError(
                "probs must be non-negative with rows summing to 1, got row sums in "
                f"[{sums.min():.4g}, {sums.max():.4g}]; pass kind='logits' for raw logits"
            )
        return arr.max(axis=2), pred
    shifted = arr - arr.max(axis=2, keepdims=True)  # [G, N, C], max entry 0
    conf = 1.0 / np.exp(shifted).sum(axis=2)  # [G, N]
    return conf, pred


def _stop_index(conf: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """First prefix g with conf[g] >= t_g (the last prefix if none): [N] ints."""
    G, N = conf.shape
    stop = np.full(N, G - 1, dtype=np.int64)
    undecided = np.ones(N, dtype=bool)
    for g, t in enumerate(thresholds):
        here = undecided & (conf[g] >= t)
        stop[here] = g
        undecided &= ~here
    return stop


def cascade_costs(stop: np.ndarray, nesting: Nesting) -> dict[str, float]:
    """Mean costs of answering each sample at prefix ``stop[i]`` (see module docstring)."""
    sizes = np.asarray(Nesting.coerce(nesting).sizes, dtype=np.float64)
    stop = np.asarray(stop)
    return {
        "expected_dims": float(sizes[stop].mean()),
        "expected_heads": float((stop + 1).mean()),
        "expected_head_dims": float(np.cumsum(sizes)[stop].mean()),
    }


# ----------------------------------------------------------------------------- the cascade
@dataclass(frozen=True)
class Cascade:
    """Thresholds on max softmax probability between consecutive prefixes of ``nesting``.

    Args:
        nesting: the model's prefix sizes (G of them).
        thresholds: G-1 values in [0, 1]; ``thresholds[g]`` decides whether prefix g answers.
        info: how it was fitted (mode, target, calibration accuracy and cost, ...); JSON-able.
    """

    nesting: Nesting
    thresholds: tuple[float, ...]
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nesting", Nesting.coerce(self.nesting))  # lists too
        object.__setattr__(self, "thresholds", check_thresholds(self.thresholds, self.nesting))

    # -------------------------------------------------------------- prediction
    def _confidence(self, scores: Any, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """`confidence`, after checking the class count the cascade was fitted on (when its
        info records one): max-softmax thresholds mean other things with other C."""
        out = confidence(scores, self.nesting, kind)
        fitted, c = self.info.get("num_classes"), np.shape(scores)[-1]
        if fitted is not None and fitted != c:
            raise ValueError(f"this cascade was fitted on logits of {fitted} classes; these have "
                             f"{c}")
        return out

    def stop_index(self, scores: Any, kind: str = "logits") -> np.ndarray:
        """Index g of the prefix that answers each sample: [N] ints in [0, G)."""
        conf, _ = self._confidence(scores, kind)
        return _stop_index(conf, self.thresholds)

    def predict(self, scores: Any, kind: str = "logits") -> tuple[np.ndarray, np.ndarray]:
        """``(labels [N], prefix_used [N])``: the answer and the size (dims) of the prefix used."""
        conf, pred = self._confidence(scores, kind)
        stop = _stop_index(conf, self.thresholds)
        labels = pred[stop, np.arange(pred.shape[1])]
        return labels, np.asarray(self.nesting.sizes, dtype=np.int64)[stop]

    def evaluate(self, scores: Any, labels: Any, kind: str = "logits") -> dict[str, float]:
        """Accuracy and costs on labelled data: keys ``accuracy``, ``expected_dims``,
        ``expected_heads``, ``expected_head_dims``, ``max_prefix`` (largest prefix used)."""
        conf, pred = self._confidence(scores, kind)
        y = check_labels(labels, pred.shape[1], as_numpy(scores).shape[2])
        stop = _stop_index(conf, self.thresholds)
        answer = pred[stop, np.arange(pred.shape[1])]
        return {
            "accuracy": float((answer == y).mean()),
            **cascade_costs(stop, self.nesting),
            "max_prefix": int(self.nesting.sizes[int(stop.max())]),
        }

    # -------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "mrl-cascade",
            "version": FORMAT_VERSION,
            "nesting": self.nesting.to_dict(),
            "thresholds": list(self.thresholds),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], nesting: Nesting | None = None) -> Cascade:
        """Rebuild a cascade; with ``nesting`` (the model's) check it is the one fitted for."""
        if not isinstance(data, dict) or data.get("format") != "mrl-cascade":
            raise ValueError("not a cascade file: expected a JSON object with format 'mrl-cascade'")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"cascade file version must be {FORMAT_VERSION}, got {data.get('version')!r}"
            )
        missing = [k for k in ("nesting", "thresholds") if k not in data]
        if missing:
            raise ValueError(f"cascade file lacks {missing}")
        info = data.get("info") or {}
        if not isinstance(info, dict):
            raise ValueError(f"cascade 'info' must be a JSON object, got {type(info).__name__}")
        if not isinstance(data["thresholds"], list):
            raise ValueError(
                f"cascade 'thresholds' must be a list, got {type(data['thresholds']).__name__}"
            )
        try:
            own = Nesting.from_dict(data["nesting"])
        except (TypeError, KeyError, AttributeError) as exc:
            bad = data["nesting"]
            raise ValueError(f"cascade 'nesting' is malformed ({exc!r}): {bad!r}") from None
        if nesting is not None:  # a list or spec string as everywhere else (was AttributeError)
            nesting = Nesting.coerce(nesting)
        if nesting is not None and tuple(nesting.sizes) != tuple(own.sizes):
            raise ValueError(
                f"the cascade was fitted for nesting {list(own.sizes)}, but the model's nesting "
                f"is {list(nesting.sizes)}; fit a cascade for this model"
            )
        return cls(own, tuple(data["thresholds"]), dict(info))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, nesting: Nesting | None = None) -> Cascade:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cascade file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"cascade file {path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data, nesting)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------- fitting
def _prepare(scores: Any, labels: Any, nesting: Nesting, kind: str):
    """(conf [G, N], correct [G, N] bool, pred [G, N]) for labelled data, with checked inputs."""
    if labels is None:
        raise ValueError("labels are required (calibration labels), got None")
    conf, pred = confidence(scores, nesting, kind)
    y = check_labels(labels, pred.shape[1], as_numpy(scores).shape[2])
    return conf, pred == y[None, :], pred


def _number(name: str, value: Any) -> float:
    """``float(value)``, or a one-line error naming the parameter (was "could not convert ...")."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _target_from(
    correct: np.ndarray, tolerance: float | None, target_accuracy: float | None
) -> tuple[str, float]:
    if tolerance is not None and target_accuracy is not None:
        raise ValueError(
            f"give tolerance or target_accuracy, not both (got tolerance={tolerance}, "
            f"target_accuracy={target_accuracy})"
        )
    if target_accuracy is not None:
        if not 0.0 <= _number("target_accuracy", target_accuracy) <= 1.0:
            raise ValueError(f"target_accuracy must be in [0, 1], got {target_accuracy}")
        return "target_accuracy", float(target_accuracy)
    tol = 0.0 if tolerance is None else _number("tolerance", tolerance)
    if not -1.0 <= tol <= 1.0:
        raise ValueError(f"tolerance must be in [-1, 1] (accuracy fraction), got {tolerance}")
    return "tolerance", float(correct[-1].mean()) - tol


def _greedy_thresholds(
    conf: np.ndarray, correct: np.ndarray, target: float, start: int = 0
) -> list[float]:
    """The greedy fit (fast path): sort once per prefix, evaluate every cut with cumulative sums.

    Prefixes before ``start`` are skipped (threshold 1). At prefix g with earlier thresholds
    fixed, let R be the samples still undecided. Stopping the k most confident samples of R at g
    (the rest go on with later thresholds 1: answered where they first saturate, else at full
    size; `_later_answer_correct`) gives
    ``correct_before + cum(correct_g)[k] + (sum(later_g) - cum(later_g)[k])``
    correct answers; keep the largest k reaching ``target`` (the smallest threshold).
    """
    G, N = conf.shape
    need = target * N - 1e-9  # accuracy >= target  <=>  n_correct >= target * N
    later = _later_answer_correct(conf, correct)  # [G, N]
    undecided = np.ones(N, dtype=bool)
    correct_before = 0
    thresholds: list[float] = []
    for g in range(G - 1):
        idx = np.flatnonzero(undecided)
        order = idx[np.argsort(-conf[g, idx], kind="stable")]
        p = conf[g, order]  # [R], descending
        cum_g = np.concatenate([[0], np.cumsum(correct[g, order])])  # [R+1]
        cum_l = np.concatenate([[0], np.cumsum(later[g, order])])
        n_correct = correct_before + cum_g + (cum_l[-1] - cum_l)  # [R+1], index = cut k
        k_min = int((p >= 1.0).sum())  # t = 1 still answers saturated samples
        # cut k is realisable by a threshold only between distinct values: p[k-1] > p[k]
        valid = np.ones(len(p) + 1, dtype=bool)
        valid[1:-1] = p[:-1] > p[1:]
        valid[:k_min] = False
        if g < start:
            valid[:] = False
        ok = np.flatnonzero(valid & (n_correct >= need))
        # no passing cut (or g < start): threshold 1, which still answers the k_min saturated
        k, t = (int(ok.max()), _threshold_for_cut(p, int(ok.max()))) if len(ok) else (k_min, 1.0)
        thresholds.append(t)
        undecided[order[:k]] = False
        correct_before += int(cum_g[k])
    return thresholds


def _later_answer_correct(conf: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """``[G, N]``: row g holds whether a sample is answered correctly when it goes past prefix g
    and every later threshold is 1: at the first later prefix where its confidence saturates
    (a threshold of 1 still stops it there), else at full size. Counting the full size's answer
    for all of them (as this fast path once did) disagreed with `fit_cascade_reference`."""
    G = conf.shape[0]
    later = np.empty_like(correct)
    answer = correct[-1].copy()  # [N]: the answer from prefixes after g, walking g down
    for g in range(G - 2, -1, -1):
        later[g] = answer
        answer = np.where(conf[g] >= 1.0, correct[g], answer)
    later[-1] = correct[-1]
    return later


def _best_greedy(conf: np.ndarray, correct: np.ndarray, target: float, nesting: Nesting):
    """The greedy from every starting prefix; the one reaching ``target`` with the fewest expected
    dims on calibration (the greedy from prefix 1 when none reaches it).

    The plain greedy (start 0) spends the whole accuracy slack on the smallest prefix; when that
    prefix is weak, starting later is cheaper, and "answer everything at prefix s" (a fixed-size
    model) is always among the candidates, so the cascade is never worse than a fixed prefix on
    calibration.
    """
    sizes = np.asarray(nesting.sizes, dtype=np.float64)
    rows = np.arange(conf.shape[1])
    best, best_dims = None, np.inf
    for start in range(len(nesting)):
        th = _greedy_thresholds(conf, correct, target, start)
        stop = _stop_index(conf, th)
        if correct[stop, rows].mean() < target - 1e-9:
            continue
        dims = float(sizes[stop].mean())
        if dims < best_dims - 1e-12:
            best, best_dims = th, dims
    return best if best is not None else _greedy_thresholds(conf, correct, target, 0)


def _threshold_for_cut(p: np.ndarray, k: int) -> float:
    """A threshold answering exactly the k most confident of ``p`` (descending) with ``>=``:
    the midpoint below the k-th (also below saturated ones, as `fit_cascade_reference` picks)."""
    if k == 0:
        return 1.0
    if k == len(p):
        return 0.0
    return _between(float(p[k - 1]), float(p[k]))


def _between(hi: float, lo: float) -> float:
    """A value t with lo < t <= hi: the midpoint (margin both ways for unseen data), or hi when
    the two are adjacent floats and the midpoint rounds down to lo."""
    mid = (hi + lo) / 2
    return mid if lo < mid <= hi else hi


def fit_cascade(
    scores: Any,
    labels: Any,
    nesting: Nesting,
    *,
    tolerance: float | None = None,
    target_accuracy: float | None = None,
    budget: float | None = None,
    kind: str = "logits",
) -> Cascade:
    """Tune thresholds on calibration data ``scores [G, N, C]`` and ``labels [N]``.

    Exactly one mode: ``tolerance`` (accuracy fraction; 0.005 = 0.5 points below the full-size
    prefix's calibration accuracy; the default is 0), ``target_accuracy`` (absolute, in [0, 1]), or
    ``budget`` (expected dims; the most accurate cascade of a sweep that costs at most this much).
    When the target cannot be reached (above the full-size accuracy) the cascade falls back to the
    full-size prefix and ``info["reached"]`` is False.
    """
    nesting = Nesting.coerce(nesting)
    conf, correct, _ = _prepare(scores, labels, nesting, kind)
    if budget is not None:
        if tolerance is not None or target_accuracy is not None:
            raise ValueError(
                f"give budget alone, got budget={budget} with tolerance={tolerance}, "
                f"target_accuracy={target_accuracy}"
            )
        return _fit_budget(conf, correct, nesting, _number("budget", budget))
    mode, target = _target_from(correct, tolerance, target_accuracy)
    thresholds = _best_greedy(conf, correct, target, nesting)
    info = {"mode": mode, "target": target, "n_calib": int(conf.shape[1])}
    if mode == "tolerance":
        info["tolerance"] = 0.0 if tolerance is None else float(tolerance)
    return _with_calib_info(Cascade(nesting, tuple(thresholds)), conf, correct, info)


def _with_calib_info(cascade: Cascade, conf, correct, info: dict[str, Any]) -> Cascade:
    stop = _stop_index(conf, cascade.thresholds)
    acc = float(correct[stop, np.arange(conf.shape[1])].mean())
    info = {
        **info,
        "calib_accuracy": acc,
        "calib_full_accuracy": float(correct[-1].mean()),
        **{f"calib_{k}": v for k, v in cascade_costs(stop, cascade.nesting).items()},
    }
    if "target" in info:
        info["reached"] = bool(acc >= info["target"] - 1e-9)
    return Cascade(cascade.nesting, cascade.thresholds, info)


def _fit_budget(conf, correct, nesting: Nesting, budget: float) -> Cascade:
    if not (math.isfinite(budget) and budget >= nesting.sizes[0]):
        raise ValueError(
            f"budget must be a finite number >= the smallest prefix ({nesting.sizes[0]} dims), "
            f"got {budget}"
        )
    sizes = np.asarray(nesting.sizes, dtype=np.float64)
    accs = correct.mean(axis=1)
    # Targets from "answer everything at prefix 1" (target 0) up to the oracle's accuracy (a
    # cascade can beat every single prefix: the best one's accuracy was the sweep's top before).
    best_possible = float(correct.any(axis=0).mean())
    targets = np.unique(np.concatenate([[0.0], accs, np.linspace(accs.min(), best_possible, 201)]))
    best: tuple[float, float, list[float]] | None = None
    for target in targets:
        th = _best_greedy(conf, correct, float(target), nesting)
        stop = _stop_index(conf, th)
        dims = float(sizes[stop].mean())
        if dims > budget + 1e-9:
            continue
        acc = float(correct[stop, np.arange(conf.shape[1])].mean())
        if best is None or (acc, -dims) > (best[0], -best[1]):
            best = (acc, dims, th)
    assert best is not None  # target 0 answers everything at the smallest prefix
    info = {"mode": "budget", "budget": budget, "n_calib": int(conf.shape[1])}
    return _with_calib_info(Cascade(nesting, tuple(best[2])), conf, correct, info)


def fit_cascade_reference(
    scores: Any, labels: Any, nesting: Nesting, target: float, kind: str = "logits", start: int = 0
) -> tuple[float, ...]:
    """Brute-force greedy (reference for tests): for each prefix try every candidate threshold
    (1, the midpoints between distinct confidences of the samples reaching it, 0) and keep the
    smallest whose full cascade (later thresholds at 1) reaches ``target`` on calibration data.
    Prefixes before ``start`` keep threshold 1."""
    nesting = Nesting.coerce(nesting)
    conf, correct, _ = _prepare(scores, labels, nesting, kind)
    G, N = conf.shape
    fixed: list[float] = []
    for g in range(G - 1):
        undecided = np.ones(N, dtype=bool)
        for h, t in enumerate(fixed):
            undecided &= conf[h] < t
        vals = np.unique(conf[g, undecided])[::-1]  # candidates between values that reach g
        cands = [1.0] + [_between(float(a), float(b)) for a, b in zip(vals[:-1], vals[1:])]
        cands += [0.0] if len(vals) else []  # nobody reaches g: keep 1 (safe on unseen data)
        chosen = 1.0
        for t in cands if g >= start else []:  # decreasing: the last that passes is smallest
            th = fixed + [t] + [1.0] * (G - 2 - g)
            stop = _stop_index(conf, th)
            if correct[stop, np.arange(N)].mean() >= target - 1e-12:
                chosen = t
        fixed.append(chosen)
    return tuple(fixed)


# ----------------------------------------------------------------------------- oracle
def oracle(
    scores: Any, labels: Any, nesting: Nesting, kind: str = "logits"
) -> tuple[np.ndarray, np.ndarray]:
    """Upper bound: answer at the smallest prefix that is right (full size when none is).

    Returns ``(labels [N], prefix_used [N])`` like `Cascade.predict`; it needs the true labels, so
    it is a bound to compare against, not a classifier.
    """
    nesting = Nesting.coerce(nesting)
    _, correct, pred = _prepare(scores, labels, nesting, kind)
    G, N = correct.shape
    any_right = correct.any(axis=0)
    stop = np.where(any_right, correct.argmax(axis=0), G - 1)  # argmax: first True
    return pred[stop, np.arange(N)], np.asarray(nesting.sizes, dtype=np.int64)[stop]
