"""Bad or unusual inputs to the evaluation functions: refused by name, or handled right.

Each of these once gave a wrong number without a word (a label array that broadcast, a kind
mismatch that made R = 0, -1 padding that picked up a gain, 2.5 draws recorded as 2) or a foreign
error (torch on a reversed numpy view, numpy on a string gain)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrl import Nesting
from mrl.baselines import PCA, random_features
from mrl.evaluate import evaluate_labelled, evaluate_ranking
from mrl.fewshot import few_shot_eval, long_tail_eval, ncm_accuracy
from mrl.metrics import label_relevance, qrels_relevance
from mrl.probe import fit_linear_probe, probe_top1
from mrl.similarity import prefix_topk


def _data(n: int = 40, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 3, n)


def test_probe_top1_refuses_test_labels_that_do_not_match_test_rows():
    x, y = _data()
    xt, yt = torch.from_numpy(x[:8]), torch.from_numpy(y[:8])
    args = (torch.from_numpy(x), torch.from_numpy(y), xt)
    with pytest.raises(ValueError, match=r"test_y must be \[8\].*got shape \(1,\)"):
        probe_top1(*args, yt[:1], Nesting((4, 8)), 3)
    with pytest.raises(ValueError, match=r"test_y must be \[8\].*got shape \(8, 1\)"):
        probe_top1(*args, yt[:, None], Nesting((4, 8)), 3)
    with pytest.raises(ValueError, match=r"test_x must be \[Q, 8\]"):
        probe_top1(args[0], args[1], xt[:, :4], yt, Nesting((4, 8)), 3)
    with pytest.raises(ValueError, match=r"num_classes must be an integer, got num_classes=3.0"):
        fit_linear_probe(args[0], args[1], 3.0)


def test_ncm_accuracy_refuses_labels_of_another_length():
    scores = np.random.default_rng(0).standard_normal((2, 15, 3))
    with pytest.raises(ValueError, match=r"query_labels must be \[Q\]"):
        ncm_accuracy(scores, np.array([0]))
    labels = scores[0].argmax(1)
    np.testing.assert_array_equal(ncm_accuracy(scores[:1], labels), [1.0])


def test_reversed_and_big_endian_arrays_are_read_as_their_values():
    x, y = _data()
    want = evaluate_labelled(x, y, x, y, [4, 8])
    for odd in (x.astype(">f4"), x[::-1].copy()[::-1]):
        assert not (odd.dtype.isnative and all(s >= 0 for s in odd.strides))
        got = evaluate_labelled(odd, y, odd, y, [4, 8])
        assert [r["value"] for r in got] == [r["value"] for r in want]
    s, i = prefix_topk(x[::-1], x, [8], 2)
    s2, i2 = prefix_topk(x[::-1].copy(), x, [8], 2)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_allclose(s, s2)
    np.testing.assert_allclose(PCA().fit(x[::-1]).components_, PCA().fit(x).components_,
                               atol=1e-10)  # fmt: skip


def test_center_given_as_a_string_is_named():
    x, y = _data()
    with pytest.raises(
        ValueError,
        match=r"center must be a \[8\] vector, True or None, "
        r"got center='mean'",
    ):
        evaluate_labelled(x, y, x, y, [4, 8], center="mean")
    # numpy's booleans are booleans
    for flag in (True, False):
        got = evaluate_labelled(x, y, x, y, [4, 8], center=np.bool_(flag))
        want = evaluate_labelled(x, y, x, y, [4, 8], center=flag)
        assert [r["value"] for r in got] == [r["value"] for r in want]


def test_ranking_qrels_with_a_bool_query_or_a_non_number_gain_are_named():
    x, _ = _data()
    with pytest.raises(ValueError, match=r"qrels query index must be in \[0, 40\), got True"):
        evaluate_ranking(x, x, {True: {3: 1.0}}, [4, 8], ks=(10,))
    for gain in ("1", None):
        with pytest.raises(ValueError, match=rf"qrels\[0\]\[3\] gain .* got {gain!r}"):
            evaluate_ranking(x, x, {0: {3: gain}}, [4, 8], ks=(10,))


def test_label_relevance_refuses_database_labels_of_another_kind():
    with pytest.raises(ValueError, match="db_labels"):
        label_relevance(np.array([[1, 2]]), np.array([1]), np.array(["1", "2"]))
    _, num = label_relevance(np.array([[1, 2]]), np.array([1]), np.array([1, 1, 2]))
    assert num.tolist() == [2]


def test_qrels_relevance_refuses_negative_doc_keys_and_float_indices():
    with pytest.raises(ValueError, match=r"qrels\[0\] doc positions must be >= 0, got -1"):
        qrels_relevance([[2, -1]], {0: {-1: 3.0, 2: 1.0}})
    with pytest.raises(ValueError, match="indices must be integer doc positions, got dtype float"):
        qrels_relevance(np.array([[1.7, 0.2]]), {0: {1: 1.0}})
    gains, _, _ = qrels_relevance([[2, -1]], {0: {2: 1.0}})  # -1 padding: gain 0
    assert gains.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"draws": 2.5}, r"draws must be an integer, got draws=2.5"),
        ({"draws": 0}, r"draws must be >= 1, got draws=0"),
        ({"seed": "a"}, r"seed must be an integer, got seed='a'"),
    ],
)
def test_few_shot_counts_must_be_whole(kwargs, message):
    x, y = _data(60)
    with pytest.raises(ValueError, match=message):
        few_shot_eval(x, y, x, y, Nesting((4, 8)), shots=(1,), **kwargs)


def test_long_tail_counts_must_be_whole():
    x, y = _data(60)
    for kwargs, message in (
        ({"num_tail": 1.5}, "num_tail must be an integer"),
        ({"head_shots": True}, "head_shots must be an integer"),
    ):
        with pytest.raises(ValueError, match=message):
            long_tail_eval(x, y, x, y, Nesting((4, 8)), tail_shots=(1,), **kwargs)
    recs = long_tail_eval(x, y, x, y, Nesting((4, 8)), tail_shots=(1,), num_tail=np.int64(1))
    assert {r["num_tail"] for r in recs} == {1}


def test_baseline_parameters_are_checked():
    x, _ = _data()
    with pytest.raises(ValueError, match=r"max_samples must be an integer, got max_samples=2.5"):
        PCA(max_samples=2.5)
    with pytest.raises(ValueError, match=r"centered must be True or False, got centered='no'"):
        PCA(centered="no")
    with pytest.raises(ValueError, match=r"x must be 2-D \[rows, dim\], got shape \(8,\)"):
        random_features(x[0])
    assert PCA(centered=np.bool_(False), max_samples=np.int64(10)).fit(x).max_samples == 10


def test_a_negative_label_is_named_by_its_value():
    x, y = _data(60)
    y[7] = -2
    with pytest.raises(ValueError, match=r"pool_labels must be non-negative integers, got -2 "
                                         r"\(row 7\)"):
        few_shot_eval(x, y, x, np.abs(y), Nesting((4, 8)), shots=(1,))
