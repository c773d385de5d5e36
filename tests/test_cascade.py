"""Cascade: tuning on constructed cases with known answers, fast vs reference, I/O, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrl import Nesting
from mrl.cascade import Cascade, cascade_costs, confidence, fit_cascade, oracle
from mrl.cascade.core import _greedy_thresholds, _stop_index, fit_cascade_reference

NEST = Nesting((4, 8, 16))


def _probs_row(label: int, p: float, c: int = 4) -> np.ndarray:
    """A probability row with max ``p`` on ``label`` and the rest spread evenly."""
    row = np.full(c, (1 - p) / (c - 1))
    row[label] = p
    return row


def known_case():
    """100 samples, 4 classes. Prefix 4 is confident (0.9) and right on samples 0..39 and unsure
    (0.3-0.4) and wrong elsewhere; prefix 8 is confident (0.8) and right on 40..69, unsure and wrong
    elsewhere; prefix 16 is right everywhere (0.6)."""
    n, c = 100, 4
    y = np.arange(n) % c
    probs = np.zeros((3, n, c))
    for i in range(n):
        wrong = (y[i] + 1) % c
        unsure = 0.3 + 0.001 * i  # distinct, all below 0.4
        probs[0, i] = _probs_row(y[i], 0.9) if i < 40 else _probs_row(wrong, unsure)
        probs[1, i] = _probs_row(y[i], 0.8) if 40 <= i < 70 else _probs_row(wrong, unsure)
        probs[2, i] = _probs_row(y[i], 0.6)
    return probs, y


def test_known_case_tolerance_zero_stops_exactly_the_confident_subsets():
    probs, y = known_case()
    cas = fit_cascade(probs, y, NEST, tolerance=0.0, kind="probs")
    assert 0.4 < cas.thresholds[0] <= 0.9 and 0.4 < cas.thresholds[1] <= 0.8
    labels, used = cas.predict(probs, kind="probs")
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_array_equal(used, [4] * 40 + [8] * 30 + [16] * 30)
    res = cas.evaluate(probs, y, kind="probs")
    assert res["accuracy"] == 1.0
    assert res["expected_dims"] == pytest.approx((40 * 4 + 30 * 8 + 30 * 16) / 100)  # 8.8
    assert res["expected_heads"] == pytest.approx((40 * 1 + 30 * 2 + 30 * 3) / 100)  # 1.9
    assert res["expected_head_dims"] == pytest.approx((40 * 4 + 30 * 12 + 30 * 28) / 100)
    assert cas.info["reached"] and cas.info["calib_accuracy"] == 1.0


def test_known_case_with_logits_gives_same_thresholds_as_probs():
    probs, y = known_case()
    a = fit_cascade(np.log(probs), y, NEST, tolerance=0.0)
    b = fit_cascade(probs, y, NEST, tolerance=0.0, kind="probs")
    np.testing.assert_allclose(a.thresholds, b.thresholds, rtol=1e-9)


def test_known_case_target_accuracy_spends_slack_on_the_smallest_prefix():
    probs, y = known_case()
    # Target 0.95: prefix 4 may also answer the 5 most confident wrong samples (ids 95..99).
    cas = fit_cascade(probs, y, NEST, target_accuracy=0.95, kind="probs")
    _, used = cas.predict(probs, kind="probs")
    assert (used == 4).sum() == 45 and set(np.flatnonzero(used == 4)[40:]) == set(range(95, 100))
    assert cas.evaluate(probs, y, kind="probs")["accuracy"] == pytest.approx(0.95)


def test_target_zero_answers_everything_at_the_smallest_prefix():
    probs, y = known_case()
    cas = fit_cascade(probs, y, NEST, target_accuracy=0.0, kind="probs")
    assert cas.thresholds[0] == 0.0
    assert cas.evaluate(probs, y, kind="probs")["expected_dims"] == 4


def test_unreachable_target_falls_back_to_full_size():
    probs, y = known_case()
    y2 = y.copy()
    y2[-1] = (y2[-1] + 2) % 4  # the full prefix is now wrong once: 99 % at best with it
    cas = fit_cascade(probs, y2, NEST, target_accuracy=1.0, kind="probs")
    assert cas.thresholds == (1.0, 1.0) and cas.info["reached"] is False


def _random_case(seed: int, G: int = 4, N: int = 300, C: int = 5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    logits = rng.normal(size=(G, N, C))
    for g in range(G):
        logits[g, np.arange(N), y] += 0.7 * (g + 1)
    logits = np.round(logits, 1)  # ties in confidence, to exercise the distinct-value cuts
    return logits, y


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tol", [-0.02, 0.0, 0.01, 0.05, 0.3])
@pytest.mark.parametrize("saturated", [False, True])
def test_fast_greedy_matches_brute_force_reference(seed, tol, saturated):
    nest = Nesting((2, 4, 8, 16))
    logits, y = _random_case(seed)
    if saturated:  # a 60-nat gap (max softmax exactly 1.0) for some samples at prefixes 4 and 8:
        # a threshold of 1 still stops them there, which the fast path once ignored
        rng = np.random.default_rng(seed + 100)
        for g in (1, 2):
            rows = rng.choice(len(y), size=len(y) // 4, replace=False)
            logits[g, rows, rng.integers(0, logits.shape[2], len(rows))] += 60.0
    conf, pred = confidence(logits, nest)
    correct = pred == y[None]
    target = correct[-1].mean() - tol
    dims = {}
    for start in range(4):
        fast = _greedy_thresholds(conf, correct, target, start)
        ref = fit_cascade_reference(logits, y, nest, target, start=start)
        np.testing.assert_allclose(fast, ref, rtol=0, atol=0)
        stop = _stop_index(conf, fast)
        if correct[stop, np.arange(len(y))].mean() >= target - 1e-12:
            dims[start] = np.asarray(nest.sizes)[stop].mean()
    cas = fit_cascade(logits, y, nest, tolerance=tol)
    if dims:  # the fit keeps the start with the fewest expected dims that reaches the target
        assert cas.info["calib_expected_dims"] == pytest.approx(min(dims.values()))
        assert cas.info["reached"] and cas.info["calib_accuracy"] >= target - 1e-12
    else:
        assert not cas.info["reached"]


def test_starting_later_beats_spending_the_slack_on_a_weak_first_prefix():
    """Prefix 4 is right on 5 and confidently wrong on 5 samples; prefix 8 is confidently wrong
    on 5 others and right on the rest. At a 95 % target the plain greedy answers 10 samples at 4
    and can then answer nothing at 8 (14.8 dims); starting at 8 answers all there (8 dims)."""
    n, c = 100, 4
    y = np.arange(n) % c
    probs = np.zeros((3, n, c))
    for i in range(n):
        wrong = (y[i] + 1) % c
        probs[0, i] = (_probs_row(y[i], 0.9 - 0.001 * i) if i < 5
                       else _probs_row(wrong, 0.9 - 0.001 * i) if i < 10
                       else _probs_row(wrong, 0.3))
        probs[1, i] = _probs_row(wrong, 0.95) if 10 <= i < 15 else _probs_row(y[i], 0.9)
        probs[2, i] = _probs_row(y[i], 0.6)
    conf, pred = confidence(probs, NEST, "probs")
    plain = _greedy_thresholds(conf, pred == y[None], 0.95, 0)
    assert np.asarray(NEST.sizes)[_stop_index(conf, plain)].mean() == pytest.approx(14.8)
    cas = fit_cascade(probs, y, NEST, target_accuracy=0.95, kind="probs")
    assert cas.thresholds == (1.0, 0.0)
    assert cas.info["calib_expected_dims"] == 8 and cas.info["calib_accuracy"] == 0.95


def test_predict_matches_per_sample_loop():
    nest = Nesting((2, 4, 8, 16))
    logits, _ = _random_case(3)
    cas = Cascade(nest, (0.7, 0.5, 0.9))
    conf, pred = confidence(logits, nest)
    labels, used = cas.predict(logits)
    for i in range(logits.shape[1]):
        g = next((g for g, t in enumerate(cas.thresholds) if conf[g, i] >= t), 3)
        assert used[i] == nest.sizes[g] and labels[i] == pred[g, i]


def test_threshold_one_answers_only_saturated_softmax_and_torch_input_works():
    logits = torch.zeros(2, 3, 3)
    logits[0, 0, 1] = 100.0  # saturated: max prob == 1.0 in float64
    logits[0, 1, 2] = 5.0
    cas = Cascade(Nesting((2, 4)), (1.0,))
    labels, used = cas.predict(logits)
    assert used.tolist() == [2, 4, 4] and labels[0] == 1


def test_budget_is_respected_and_more_budget_is_not_worse():
    nest = Nesting((2, 4, 8, 16))
    logits, y = _random_case(4)
    accs = []
    for budget in (2, 4, 6, 10, 16):
        cas = fit_cascade(logits, y, nest, budget=budget)
        assert cas.info["calib_expected_dims"] <= budget + 1e-9
        accs.append(cas.info["calib_accuracy"])
    assert accs == sorted(accs)


def test_oracle_smallest_right_prefix_else_full_size():
    probs, y = known_case()
    probs[2, 99] = _probs_row((y[99] + 1) % 4, 0.6)  # sample 99: wrong at every prefix
    labels, used = oracle(probs, y, NEST, kind="probs")
    np.testing.assert_array_equal(used, [4] * 40 + [8] * 30 + [16] * 30)
    assert labels[99] == (y[99] + 1) % 4 and (labels[:99] == y[:99]).all()


def test_cascade_costs_definitions():
    stop = np.array([0, 1, 2, 2])
    c = cascade_costs(stop, NEST)
    assert c == {
        "expected_dims": (4 + 8 + 16 + 16) / 4,
        "expected_heads": (1 + 2 + 3 + 3) / 4,
        "expected_head_dims": (4 + 12 + 28 + 28) / 4,
    }
    assert _stop_index(np.array([[0.5], [0.5], [0.1]]), (0.6, 0.5)).tolist() == [1]


# ----------------------------------------------------------------------------- save / load
def test_save_load_roundtrip_and_other_nesting(tmp_path):
    probs, y = known_case()
    cas = fit_cascade(probs, y, NEST, tolerance=0.0, kind="probs")
    path = tmp_path / "c.json"
    cas.save(path)
    back = Cascade.load(path, NEST)
    assert back == cas and back.info == cas.info
    with pytest.raises(
        ValueError, match=r"fitted for nesting \[4, 8, 16\].*nesting is \[4, 8, 32\]"
    ):
        Cascade.load(path, Nesting((4, 8, 32)))
    assert Cascade.load(path, [4, 8, 16]) == cas  # a plain list, as nestings go elsewhere
    with pytest.raises(ValueError, match=r"nesting is \[4, 8, 32\]"):
        Cascade.load(path, "4,8,32")
    with pytest.raises(FileNotFoundError, match="cascade file not found"):
        Cascade.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "mrl-cascade", "version": 99}')
    with pytest.raises(ValueError, match="version must be 1, got 99"):
        Cascade.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a cascade file"):
        Cascade.load(tmp_path / "other.json")


# ----------------------------------------------------------------------------- bad input
def test_bad_thresholds():
    with pytest.raises(ValueError, match=r"thresholds\[1\] must be in \[0, 1\], got 1.5"):
        Cascade(NEST, (0.5, 1.5))
    with pytest.raises(ValueError, match=r"thresholds\[0\] must be in \[0, 1\], got -0.1"):
        Cascade(NEST, (-0.1, 0.5))
    with pytest.raises(ValueError, match="thresholds must have G-1=2 entries"):
        Cascade(NEST, (0.5,))
    with pytest.raises(ValueError, match=r"thresholds\[0\] must be in \[0, 1\], got nan"):
        Cascade(NEST, (float("nan"), 0.5))


def test_bad_calibration_data():
    probs, y = known_case()
    with pytest.raises(ValueError, match="labels are required"):
        fit_cascade(probs, None, NEST, kind="probs")
    with pytest.raises(
        ValueError, match=r"labels must have shape \[N\]=\(100,\), got shape \(100, 1\)"
    ):
        fit_cascade(probs, y[:, None], NEST, kind="probs")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\), got 7"):
        fit_cascade(probs, np.where(np.arange(100) == 3, 7, y), NEST, kind="probs")
    with pytest.raises(ValueError, match=r"G=3 \(nesting \[4, 8, 16\]\).*got shape \(2, 100, 4\)"):
        fit_cascade(probs[:2], y, NEST, kind="probs")
    with pytest.raises(ValueError, match=r"shape \[G, N, C\].*got shape \(100, 4\)"):
        fit_cascade(probs[0], y, NEST, kind="probs")
    with pytest.raises(ValueError, match="probs must be non-negative with rows summing to 1"):
        fit_cascade(probs * 2, y, NEST, kind="probs")
    with pytest.raises(ValueError, match="kind must be one of"):
        fit_cascade(probs, y, NEST, kind="softmax")
    with pytest.raises(ValueError, match="not both"):
        fit_cascade(probs, y, NEST, tolerance=0.0, target_accuracy=0.9, kind="probs")
    with pytest.raises(ValueError, match=r"target_accuracy must be in \[0, 1\], got 95"):
        fit_cascade(probs, y, NEST, target_accuracy=95, kind="probs")
    with pytest.raises(
        ValueError, match=r"budget must be a finite number >= the smallest prefix \(4 dims\), got 2"
    ):
        fit_cascade(probs, y, NEST, budget=2, kind="probs")
    with pytest.raises(ValueError, match="logits must be finite"):
        fit_cascade(np.full((3, 100, 4), np.nan), y, NEST)
