"""Cross-checks of the evaluation metrics against independent, plainly written references.

Every reference below is a per-query Python loop written from the documented formula
(docs/core-eval.md), not a call into `mrl`: AP@k with Z = min(k, R) or k, recall@k, P@k, MRR,
nDCG@k (linear gain, log2 discount, IDCG from all judged gains), k-NN majority vote, cosine at a
re-normalised prefix. Inputs are random and adversarial: ties, repeated documents, queries with
nothing relevant, graded (Cranfield-style) gains, k as large as the corpus, one query,
float16/float32/float64, centring.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from mrl import Nesting
from mrl.baselines import random_permutation
from mrl.evaluate import evaluate_labelled, evaluate_ranking
from mrl.fewshot import ncm_accuracy, ncm_scores, ncm_scores_reference
from mrl.metrics import (
    average_precision_at_k,
    knn_predict,
    label_relevance,
    map_at_k,
    mrr,
    ndcg_at_k,
    precision_at_k,
    qrels_relevance,
    recall_at_k,
)
from mrl.similarity import prefix_scores, prefix_topk
from mrl.text.corpus import LabelledCorpus, RetrievalDataset
from mrl.text.evaluation import evaluate_corpus, evaluate_retrieval


# ----------------------------------------------------------------------------- references
def ref_ap(rel: list, R: int, k: int, normalize: str = "min(k,R)") -> float:
    hits, total = 0, 0.0
    for i in range(k):
        if rel[i] > 0:
            hits += 1
            total += hits / (i + 1)
    z = min(k, R) if normalize == "min(k,R)" else k
    return total / z if z > 0 else 0.0


def ref_recall(rel: list, R: int, k: int) -> float:
    return sum(1 for i in range(k) if rel[i] > 0) / R if R > 0 else 0.0


def ref_precision(rel: list, k: int) -> float:
    return sum(1 for i in range(k) if rel[i] > 0) / k


def ref_rr(rel: list, k: int) -> float:
    for i in range(k):
        if rel[i] > 0:
            return 1.0 / (i + 1)
    return 0.0


def ref_dcg(gains: list) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ref_ndcg(gains: list, judged: list, k: int) -> float:
    idcg = ref_dcg(sorted(judged, reverse=True)[:k])
    return ref_dcg(list(gains[:k])) / idcg if idcg > 0 else 0.0


def ref_knn(labels: list, k: int):
    """Majority of the first k; a tie goes to the tied class seen first (nearest)."""
    counts: dict = {}
    for lab in labels[:k]:
        counts[lab] = counts.get(lab, 0) + 1
    best = max(counts.values())
    return next(lab for lab in labels[:k] if counts[lab] == best)


def ref_scores(q, x, sizes, metric="cosine", center=None) -> np.ndarray:
    """[G, Q, N] in float64, one (query, item, prefix) at a time."""
    q, x = np.asarray(q, np.float64), np.asarray(x, np.float64)
    out = np.zeros((len(sizes), len(q), len(x)))
    for g, m in enumerate(sizes):
        c = 0.0 if center is None else np.asarray(center, np.float64)[:m]
        for i in range(len(q)):
            a = q[i, :m] - c
            for j in range(len(x)):
                b = x[j, :m] - c
                s = float(a @ b)
                if metric == "cosine":
                    s /= max(np.linalg.norm(a), 1e-12) * max(np.linalg.norm(b), 1e-12)
                out[g, i, j] = s
    return out


def ref_ranking(scores_row: np.ndarray, skip: int | None = None) -> list[int]:
    """Item ids by decreasing score; ``skip``: an item left out (leave-one-out)."""
    order = np.argsort(-scores_row, kind="stable").tolist()
    return [j for j in order if j != skip]


def continuous(rng, shape, dtype, offset=0.0):
    return (rng.standard_normal(shape) + offset).astype(dtype)


# ----------------------------------------------------------------------------- metrics
def random_relevance(rng, graded: bool):
    """rel [Q, K] with many ties (repeated values) and queries with nothing relevant."""
    Q, K = int(rng.integers(1, 7)), int(rng.integers(1, 13))
    rel = rng.random((Q, K)) < rng.random()
    if graded:  # Cranfield-style gains 1..4
        rel = rel * rng.integers(1, 5, (Q, K))
    extra = rng.integers(0, 4, Q)  # relevant items that were not retrieved
    extra[rng.random(Q) < 0.3] = 0
    return rel.astype(np.float64), (rel > 0).sum(1) + extra


@pytest.mark.parametrize("graded", [False, True])
def test_ranking_metrics_match_loops(graded):
    rng = np.random.default_rng(11 + graded)
    for _ in range(200):
        rel, R = random_relevance(rng, graded)
        Q, K = rel.shape
        k = int(rng.integers(1, K + 1))
        for norm in ("min(k,R)", "k"):
            got = average_precision_at_k(rel, R, k, norm)
            want = [ref_ap(rel[q], R[q], k, norm) for q in range(Q)]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        assert map_at_k(rel, R, k) == pytest.approx(
            np.mean([ref_ap(rel[q], R[q], k) for q in range(Q)]), abs=1e-12
        )
        np.testing.assert_allclose(
            recall_at_k(rel, R, k, reduce="none"),
            [ref_recall(rel[q], R[q], k) for q in range(Q)],
            atol=1e-12,
        )
        np.testing.assert_allclose(
            precision_at_k(rel, k, reduce="none"),
            [ref_precision(rel[q], k) for q in range(Q)],
            atol=1e-12,
        )
        np.testing.assert_allclose(
            mrr(rel, k, reduce="none"), [ref_rr(rel[q], k) for q in range(Q)], atol=1e-12
        )
        # judged gains: what was retrieved plus unretrieved ones (some of gain 0)
        judged = [list(rel[q][rel[q] > 0]) + rng.integers(0, 5, int(rng.integers(0, 4))).tolist()
                  for q in range(Q)]  # fmt: skip
        np.testing.assert_allclose(
            ndcg_at_k(rel, judged, k, reduce="none"),
            [ref_ndcg(rel[q], judged[q], k) for q in range(Q)],
            atol=1e-12,
        )


def test_ndcg_matches_sklearn_with_graded_gains_and_irrelevant_queries():
    """sklearn's ndcg_score on a full score matrix (distinct scores: no tie averaging) is the same
    formula: linear gain, log2 discount, IDCG from all true gains; 0 for all-zero rows."""
    rng = np.random.default_rng(3)
    Q, N = 8, 25
    y_true = rng.integers(0, 5, (Q, N)) * (rng.random((Q, N)) < 0.3)
    y_true[2] = 0  # a query with nothing relevant
    y_score = rng.permuted(np.tile(np.arange(N, dtype=float), (Q, 1)), axis=1)  # distinct
    order = np.argsort(-y_score, axis=1)
    gains = np.take_along_axis(y_true, order, 1).astype(float)
    for k in (1, 3, 10, N):
        want = ndcg_score(y_true, y_score, k=k)
        assert ndcg_at_k(gains, list(y_true), k) == pytest.approx(want, abs=1e-12)
        assert ndcg_at_k(gains, y_true, k) == pytest.approx(want, abs=1e-12)  # [Q, M] array
    assert ndcg_at_k(gains, list(y_true), N, reduce="none")[2] == 0.0


def test_single_query_and_k_equal_to_retrieved():
    rel = np.array([[0, 3, 0, 1]], dtype=float)
    judged = [[3, 1, 2]]
    assert ndcg_at_k(rel, judged, 4) == pytest.approx(ref_ndcg(rel[0], judged[0], 4))
    assert map_at_k(rel, [3], 4) == pytest.approx(ref_ap(rel[0], 3, 4))
    assert recall_at_k(rel, [3], 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k must be <="):
        precision_at_k(rel, 5)


def test_knn_predict_matches_loop_with_ties():
    rng = np.random.default_rng(5)
    for _ in range(100):
        Q, K = int(rng.integers(1, 5)), int(rng.integers(1, 9))
        labels = rng.integers(0, 3, (Q, K))
        for k in range(1, K + 1):
            assert knn_predict(labels, k).tolist() == [
                ref_knn(labels[q].tolist(), k) for q in range(Q)
            ]


@pytest.mark.parametrize("kind", ["int", "str"])
def test_label_relevance_matches_counting(kind):
    rng = np.random.default_rng(7)
    db = rng.integers(0, 6, 40)
    queries = np.array([0, 1, 5, 7, 3])  # 7 is in no database row
    if kind == "str":
        db, queries = db.astype(str), queries.astype(str)
    retrieved = db[rng.integers(0, len(db), (5, 6))]
    for exclude_self in (False, True):
        rel, num = label_relevance(retrieved, queries, db, exclude_self=exclude_self)
        for q, lab in enumerate(queries):
            assert rel[q].tolist() == [r == lab for r in retrieved[q]]
            count = sum(1 for d in db if d == lab)
            assert num[q] == max(count - exclude_self, 0)


def test_qrels_relevance_matches_dictionary_lookups():
    rng = np.random.default_rng(9)
    N, Q = 30, 6
    qrels = {q: {int(d): float(rng.integers(0, 5)) for d in rng.choice(N, 5, replace=False)}
             for q in range(0, Q, 2)}  # fmt: skip
    ids = list(range(Q))
    idx = np.stack([rng.permutation(N)[:8] for _ in ids])
    gains, num, ideal = qrels_relevance(idx, qrels, ids)
    for row, q in enumerate(ids):
        judged = qrels.get(q, {})
        assert gains[row].tolist() == [judged.get(int(d), 0.0) for d in idx[row]]
        assert num[row] == sum(1 for g in judged.values() if g > 0)
        assert sorted(ideal[row].tolist()) == sorted(judged.values())


def test_qrels_relevance_refuses_a_document_listed_twice():
    """A repeated doc counted its gain twice: recall@3 was 2/3 and nDCG@3 0.77 for a ranking
    that holds one of the three relevant docs (recall 1/3, nDCG 0.47)."""
    qrels = {0: {3: 1.0, 5: 1.0, 7: 1.0}}
    with pytest.raises(ValueError, match="lists doc 3 more than once"):
        qrels_relevance(np.array([[3, 3, 1]]), qrels)
    with pytest.raises(ValueError, match="row 1 lists doc 2"):
        qrels_relevance(np.array([[1, 2, 0], [2, 4, 2]]), {1: {2: 1.0}})
    gains, num, ideal = qrels_relevance(np.array([[3, 1, 8]]), qrels)
    assert recall_at_k(gains, num, 3) == pytest.approx(1 / 3)
    assert ndcg_at_k(gains, ideal, 3) == pytest.approx(ref_ndcg([1, 0, 0], [1, 1, 1], 3))
    # -1 padding (an index with fewer results than asked) is not a repeat
    assert qrels_relevance(np.array([[3, -1, -1]]), qrels)[0].tolist() == [[1.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------- evaluate
def labelled_reference(db, yd, queries, yq, sizes, k, center, exclude_self):
    c = np.asarray(db, np.float64).mean(0) if center else None
    s = ref_scores(queries, db, sizes, center=c)
    out = {}
    for g, m in enumerate(sizes):
        one, ap, p = [], [], []
        for i in range(len(queries)):
            top = ref_ranking(s[g, i], i if exclude_self else None)[:k]
            rel = [1 if yd[j] == yq[i] else 0 for j in top]
            R = sum(1 for y in yd if y == yq[i]) - (1 if exclude_self else 0)
            one.append(rel[0])
            ap.append(ref_ap(rel, R, k))
            p.append(ref_precision(rel, k))
        out[(m, "1nn")], out[(m, f"map@{k}")], out[(m, f"p@{k}")] = (
            np.mean(one),
            np.mean(ap),
            np.mean(p),
        )
    return out


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_evaluate_labelled_matches_brute_force(dtype, center, exclude_self):
    rng = np.random.default_rng(21)
    N, D, k, sizes = 36, 12, 7, (3, 6, 12)
    db = continuous(rng, (N, D), dtype, offset=0.7)
    yd = rng.integers(0, 4, N)
    if exclude_self:
        queries, yq = db, yd
    else:
        queries, yq = continuous(rng, (9, D), dtype), rng.integers(0, 5, 9)
    recs = evaluate_labelled(db, yd, queries, yq, list(sizes), k=k, center=center,
                             exclude_self=exclude_self, tile_size=5)  # fmt: skip
    got = {(r["prefix"], r["metric"]): r["value"] for r in recs}
    want = labelled_reference(db, yd, queries, yq, sizes, k, center, exclude_self)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_evaluate_labelled_centres_float16_on_the_exact_mean():
    """center=True on a float16 database subtracted the mean rounded to float16 (up to half a
    unit in the last place: 0.06 at an offset of 200, where the data spread is 1), so the
    metrics disagreed with centring on the database mean; it is now kept in float32."""
    rng = np.random.default_rng(0)
    N, D, sizes = 60, 8, (4, 8)
    db16 = (200 + rng.standard_normal((N, D))).astype(np.float16)
    y = rng.integers(0, 3, N)
    want = labelled_reference(db16, y, db16, y, sizes, 5, True, True)
    r16 = evaluate_labelled(db16, y, db16, y, list(sizes), k=5, center=True, exclude_self=True)
    for r in r16:
        assert r["value"] == pytest.approx(want[(r["prefix"], r["metric"])], abs=1e-12)
    # the random baseline (a column permutation) is centred on its own exact mean too
    perm = random_permutation(D, 0)
    rb = evaluate_labelled(db16, y, db16, y, list(sizes), k=5, center=True, exclude_self=True,
                           baselines=("random",), method="m")  # fmt: skip
    want_b = labelled_reference(db16[:, perm], y, db16[:, perm], y, sizes, 5, True, True)
    for r in (r for r in rb if r["method"] == "random"):
        assert r["value"] == pytest.approx(want_b[(r["prefix"], r["metric"])], abs=1e-12)
    # an explicit float64 centre is not rounded to float16 either
    c = db16.astype(np.float64).mean(0)
    r16c = evaluate_labelled(db16, y, db16, y, list(sizes), k=5, center=c, exclude_self=True)
    assert [r["value"] for r in r16c] == pytest.approx([r["value"] for r in r16], abs=1e-12)


def ranking_reference(queries, docs, qrels, sizes, ks, center):
    c = np.asarray(docs, np.float64).mean(0) if center else None
    s = ref_scores(queries, docs, sizes, center=c)
    out = {}
    judged_queries = sorted(qrels)
    for g, m in enumerate(sizes):
        for k in ks:
            nd, rc = [], []
            for q in judged_queries:
                judged = qrels[q]
                top = ref_ranking(s[g, q])[:k]
                gains = [judged.get(j, 0.0) for j in top]
                nd.append(ref_ndcg(gains, list(judged.values()), k))
                rc.append(ref_recall(gains, sum(1 for v in judged.values() if v > 0), k))
            out[(m, f"ndcg@{k}")], out[(m, f"recall@{k}")] = np.mean(nd), np.mean(rc)
        kmax = max(ks)
        out[(m, "mrr")] = np.mean([ref_rr([qrels[q].get(j, 0.0) for j in ref_ranking(s[g, q])],
                                          kmax) for q in judged_queries])  # fmt: skip
    return out


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("center", [False, True])
def test_evaluate_ranking_matches_brute_force(dtype, center):
    rng = np.random.default_rng(31)
    N, D, Q, sizes = 28, 8, 7, (2, 4, 8)
    docs, queries = continuous(rng, (N, D), dtype, 0.5), continuous(rng, (Q, D), dtype, 0.5)
    qrels = {  # graded (Cranfield gains 1..4), gain-0 judgments, one query with nothing relevant
        0: {3: 4.0, 7: 2.0, 11: 1.0},
        2: {5: 0.0, 6: 3.0},
        3: {1: 0.0},
        4: {int(d): float(rng.integers(1, 5)) for d in rng.choice(N, 9, replace=False)},
        6: {27: 1.0},
    }
    ks = (1, 5, N)  # k as large as the corpus
    recs = evaluate_ranking(queries, docs, qrels, list(sizes), ks=ks, center=center, tile_size=6)
    got = {(r["prefix"], r["metric"]): r["value"] for r in recs}
    want = ranking_reference(queries, docs, qrels, sizes, ks, center)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert {r["n_queries"] for r in recs} == {len(qrels)}


def test_text_evaluate_retrieval_matches_brute_force():
    """Text ids -> positions (index_qrels drops gains <= 0 and queries with nothing relevant;
    unknown ids are refused by RetrievalDataset), ks clamped to a corpus of < 100 documents."""
    rng = np.random.default_rng(41)
    N, D = 14, 6
    doc_ids = [f"d{j}" for j in range(N)]
    query_ids = ["q0", "q1", "q2", "q3"]
    qrels_text = {"q0": {"d2": 3.0, "d9": 1.0}, "q1": {"d4": -1.0},
                  "q3": {"d13": 2.0, "d0": 4.0, "d1": 0.0}}  # fmt: skip
    ds = RetrievalDataset("tiny", doc_ids, [""] * N, [f"text {j}" for j in range(N)], query_ids,
                          [f"query {i}" for i in range(4)], qrels_text)  # fmt: skip
    docs, queries = continuous(rng, (N, D), np.float32), continuous(rng, (4, D), np.float32)
    recs = evaluate_retrieval(queries, docs, ds, Nesting((3, 6)), method="truncate")
    got = {(r["prefix"], r["metric"]): r["value"] for r in recs}
    positions = {0: {2: 3.0, 9: 1.0}, 3: {13: 2.0, 0: 4.0}}  # by hand from qrels_text
    want = ranking_reference(queries, docs, positions, (3, 6), (10, N), False)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_text_evaluate_corpus_is_leave_one_out():
    rng = np.random.default_rng(43)
    N, D = 24, 8
    labels = rng.integers(0, 3, N)
    corpus = LabelledCorpus("lab", [""] * N, [f"doc {j}" for j in range(N)], labels,
                            ["a", "b", "c"])  # fmt: skip
    emb = continuous(rng, (N, D), np.float32)
    recs = evaluate_corpus(emb, corpus, Nesting((4, 8)), method="truncate", k=5)
    got = {(r["prefix"], r["metric"]): r["value"] for r in recs}
    want = labelled_reference(emb, labels, emb, labels, (4, 8), 5, False, True)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


# ----------------------------------------------------------------------------- similarity
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("center", [None, True, "vector"])
def test_every_prefix_in_one_pass_matches_slicing(dtype, metric, center):
    """prefix_scores / prefix_topk (chunked running sums, tiled) vs slicing each prefix, with a
    zero item, a query whose first prefix is zero and a nesting that ends below D."""
    rng = np.random.default_rng(51)
    q, x = continuous(rng, (5, 12), dtype, 1.0), continuous(rng, (23, 12), dtype, 1.0)
    x[3], q[1, :3] = 0, 0
    sizes = [3, 6, 10]
    c = rng.standard_normal(12) if center == "vector" else center
    c_ref = x.astype(np.float64)[:, :10].mean(0) if center is True else c
    want = ref_scores(q, x, sizes, metric, c_ref)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    scale = max(1.0, float(np.abs(want).max()))
    got = prefix_scores(q, x, sizes, metric, c)
    assert got.dtype == (np.float64 if dtype == np.float64 else np.float32)
    np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=tol)
    s, i = prefix_topk(q, x, sizes, 7, metric, tile_size=4, center=c, query_block=2)
    np.testing.assert_allclose(s / scale, -np.sort(-want, axis=2)[:, :, :7] / scale, atol=tol)
    np.testing.assert_allclose(np.take_along_axis(want, i, 2) / scale, s / scale, atol=tol)


def test_tied_items_give_the_tied_scores_whatever_the_tile_size():
    """Exact ties (binary embeddings, repeated items): which tied item is returned depends on the
    tiling (documented), but the scores returned, and every item above the tied cut-off, do not."""
    rng = np.random.default_rng(61)
    x = rng.integers(0, 2, (90, 8)).astype(np.float32)
    x = np.concatenate([x, x[:30]])  # repeated documents
    q = rng.integers(0, 2, (6, 8)).astype(np.float32)
    want = ref_scores(q, x, [2, 8], "dot")
    for tile in (1, 7, 4096):
        s, i = prefix_topk(q, x, [2, 8], 11, "dot", tile_size=tile)
        np.testing.assert_array_equal(s, -np.sort(-want, axis=2)[:, :, :11])
        np.testing.assert_array_equal(np.take_along_axis(want, i, 2), s)
        for g in range(2):
            for r in range(len(q)):
                assert len(set(i[g, r].tolist())) == 11  # no item twice
                above = np.flatnonzero(want[g, r] > s[g, r, -1])
                assert set(above.tolist()) <= set(i[g, r].tolist())


# ----------------------------------------------------------------------------- few-shot
def ncm_loop(x, y, q, sizes, center):
    C = int(y.max()) + 1
    out = np.zeros((len(sizes), len(q), C))
    for g, m in enumerate(sizes):
        xs, qs = x[:, :m], q[:, :m]
        if center:
            mu = xs.mean(0)
            xs, qs = xs - mu, qs - mu
        for c in range(C):
            mean = xs[y == c].mean(0)
            for i in range(len(q)):
                out[g, i, c] = qs[i] @ mean / (np.linalg.norm(qs[i]) * np.linalg.norm(mean))
    return out


@pytest.mark.parametrize("scale", [1.0, 1e-7])
@pytest.mark.parametrize("center", [False, True])
def test_ncm_scores_and_reference_match_a_loop(scale, center):
    """The reference clamped norms at sqrt(1e-12) = 1e-6 (the fast path at 1e-12), so at a scale
    of 1e-7 its cosines shrank by ~10x per class and its argmax differed from the one-pass path."""
    rng = np.random.default_rng(71)
    x, q = rng.standard_normal((30, 8)) * scale, rng.standard_normal((12, 8)) * scale
    y = np.arange(30) % 3
    nest = Nesting((2, 4, 8))
    want = ncm_loop(x, y, q, nest.sizes, center)
    fast = ncm_scores(x, y, q, nest, center=center)
    ref = ncm_scores_reference(x, y, q, nest, center=center)
    np.testing.assert_allclose(fast, want, atol=1e-10)
    np.testing.assert_allclose(ref, want, atol=1e-10)
    labels = rng.integers(0, 3, 12)
    np.testing.assert_array_equal(ncm_accuracy(ref, labels), ncm_accuracy(fast, labels))


def test_scores_that_overflow_float32_are_refused():
    """Finite float32 inputs near 1e20 overflowed: dot scores of -inf tied with the running
    top-k's padding and index -1 was returned; cosine had an infinite norm and scored NaN or 0
    (the per-prefix slicing gives -1 here, in float64)."""
    q = np.array([[1e20, 0.0]], np.float32)
    x = np.array([[-1e20, 0.0], [1.0, 0.0], [-3e20, 1e20]], np.float32)
    for metric in ("dot", "cosine"):
        with pytest.raises(ValueError, match="overflow"):
            prefix_topk(q, x, [2], 3, metric, tile_size=1)
        with pytest.raises(ValueError, match="overflow"):
            prefix_scores(q, x, [2], metric)
    with pytest.raises(ValueError, match="overflow"):  # only the item's norm overflows
        prefix_topk(np.ones((1, 2), np.float32), x, [2], 2)
    s, i = prefix_topk(q.astype(np.float64), x.astype(np.float64), [2], 3)  # float64 is fine
    assert i.tolist() == [[[1, 2, 0]]]
    np.testing.assert_allclose(s, [[[1.0, -3 / 10**0.5, -1.0]]], atol=1e-12)


def test_relative_table_uses_each_models_own_largest_prefix():
    """A fine-tuned model of a smaller D (its nesting ends at 256, the base model's at 384) was
    looked up at the table's last column: None, and a TypeError instead of the table."""
    from mrl.text.evaluation import relative_table

    recs = [
        {"method": m, "prefix": p, "metric": "ndcg@10", "value": v}
        for m, p, v in [("truncate", 8, 0.1), ("truncate", 384, 0.4), ("pca", 8, 0.2),
                        ("pca", 384, 0.4), ("finetune", 8, 0.15), ("finetune", 256, 0.3)]
    ]  # fmt: skip
    lines = relative_table(recs, "ndcg@10").splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert rows["truncate"] == "| truncate | 25.0% |  | 100.0% | base full size (0.4000) |"
    assert rows["pca"] == "| pca | 50.0% |  | 100.0% | base full size (0.4000) |"
    assert rows["finetune"] == "| finetune | 50.0% | 100.0% |  | own full size (0.3000) |"
