"""Few-shot / long-tail NCM at every prefix: one-pass scores vs reference, known answers, errors."""

from __future__ import annotations

import numpy as np
import pytest

from mrl import Nesting
from mrl.fewshot import (
    class_means,
    few_shot_eval,
    long_tail_eval,
    ncm_accuracy,
    ncm_scores,
    ncm_scores_reference,
    sample_support,
)

NEST = Nesting((2, 4, 8))


def separable_in_second_chunk(n_per_class: int = 20, C: int = 4, seed: int = 0):
    """Dims 0..1 are pure noise; dims 2..5 hold a one-hot class code (+ small noise); 6..7 noise.
    So prefix 2 is at chance, prefixes 4 (partly) and 8 separate the classes."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n_per_class)
    x = rng.normal(scale=0.05, size=(len(y), 8))
    x[:, :2] = rng.normal(size=(len(y), 2))
    x[np.arange(len(y)), 2 + y] += 3.0
    return x, y


@pytest.mark.parametrize("center", [False, True])
def test_one_pass_scores_match_per_prefix_reference(center):
    rng = np.random.default_rng(1)
    xs, ys = rng.normal(size=(30, 8)) + 0.5, np.arange(30) % 5
    q = rng.normal(size=(11, 8)) + 0.5
    fast = ncm_scores(xs, ys, q, NEST, center=center)
    ref = ncm_scores_reference(xs, ys, q, NEST, center=center)
    assert fast.shape == (3, 11, 5)
    np.testing.assert_allclose(fast, ref, rtol=1e-10, atol=1e-12)


def test_means_of_prefixes_are_prefixes_of_means():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 8)), np.arange(40) % 4
    full = class_means(x, y, 4)
    for m in NEST.sizes:
        np.testing.assert_allclose(class_means(x[:, :m], y, 4), full[:, :m])


def test_known_answer_noise_prefix_is_at_chance_informative_prefix_is_perfect():
    x, y = separable_in_second_chunk()
    q, qy = separable_in_second_chunk(seed=5)
    acc = ncm_accuracy(ncm_scores(x, y, q, NEST), qy)
    assert acc[2] == 1.0 and acc[0] < 0.6  # 4 classes: chance is 0.25


def test_few_shot_records_and_one_shot_is_enough_on_separable_data():
    x, y = separable_in_second_chunk()
    q, qy = separable_in_second_chunk(seed=5)
    recs = few_shot_eval(x, y, q, qy, NEST, shots=(1, 5), draws=3, seed=0, dataset="toy")
    assert {(r["metric"], r["prefix"]) for r in recs} == {
        (f"ncm_{n}shot", m) for n in (1, 5) for m in (2, 4, 8)
    }
    full = {r["metric"]: r["value"] for r in recs if r["prefix"] == 8}
    assert full == {"ncm_1shot": 1.0, "ncm_5shot": 1.0}
    assert all(r["draws"] == 3 and r["dataset"] == "toy" and r["method"] == "mrl" for r in recs)
    again = few_shot_eval(x, y, q, qy, NEST, shots=(1, 5), draws=3, seed=0, dataset="toy")
    assert again == recs  # seeded


def test_sample_support_counts_and_errors():
    y = np.repeat(np.arange(3), 5)
    idx = sample_support(y, {0: 2, 1: 5, 2: None}, np.random.default_rng(0))
    assert np.bincount(y[idx]).tolist() == [2, 5, 5] and len(set(idx.tolist())) == 12
    with pytest.raises(ValueError, match="class 1 has 5 pool examples, fewer than shots=6"):
        sample_support(y, {1: 6}, np.random.default_rng(0))


def test_long_tail_head_and_tail_parts():
    x, y = separable_in_second_chunk(n_per_class=30, C=6)
    q, qy = separable_in_second_chunk(n_per_class=10, C=6, seed=3)
    recs = long_tail_eval(x, y, q, qy, NEST, tail_shots=(1,), num_tail=2, head_shots=20, draws=2)
    metrics = {r["metric"] for r in recs}
    assert metrics == {"lt1_all", "lt1_head", "lt1_tail"}
    by = {(r["metric"], r["prefix"]): r["value"] for r in recs}
    assert by[("lt1_all", 8)] == 1.0
    # all = weighted mean of head (4 classes) and tail (2 classes), equal query counts per class
    assert by[("lt1_all", 2)] == pytest.approx(
        (4 * by[("lt1_head", 2)] + 2 * by[("lt1_tail", 2)]) / 6
    )


def test_long_tail_head_classes_with_fewer_than_head_shots_use_all_they_have():
    # 30 pool examples per class, default head_shots=100: the head takes all 30 (as documented),
    # which equals head_shots=None; a class too small for a tail draw names tail_shots.
    x, y = separable_in_second_chunk(n_per_class=30, C=6)
    q, qy = separable_in_second_chunk(n_per_class=10, C=6, seed=3)
    default = long_tail_eval(x, y, q, qy, NEST, tail_shots=(1, 5), draws=2)
    every = long_tail_eval(x, y, q, qy, NEST, tail_shots=(1, 5), draws=2, head_shots=None)
    assert [r["value"] for r in default] == [r["value"] for r in every]
    with pytest.raises(ValueError, match=r"tail_shots=\[1, 40\]: class 0 has only 30 pool"):
        long_tail_eval(x, y, q, qy, NEST, tail_shots=(1, 40))


def test_bad_input_messages():
    x, y = separable_in_second_chunk()
    with pytest.raises(ValueError, match=r"shots must be positive integers, got \[0\]"):
        few_shot_eval(x, y, x, y, NEST, shots=(0,))
    with pytest.raises(ValueError, match="draws must be >= 1, got draws=0"):
        few_shot_eval(x, y, x, y, NEST, draws=0)
    with pytest.raises(ValueError, match=r"num_tail must be in \[1, 3\] for 4 classes, got 4"):
        long_tail_eval(x, y, x, y, NEST, num_tail=4)
    with pytest.raises(ValueError, match="head_shots must be >= 1, got head_shots=-1"):
        long_tail_eval(x, y, x, y, NEST, head_shots=-1)
    with pytest.raises(ValueError, match=r"classes \[3\] have none"):  # NaN tail accuracy before
        long_tail_eval(x, y, x[y < 3], y[y < 3], NEST, head_shots=5)
    with pytest.raises(ValueError, match="pool have dimension 6, but the nesting"):
        few_shot_eval(x[:, :6], y, x, y, NEST)
    with pytest.raises(ValueError, match=r"pool_labels must have one label per row of pool \(80\)"):
        few_shot_eval(x, y[:5], x, y, NEST)
    with pytest.raises(
        ValueError, match=r"every class needs a support example, got none for classes \[3\]"
    ):
        ncm_scores(x[y < 3], y[y < 3], x, NEST, num_classes=4)


def test_fewshot_inputs_named_precisely():
    from mrl.fewshot import few_shot_eval, ncm_scores

    n = Nesting((2, 4))
    x = np.random.default_rng(0).normal(size=(6, 4))
    y = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"support_labels must be < num_classes=2, got label 2"):
        ncm_scores(x, y, x, n, num_classes=2)  # was a raw IndexError
    with pytest.raises(ValueError, match=r"query_labels hold classes with no example in "
                                         r"pool_labels: \[7\]"):
        few_shot_eval(x, y, x[:1], np.array([7]), n, shots=(1,))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="support must be finite, row 3 has NaN"):
        ncm_scores(bad, y, x, n)


def test_labels_that_skip_a_class_are_the_same_task_relabelled():
    """Labels 0, 2, 5 asked for a support of classes 1, 3, 4 that no data has ("class 1 has 0
    pool examples") instead of scoring the three classes there are."""
    x, y = separable_in_second_chunk(C=3)
    q, qy = separable_in_second_chunk(C=3, seed=5)
    names = np.array([0, 2, 5])
    kw = dict(shots=(1, 5), draws=3, seed=0)
    assert few_shot_eval(x, names[y], q, names[qy], NEST, **kw) == few_shot_eval(
        x, y, q, qy, NEST, **kw)
    kw = dict(tail_shots=(1,), num_tail=1, head_shots=5, draws=2, seed=0)
    assert long_tail_eval(x, names[y], q, names[qy], NEST, **kw) == long_tail_eval(
        x, y, q, qy, NEST, **kw)
    with pytest.raises(ValueError, match=r"classes \[5\] have none"):  # named as given
        long_tail_eval(x, names[y], q[qy < 2], names[qy[qy < 2]], NEST, **kw)
    keep = np.ones(len(y), bool)
    keep[np.flatnonzero(y == 1)[5:]] = False  # label 1, named 2, keeps 5 pool examples
    with pytest.raises(ValueError, match=r"class 2 has 5 pool examples, fewer than shots=6"):
        few_shot_eval(x[keep], names[y[keep]], q, names[qy], NEST, shots=(6,), draws=1)
