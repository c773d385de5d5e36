"""Metrics against hand-computed cases and scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, ndcg_score

from mrl.metrics import (
    accuracy,
    average_precision_at_k,
    knn_accuracy,
    knn_predict,
    label_relevance,
    map_at_k,
    mrr,
    ndcg_at_k,
    precision_at_k,
    qrels_relevance,
    recall_at_k,
)


def test_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    p, t = rng.integers(0, 4, 100), rng.integers(0, 4, 100)
    assert accuracy(p, t) == pytest.approx(accuracy_score(t, p))


def test_knn_majority_vote_and_ties():
    labels = np.array([[3, 1, 1, 2, 2], [5, 6, 7, 5, 6], [0, 0, 9, 9, 9]])
    assert knn_predict(labels, 1).tolist() == [3, 5, 0]
    assert knn_predict(labels, 3).tolist() == [1, 5, 0]  # row 1: 3-way tie -> nearest (5)
    assert knn_predict(labels, 5).tolist() == [1, 5, 9]  # row 0: 1 vs 2 tie -> 1 (nearer)
    assert knn_accuracy(labels, [1, 5, 0], k=3) == 1.0
    assert knn_accuracy(labels, [3, 6, 0], k=1) == pytest.approx(2 / 3)


def test_precision_recall_mrr_by_hand():
    rel = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=bool)
    num = np.array([2, 4, 0])
    assert precision_at_k(rel, 2, reduce="none").tolist() == [0.5, 0, 0]
    assert precision_at_k(rel, 4) == pytest.approx((2 / 4 + 1 / 4) / 3)
    assert recall_at_k(rel, num, 3, reduce="none").tolist() == [1.0, 0.0, 0.0]
    assert recall_at_k(rel, num, 4, reduce="none").tolist() == [1.0, 0.25, 0.0]
    assert mrr(rel, reduce="none").tolist() == [1.0, 0.25, 0.0]
    assert mrr(rel, k=3, reduce="none").tolist() == [1.0, 0.0, 0.0]


def test_average_precision_formulas_by_hand():
    rel = np.array([[1, 0, 1, 0, 0]])
    # hits at ranks 1 and 3: P@1 = 1, P@3 = 2/3, sum = 5/3
    assert average_precision_at_k(rel, [2], 5)[0] == pytest.approx((5 / 3) / 2)
    assert average_precision_at_k(rel, [10], 5)[0] == pytest.approx((5 / 3) / 5)  # min(k, R) = 5
    assert average_precision_at_k(rel, None, 5, normalize="k")[0] == pytest.approx((5 / 3) / 5)
    assert average_precision_at_k(rel, [2], 3, normalize="k")[0] == pytest.approx((5 / 3) / 3)
    assert average_precision_at_k(np.ones((1, 4)), [4])[0] == 1.0  # perfect ranking
    assert average_precision_at_k(np.zeros((1, 4)), [0])[0] == 0.0  # nothing relevant
    assert map_at_k(np.array([[1, 0], [0, 1]]), [1, 1]) == pytest.approx((1 + 0.5) / 2)


def test_average_precision_matches_sklearn_when_all_relevant_retrieved():
    # With the full ranking retrieved (k = N), standard AP@N is scikit-learn's average precision.
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 2, 30)
        y[0] = 1
        score = rng.random(30)
        order = np.argsort(-score)
        ours = average_precision_at_k(y[order][None], [y.sum()])[0]
        assert ours == pytest.approx(average_precision_score(y, score))


def test_ndcg_matches_sklearn_graded():
    rng = np.random.default_rng(2)
    for k in (1, 5, 30):
        y = rng.integers(0, 4, (10, 30)).astype(float)
        score = rng.random((10, 30))
        order = np.argsort(-score, axis=1)
        gains = np.take_along_axis(y, order, 1)
        ours = ndcg_at_k(gains, y, k)  # ideal from all judged gains of the query
        assert ours == pytest.approx(ndcg_score(y, score, k=k))


def test_ndcg_by_hand_with_unretrieved_relevant():
    # retrieved gains 0, 3; judged gains {3, 2}; DCG = 3/log2(3); IDCG = 3 + 2/log2(3)
    val = ndcg_at_k(np.array([[0.0, 3.0]]), [[3.0, 2.0]], 2)
    assert val == pytest.approx((3 / np.log2(3)) / (3 + 2 / np.log2(3)))
    assert ndcg_at_k(np.array([[0.0, 0.0]]), [[]]) == 0.0


def test_label_relevance_counts_and_exclude_self():
    rel, num = label_relevance([[1, 2], [2, 2]], [1, 2], db_labels=[1, 1, 2, 2, 2, 3])
    assert rel.tolist() == [[True, False], [True, True]]
    assert num.tolist() == [2, 3]
    _, num = label_relevance([[1, 2]], [7], db_labels=[1, 2])
    assert num.tolist() == [0]
    _, num = label_relevance([[1, 2]], [1], db_labels=[1, 1, 2], exclude_self=True)
    assert num.tolist() == [1]


def test_qrels_relevance():
    qrels = {0: {5: 2, 7: 1, 9: 0}, 1: {3: 1}}
    gains, num, ideal = qrels_relevance([[7, 1, 5], [3, 4, 5]], qrels)
    assert gains.tolist() == [[1, 0, 2], [1, 0, 0]]
    assert num.tolist() == [2, 1]
    assert sorted(ideal[0].tolist()) == [0, 1, 2]
    assert recall_at_k(gains, num, 3) == 1.0


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: precision_at_k(np.ones((2, 3)), 4),
            r"k must be <= the number of retrieved items per query \(3\), got k=4",
        ),
        (lambda: precision_at_k(np.ones((2, 3)), 0), r"k must be >= 1, got k=0"),
        (lambda: precision_at_k(np.ones(3)), r"relevance must be 2-D, got shape \(3,\)"),
        (lambda: precision_at_k(np.ones((0, 3))), r"relevance must not be empty"),
        (lambda: precision_at_k(np.full((1, 2), np.nan)), r"relevance must be finite, got nan"),
        (lambda: ndcg_at_k(-np.ones((1, 2)), [[1]]), r"gains must be >= 0, got -1"),
        (
            lambda: recall_at_k(np.ones((2, 3)), [1]),
            r"num_relevant must have one entry per query \(2\), got 1",
        ),
        (lambda: average_precision_at_k(np.ones((1, 3))), r"num_relevant is required"),
        (
            lambda: average_precision_at_k(np.ones((1, 3)), [1], normalize="R"),
            r"normalize must be one of .*'R'",
        ),
        (lambda: accuracy([1, 2], [1]), r"same length, got 2 and 1"),
        (
            lambda: knn_accuracy([[1, 2]], [1, 2]),
            r"query_labels must have one entry per query \(1\), got 2",
        ),
        (
            lambda: knn_predict([[1, 2]], 3),
            r"k must be <= the number of neighbours given \(2\), got k=3",
        ),
        (
            lambda: ndcg_at_k(np.ones((2, 2)), [[1]]),
            r"ideal_gains must have one entry per query \(2\), got 1",
        ),
        (
            lambda: mrr(np.ones((1, 2)), reduce="sum"),
            r"reduce must be 'mean' or 'none', got reduce='sum'",
        ),
    ],
)
def test_bad_input_messages(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_rankings_that_disagree_with_their_judgments_are_refused():
    # A metric above 1 used to be reported when rel and num_relevant / ideal_gains disagreed.
    from mrl.metrics import average_precision_at_k, ndcg_at_k, recall_at_k

    rel = np.array([[1, 1, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match=r"query 0 has 2 relevant items .* num_relevant\[0\] = 1"):
        recall_at_k(rel, [1, 1])
    with pytest.raises(ValueError, match="query 0 has 2 relevant items"):
        average_precision_at_k(rel, [1, 3])
    assert recall_at_k(rel, [2, 1]) == 1.0
    with pytest.raises(ValueError, match="query 1: the gains retrieved .* exceed its ideal_gains"):
        ndcg_at_k(np.array([[2.0, 1.0], [3.0, 0.0]]), [[2, 1], [1]])
    assert ndcg_at_k(np.array([[2.0, 1.0]]), [[2, 1]]) == pytest.approx(1.0)


def test_labels_of_two_kinds_are_refused():
    """'1' never equals 1: mixed kinds scored 0 without a word."""
    from mrl.metrics import accuracy, label_relevance

    with pytest.raises(ValueError, match=r"pred \(strings, dtype <U1\) and target \(numbers, "
                       r"dtype int64\) must be labels of one kind"):  # fmt: skip
        accuracy(np.array(["1", "2"]), np.array([1, 2]))
    with pytest.raises(ValueError, match="retrieved_labels .* and query_labels .* one kind"):
        label_relevance(np.array([["a", "b"]]), np.array([0]))
    assert accuracy(np.array([1.0, 2.0]), np.array([1, 3])) == 0.5  # numbers of two dtypes: fine


def test_qrels_keyed_otherwise_than_the_rows_are_refused():
    from mrl.metrics import qrels_relevance

    idx = np.array([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"no query id of the rows \(\[0, 1\]\.\.\.\) is a key"):
        qrels_relevance(idx, {"q0": {1: 1.0}})
    with pytest.raises(ValueError, match=r"qrels\[0\] must be keyed by doc positions .* got 'd1'"):
        qrels_relevance(idx, {0: {"d1": 1.0}})
    with pytest.raises(ValueError, match="qrels must be a mapping"):
        qrels_relevance(idx, [{0: 1.0}])
    gains, num, _ = qrels_relevance(idx, {"q0": {1: 2.0}}, query_ids=["q0", "q1"])
    assert gains.tolist() == [[0.0, 2.0], [0.0, 0.0]] and num.tolist() == [1.0, 0.0]


def test_evaluate_labelled_refuses_mixed_label_kinds_before_searching():
    from mrl.evaluate import evaluate_labelled

    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    y = np.arange(20) % 4
    with pytest.raises(ValueError, match="db_labels .* and query_labels .* one kind"):
        evaluate_labelled(x, y.astype(str), x[:5], y[:5], "4,8")


def test_label_kinds_of_object_arrays_come_from_their_elements():
    from mrl.metrics import accuracy

    ints = np.array([0, 1, 2], dtype=object)  # e.g. a pandas object column of ints
    assert accuracy(ints, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="pred .*numbers.* and target .*strings.* one kind"):
        accuracy(np.array([1, 2], dtype=object), np.array(["1", "2"]))
    with pytest.raises(ValueError, match="pred .*bytes.* and target .*strings.* one kind"):
        accuracy(np.array([b"a"]), np.array(["a"]))
    mixed = np.array([1, "a"], dtype=object)  # no one kind: compared as they are
    assert accuracy(mixed, np.array([1, "b"], dtype=object)) == 0.5
