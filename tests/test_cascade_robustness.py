"""Cascade evaluation inputs that were misread (context keys, one-shot tolerance iterators), the
curve's full-size end, logits files whose embeddings are not the samples', a cascade applied to
another class count, and few-shot arguments named by their parameter."""

from __future__ import annotations

import numpy as np
import pytest

from mrl.cascade import Cascade, evaluate_cascade, split_calibration
from mrl.cascade.runs import LogitsSet, load_logits, save_logits
from mrl.fewshot import few_shot_eval, long_tail_eval
from mrl.nesting import Nesting

NEST = Nesting((8, 16, 32))


def _logits(n: int = 400, c: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic logits [G, N, C]: the true class gets a margin that grows with the prefix."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(3, n, c))
    for g in range(3):
        logits[g, np.arange(n), y] += 1.0 + 0.8 * g
    return logits.astype(np.float32), y


def test_reserved_context_keys_are_refused():
    """seed=5 was read as context: seeds 0, 1, 2 ran and the averaged records said seed 5."""
    logits, y = _logits()
    for key in ("seed", "tolerance", "method", "value"):
        with pytest.raises(ValueError, match=f"evaluate_cascade sets \\['{key}'\\] itself"):
            evaluate_cascade(logits, y, NEST, seeds=(0,), **{key: 5})
    recs, _ = evaluate_cascade(logits, y, NEST, seeds=(0, 1), dataset="synth")
    assert {r["dataset"] for r in recs} == {"synth"}


def test_tolerances_are_read_once_for_every_seed():
    """A generator served seed 0 only: curves of 3, 0, 0 points averaged as three seeds."""
    logits, y = _logits()
    _, summ = evaluate_cascade(logits, y, NEST, seeds=(0, 1, 2),
                               tolerances=(t for t in (0.0, 0.005, 0.02)))  # fmt: skip
    assert [len(s["curve"]) for s in summ] == [4, 4, 4]  # three fitted points + the full size
    for bad, says in ((0.005, "must be a sequence"), ((), "must not be empty"),
                      ((0.01, 0.01), "must be distinct"), (("x",), "must be a number")):
        with pytest.raises(ValueError, match=f"tolerances {says}"):
            evaluate_cascade(logits, y, NEST, seeds=(0,), tolerances=bad)


def test_the_curve_ends_at_the_full_size():
    """No fitted point reached the full-size accuracy on seed 1, so "dims to match" was None
    although answering every sample at 32 dims matches it exactly."""
    logits, y = _logits()
    _, summ = evaluate_cascade(logits, y, NEST, seeds=(1,))
    s = summ[0]
    end = [p for p in s["curve"] if p["tolerance"] is None]
    assert len(end) == 1
    _, tst = split_calibration(len(y), 0.5, 1)
    full = float((logits[-1, tst].argmax(1) == y[tst]).mean())
    assert end[0]["accuracy"] == full == s["own_reference_test_accuracy"]
    assert end[0]["expected_dims"] == 32 and end[0]["expected_head_dims"] == 8 + 16 + 32
    assert s["cascade_dims_to_match"] is not None
    assert s["cascade_dims_to_match"] <= 32


def test_logits_file_embeddings_must_be_the_samples(tmp_path):
    """2N shuffled rows gave few-shot accuracy 0.21 instead of 0.93, without a word."""
    logits, y = _logits()
    for emb in (np.zeros((800, 32)), np.zeros(400), np.zeros((400, 20))):
        with pytest.raises(ValueError, match=r"embeddings must be \[N=400, D >= 32\]"):
            LogitsSet(logits, y, NEST, emb.astype(np.float32))
    with pytest.raises(ValueError, match="meta 'ff_dim' must be a positive int"):
        LogitsSet(logits, y, NEST, None, {"ff_dim": 8.7})  # was used as FF-8
    data = LogitsSet(logits, y, NEST, np.zeros((400, 32), np.float32), {"ff_dim": 8})
    save_logits(tmp_path / "x.npz", data)
    assert load_logits(tmp_path / "x.npz").size == 8


def test_a_cascade_fitted_on_other_classes_is_refused():
    logits, y = _logits()
    cas = Cascade(NEST, (0.9, 0.9), {"num_classes": 5})
    assert 0 <= cas.evaluate(logits, y)["accuracy"] <= 1
    other, y30 = _logits(c=30)
    for call in (lambda: cas.evaluate(other, y30), lambda: cas.predict(other),
                 lambda: cas.stop_index(other)):  # fmt: skip
        with pytest.raises(ValueError, match="fitted on logits of 5 classes; these have 30"):
            call()


def test_few_shot_arguments_are_named():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 32))
    y = np.repeat(np.arange(3), 20)
    for kw, says in (({"shots": 5}, "shots must be a sequence"),
                     ({"shots": (float("nan"),)}, "shots must be positive integers"),
                     ({"seed": -1}, "seed must be >= 0"),
                     ({"center": "no"}, "center must be True or False")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            few_shot_eval(x, y, x, y, NEST, draws=1, **kw)
    with pytest.raises(ValueError, match="query_labels must have one label per row"):
        few_shot_eval(x, y, x, y[:10], NEST, shots=(1,), draws=1)
    with pytest.raises(ValueError, match="tail_shots must be a sequence"):
        long_tail_eval(x, y, x, y, NEST, tail_shots=1, draws=1)
    five = {r["method"] for r in few_shot_eval(x, y, x, y, NEST, shots=(5,), draws=1)}
    for n in (5.0, np.int64(5)):  # 5.0 named its records ncm_5.0shot
        if isinstance(n, float):
            with pytest.raises(ValueError, match="shots must be positive integers"):
                few_shot_eval(x, y, x, y, NEST, shots=(n,), draws=1)
        else:
            assert {r["method"] for r in few_shot_eval(x, y, x, y, NEST, shots=(n,),
                                                       draws=1)} == five  # fmt: skip
