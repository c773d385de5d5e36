"""evaluate_labelled / evaluate_ranking against brute-force per-prefix computations; baselines."""

import numpy as np
import pytest
import torch

from mrl import Nesting
from mrl.baselines import PCA, random_features, random_permutation
from mrl.evaluate import evaluate_labelled, evaluate_ranking
from mrl.records import validate_records


def _clustered(n=120, q=30, d=16, classes=4, seed=0):
    """Class centroids + noise (continuous: no score ties); queries from the same distribution."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(classes, d)) * 2
    ydb, yq = rng.integers(0, classes, n), rng.integers(0, classes, q)
    db = (centroids[ydb] + rng.normal(size=(n, d)) + 1).astype(np.float32)
    qs = (centroids[yq] + rng.normal(size=(q, d)) + 1).astype(np.float32)
    return db, ydb, qs, yq


def _value(records, method, prefix, metric):
    (r,) = [
        r for r in records if (r["method"], r["prefix"], r["metric"]) == (method, prefix, metric)
    ]
    return r["value"]


def _brute_labelled(db, ydb, qs, yq, m, k, center=None, exclude_self=False):
    """1-NN / mAP@k / P@k at prefix m by a plain loop over queries."""
    if center is not None:
        db, qs = db - center, qs - center
    d, q = db[:, :m], qs[:, :m]
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    nn, aps, ps = [], [], []
    for i in range(len(q)):
        s = d @ q[i]
        if exclude_self:
            s[i] = -np.inf
        order = np.argsort(-s, kind="stable")[:k]
        rel = ydb[order] == yq[i]
        R = (ydb == yq[i]).sum() - int(exclude_self)
        hits = np.cumsum(rel)
        ap = sum(hits[j] / (j + 1) for j in range(k) if rel[j]) / min(k, R) if R else 0.0
        nn.append(rel[0])
        aps.append(ap)
        ps.append(rel.mean())
    return np.mean(nn), np.mean(aps), np.mean(ps)


@pytest.mark.parametrize("center", [False, True])
def test_labelled_matches_brute_force(center):
    db, ydb, qs, yq = _clustered()
    n = Nesting((2, 4, 8, 16))
    recs = evaluate_labelled(db, ydb, qs, yq, n, k=5, center=center, context={"dataset": "toy"})
    validate_records(recs)
    assert len(recs) == 4 * 3
    assert {r["metric"] for r in recs} == {"1nn", "map@5", "p@5"}
    assert all(r["dataset"] == "toy" and r["k"] == 5 and r["n_db"] == 120 for r in recs)
    c = db.mean(0) if center else None
    for m in n.sizes:
        nn, mp, p = _brute_labelled(db, ydb, qs, yq, m, 5, center=c)
        assert _value(recs, "mrl", m, "1nn") == pytest.approx(nn)
        assert _value(recs, "mrl", m, "map@5") == pytest.approx(mp)
        assert _value(recs, "mrl", m, "p@5") == pytest.approx(p)


def test_labelled_exclude_self_leave_one_out():
    db, ydb, _, _ = _clustered(n=60)
    recs = evaluate_labelled(db, ydb, db, ydb, [4, 16], k=3, exclude_self=True)
    for m in (4, 16):
        nn, mp, p = _brute_labelled(db, ydb, db, ydb, m, 3, exclude_self=True)
        assert _value(recs, "mrl", m, "1nn") == pytest.approx(nn)
        assert _value(recs, "mrl", m, "map@3") == pytest.approx(mp)
    # without exclusion every item finds itself: 1-NN is trivially 1
    recs = evaluate_labelled(db, ydb, db, ydb, [16], k=3)
    assert _value(recs, "mrl", 16, "1nn") == 1.0


def test_baselines_in_the_same_call():
    db, ydb, qs, yq = _clustered()
    n = Nesting((4, 16))
    recs = evaluate_labelled(
        db, ydb, qs, yq, n, k=5, baselines=("pca", "random", "pca_uncentered"), seed=3
    )
    assert {r["method"] for r in recs} == {"mrl", "pca", "random", "pca_uncentered"}
    # random features = the embedding with permuted coordinates, evaluated the same way
    perm = random_permutation(16, 3)
    direct = evaluate_labelled(db[:, perm], ydb, qs[:, perm], yq, n, k=5, method="random")
    for m in n.sizes:
        assert _value(recs, "random", m, "map@5") == _value(direct, "random", m, "map@5")
    # at full size, PCA is a rotation of the centred data: cosine on centred data is unchanged
    full_c = evaluate_labelled(db - db.mean(0), ydb, qs - db.mean(0), yq, n, k=5)
    assert _value(recs, "pca", 16, "1nn") == pytest.approx(_value(full_c, "mrl", 16, "1nn"))


def test_pca_matches_sklearn_and_random_features():
    from sklearn.decomposition import PCA as SkPCA

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    ours = PCA().fit(x)
    sk = SkPCA().fit(x)
    np.testing.assert_allclose(ours.explained_variance_.numpy(), sk.explained_variance_, rtol=1e-8)
    # same directions up to sign
    np.testing.assert_allclose(
        np.abs(ours.components_.numpy() @ sk.components_.T), np.eye(6), atol=1e-8
    )
    z = ours.transform(x)
    assert isinstance(z, np.ndarray) and z.shape == (200, 6)
    assert np.all(np.diff(z.var(0)) <= 1e-9)  # most variance first
    zt = PCA(centered=False).fit_transform(torch.from_numpy(x))
    assert isinstance(zt, torch.Tensor)
    p = random_permutation(6, seed=1)
    assert sorted(p.tolist()) == list(range(6))
    np.testing.assert_array_equal(random_features(x, seed=1), x[:, p])
    with pytest.raises(ValueError, match=r"x must have dimension 6 .*got shape \(2, 5\)"):
        ours.transform(x[:2, :5])


def test_ranking_matches_hand_computation():
    rng = np.random.default_rng(1)
    docs = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    qrels = {0: {3: 2, 7: 1}, 2: {10: 1}, 4: {1: 0, 2: 3}}
    recs = evaluate_ranking(queries, docs, qrels, [4, 8], ks=(2, 10), baselines=("pca",))
    validate_records(recs)
    assert {r["metric"] for r in recs} == {"ndcg@2", "ndcg@10", "recall@2", "recall@10", "mrr"}
    assert all(r["n_queries"] == 3 for r in recs)
    for m in (4, 8):
        d = docs[:, :m] / np.linalg.norm(docs[:, :m], axis=1, keepdims=True)
        ndcg, rec, rr = [], [], []
        for qid, judged in qrels.items():
            q = queries[qid, :m] / np.linalg.norm(queries[qid, :m])
            order = np.argsort(-(d @ q), kind="stable")[:10]
            g = np.array([judged.get(int(i), 0) for i in order], dtype=float)
            disc = 1 / np.log2(np.arange(2, 12))
            ideal = np.sort(list(judged.values()))[::-1]
            ndcg.append((g * disc).sum() / (ideal * disc[: len(ideal)]).sum())
            rel = sum(v > 0 for v in judged.values())
            rec.append((g > 0).sum() / rel)
            rr.append(1 / (np.argmax(g > 0) + 1) if (g > 0).any() else 0)
        assert _value(recs, "mrl", m, "ndcg@10") == pytest.approx(np.mean(ndcg))
        assert _value(recs, "mrl", m, "recall@10") == pytest.approx(np.mean(rec))
        assert _value(recs, "mrl", m, "mrr") == pytest.approx(np.mean(rr))


def test_mrl_prefix_quality_improves_with_size():
    db, ydb, qs, yq = _clustered(n=300, q=100, d=32, classes=6)
    recs = evaluate_labelled(db, ydb, qs, yq, Nesting.doubling(1, 32), k=10, center=True)
    assert _value(recs, "mrl", 32, "map@10") > _value(recs, "mrl", 1, "map@10")


@pytest.mark.parametrize(
    "change,match",
    [
        (
            dict(db=np.full((4, 16), np.nan, np.float32)),
            r"db must be finite, got nan at index \(0, 0\)",
        ),
        (dict(queries=np.full((3, 16), np.inf, np.float32)), r"queries must be finite, got inf"),
        (
            dict(db_labels=np.zeros(5)),
            r"db_labels must have one label per row of db \(120\), got 5",
        ),
        (
            dict(query_labels=np.zeros(2)),
            r"query_labels must have one label per row of queries \(30\), got 2",
        ),
        (
            dict(queries=np.zeros((3, 8), np.float32)),
            r"same dimension, got queries \(3, 8\) and db \(120, 16\)",
        ),
        (dict(db=np.zeros((0, 16), np.float32)), r"db must not be empty, got shape \(0, 16\)"),
        (dict(k=500), r"k must be <= number of database items \(120\), got k=500"),
        (dict(nesting=[8, 32]), r"nesting prefix 32 is larger than the embedding dimension 16"),
        (dict(nesting=[8, 4]), r"strictly increasing"),
        (dict(baselines=("svd",)), r"baselines must be among .*got 'svd'"),
        (dict(exclude_self=True), r"exclude_self needs the queries to be the database rows"),
        (dict(center=np.zeros(3)), r"center must have one entry per dimension \(16\), got 3"),
    ],
)
def test_labelled_bad_input(change, match):
    db, ydb, qs, yq = _clustered()
    if "db" in change and "db_labels" not in change:
        change["db_labels"] = np.zeros(len(change["db"]))
    kw = dict(db=db, db_labels=ydb, queries=qs, query_labels=yq, nesting=[4, 16])
    kw.update(change)
    args = [kw.pop(a) for a in ("db", "db_labels", "queries", "query_labels", "nesting")]
    with pytest.raises(ValueError, match=match):
        evaluate_labelled(*args, **kw)


@pytest.mark.parametrize(
    "qrels,kw,match",
    [
        ({}, {}, r"qrels must be a non-empty mapping"),
        ({7: {1: 1}}, {}, r"qrels query index must be in \[0, 5\), got 7"),
        ({0: {99: 1}}, {}, r"qrels\[0\] doc index must be in \[0, 50\), got 99"),
        ({0: {1: float("nan")}}, {}, r"qrels\[0\]\[1\] gain must be finite and >= 0, got nan"),
        ({0: {1: 1}}, dict(ks=(10, 60)), r"ks must be <= number of docs \(50\), got k=60"),
        ({0: {1: 1}}, dict(ks=(0,)), r"ks must be positive integers, got ks=\(0,\)"),
    ],
)
def test_ranking_bad_input(qrels, kw, match):
    rng = np.random.default_rng(0)
    docs, queries = rng.normal(size=(50, 8)), rng.normal(size=(5, 8))
    with pytest.raises(ValueError, match=match):
        evaluate_ranking(queries, docs, qrels, [8], **{"ks": (10,), **kw})
