"""Retrieval audit: ties among duplicate rows, a reference with a stated tie rule, the tuner's
reported recall against a fresh measurement, save/load, the demo section with few rows, and the
centre of an embedding store carried into the index (`mrl index build`, `mrl search`).

The reference everywhere: re-normalise the prefix (float64), dot products, then order by score
descending and, among equal scores, by the smaller row index.
"""

from __future__ import annotations

import json
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from mrl import Nesting
from mrl.cli import main
from mrl.retrieval import EmbeddingStore, MatryoshkaIndex, SearchConfig, exact_search
from mrl.retrieval.exact import _block_topk, _block_topk_reference, topk_sorted
from mrl.retrieval.funnel.index import funnel_stages
from mrl.retrieval.synthetic import mrl_like
from mrl.retrieval.tune import recall_at_k, tune

NEST = Nesting((8, 16, 32))


def _cosine(x: np.ndarray, q: np.ndarray, m: int) -> np.ndarray:
    """Reference scores [Q, N] at prefix m: float64, both sides re-normalised, then float32."""
    xm, qm = x[:, :m].astype(np.float64), q[:, :m].astype(np.float64)
    xm /= np.linalg.norm(xm, axis=1, keepdims=True)
    qm /= np.linalg.norm(qm, axis=1, keepdims=True)
    return (qm @ xm.T).astype(np.float32)


def _rank(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best of each row: score desc, then row asc (the stated tie rule)."""
    return np.lexsort((np.broadcast_to(rows, scores.shape), -scores), axis=1)[:, :k]


def _twice(n=600, q=40, d=32, seed=0):
    """Every document twice (row i and row i + n), as a corpus with duplicates has them."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d)).astype(np.float32)
    return np.concatenate([base, base]), rng.standard_normal((q, d)).astype(np.float32)


def test_topk_sorted_keeps_the_smaller_keys_among_ties_at_the_kth_place():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(2, 400))
        k = int(rng.integers(1, n + 1))
        s = rng.integers(0, 4, size=(3, n)).astype(np.float32)  # mostly ties
        vals, idx = topk_sorted(s, k)
        np.testing.assert_array_equal(idx, _rank(s, np.arange(n), k))
        np.testing.assert_array_equal(vals, np.take_along_axis(s, idx, axis=1))
        keys = rng.permutation(n)[None, :].repeat(3, axis=0)  # e.g. candidate row ids
        _, idx = topk_sorted(s, k, keys=keys)
        order = np.lexsort((keys, -s), axis=1)[:, :k]
        np.testing.assert_array_equal(idx, order)


@pytest.mark.parametrize("k", [1, 5])
def test_exact_search_returns_duplicates_in_row_order(k):
    db, q = _twice()
    _, idx = exact_search(db, q, k, block=256)  # blocks: the rule holds across them too
    np.testing.assert_array_equal(idx, _rank(_cosine(db, q, 32), np.arange(len(db)), k))


@pytest.mark.parametrize("m", [1, 13, 32, 67])
def test_block_topk_equals_the_reference_with_ties(m):
    """`_block_topk` (GEMM shortlist, consistent rescoring) against one true dot product per pair.
    Small integers: every dot product is exact in float32, so scores must match bit for bit and
    the many ties must come back by the smaller column."""
    rng = np.random.default_rng(m)
    for _ in range(6):
        b = int(rng.integers(1, 300))
        k = int(rng.integers(1, b + 1))
        x = rng.integers(-2, 3, size=(b, m)).astype(np.float32)
        q = rng.integers(-2, 3, size=(int(rng.integers(1, 9)), m)).astype(np.float32)
        got, want = _block_topk(q, x, k), _block_topk_reference(q, x, k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_block_topk_scores_are_dot_products_and_duplicates_keep_row_order():
    """Float data: the scores returned are the pairs' dot products (within float32 rounding);
    many copies of the best row (more than the shortlist's padding) come back in row order."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 37)).astype(np.float32)
    q = rng.standard_normal((5, 37)).astype(np.float32)
    best = int(np.argmax(q[0] @ x.T))
    copies = rng.choice(700, size=60, replace=False)
    x[copies] = x[best]  # 60-61 equal rows, scattered over the block's tiles
    vals, cols = _block_topk(q, x, 20)
    ref_vals, ref_cols = _block_topk_reference(q, x, 20)
    np.testing.assert_allclose(vals, ref_vals, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(cols[0], np.sort(np.union1d(copies, best))[:20])
    np.testing.assert_array_equal(cols[1:], ref_cols[1:])


@pytest.mark.parametrize("d", [13, 32])
def test_exact_search_duplicates_in_row_order_across_blocks_and_odd_dims(d):
    """Every row twice, at other places in other blocks: both twins score the same, the earlier
    first (the GEMM alone scored twins 1 ulp apart by their place in its tiles)."""
    db, q = _twice(n=500, d=d, seed=3)
    for block in (64, 333, 4096):
        vals, idx = exact_search(db, q, 10, block=block)
        np.testing.assert_array_equal(idx, _rank(_cosine(db, q, d), np.arange(len(db)), 10))
        assert (vals[:, 0::2] == vals[:, 1::2]).all()  # twins: the same score, side by side
        assert (idx[:, 1::2] - idx[:, 0::2] == 500).all()


@pytest.mark.parametrize("backend", ["numpy", "flat", "torch", "ivf"])
@pytest.mark.parametrize("k", [1, 5])
def test_whole_database_funnel_equals_exact_with_duplicate_rows(backend, k):
    """A shortlist of the whole database (IVF: every cell probed) reranked at D is exact search,
    duplicates included: before, the torch rerank returned row i + n before its twin i (recall
    0.54 against exact search at k=1) and both paths could keep the later twin at the k-th
    place."""
    db, q = _twice()
    index = MatryoshkaIndex(NEST, SearchConfig(shortlist_dim=8, shortlist=len(db),
                                               backend=backend, nlist=4, nprobe=4), threads=1)
    index.add(db)
    res = index.search(q, k)
    want = _rank(_cosine(db, q, 32), np.arange(len(db)), k)
    np.testing.assert_array_equal(res.indices, want)
    np.testing.assert_array_equal(res.indices, exact_search(db, q, k)[1])


@pytest.mark.parametrize("vector_dtype", ["float32", "float16", "int8"])
def test_identical_rows_score_the_same_in_every_candidate_position(vector_dtype):
    """The batched rerank product gave the same row a different last bit by its position among
    the candidates (np.matmul's tail rows), so the tie rule failed for duplicates depending on
    the shortlist's order."""
    rng = np.random.default_rng(1)
    db = rng.standard_normal((50, 32)).astype(np.float32)
    index = MatryoshkaIndex(NEST, vector_dtype=vector_dtype, threads=1)
    index.add(db)
    for m, kc in ((8, 19), (8, 103), (16, 30), (32, 271)):
        q = rng.standard_normal((3, m)).astype(np.float32)
        cand = np.full((3, kc), 7)  # the same row in every slot
        dots = index._candidate_dots(q, cand)
        assert (dots == dots[:, :1]).all(), (m, kc)


@pytest.mark.parametrize("vector_dtype", ["float32", "float16", "int8"])
def test_rerank_depends_on_the_shortlist_not_on_its_order(vector_dtype):
    db, q = _twice(n=300)
    db[50:60] = 2 * db[40:50]  # the same direction at another length: equal cosines too
    index = MatryoshkaIndex(NEST, vector_dtype=vector_dtype, threads=1)
    index.add(db)
    stages = funnel_stages(8, 120, 32, 10, NEST)
    cand = index._shortlist(q, SearchConfig(shortlist_dim=8, shortlist=120, backend="numpy"), 120)
    want_s, want_i = index._rerank_rows(q, cand, stages)
    rng = np.random.default_rng(2)
    for _ in range(3):
        shuffled = np.stack([rng.permutation(c) for c in cand])
        s, i = index._rerank_rows(q, shuffled, stages)
        np.testing.assert_array_equal(i, want_i)
        np.testing.assert_array_equal(s, want_s)
    # and the result is the reference rerank of that shortlist (score desc, row asc)
    x = index.vectors()
    for j in range(len(q)):
        c = cand[j]
        for m, keep in stages:
            sc = _cosine(x[c], q[j : j + 1], m)
            c = c[_rank(sc, c, keep)[0]]
        np.testing.assert_array_equal(want_i[j], c)


def test_tuned_recall_is_a_fresh_measurement_and_survives_save_load(tmp_path):
    db, _ = mrl_like(2000, 64, clusters=20, seed=0)
    q, _ = mrl_like(60, 64, clusters=20, seed=1)
    index = MatryoshkaIndex(Nesting.doubling(8, 64), vector_dtype="float16", threads=1)
    index.add(db)
    rep = tune(index, 0.95, k=10, queries=q, reference=db, backends=("flat", "ivf"), max_ivf=1)
    _, truth = exact_search(db, q, 10)
    assert recall_at_k(index.search(q, 10).indices, truth) == rep.recall
    index.save(tmp_path / "idx")
    loaded = MatryoshkaIndex.load(tmp_path / "idx", threads=1)
    again = loaded.search(q, 10)
    first = index.search(q, 10)
    np.testing.assert_array_equal(again.indices, first.indices)
    np.testing.assert_array_equal(again.scores, first.scores)  # bit for bit
    assert loaded.tuned["recall"] == rep.recall


def test_demo_section_with_fewer_than_ten_rows():
    """k is capped by the database size; the table then read 'map@10' and raised KeyError."""
    from mrl.retrieval.demo import demo_section

    rng = np.random.default_rng(0)
    ctx = SimpleNamespace(
        db_embeddings=rng.standard_normal((8, 16)).astype(np.float32),
        db_labels=rng.integers(0, 2, 8),
        query_embeddings=rng.standard_normal((5, 16)).astype(np.float32),
        query_labels=rng.integers(0, 2, 5),
        nesting=Nesting((8, 16)),
    )
    md, records = demo_section(ctx)
    assert "| mAP@8 |" in md and "| recall@8 |" in md
    assert {r["metric"] for r in records} == {"map@8", "1nn", "recall@8", "qps"}


def _centred_exact(db, q, center, k):
    return exact_search(db - center, q - center, k)[1]


def test_index_build_from_a_centred_store_carries_its_center(tmp_path, capsys):
    """A store created with a center holds rows minus it; the index built from it takes the
    center, so raw .npy queries are centred at search time (they were searched un-centred:
    recall@10 0.75 at a whole-database shortlist), and queries from a store of the same center
    are not centred twice. Saved and loaded with the index; a store of another center or an
    index without one is refused."""
    db, _ = mrl_like(500, 32, clusters=10, seed=0)
    q, _ = mrl_like(20, 32, clusters=10, seed=1)
    center = db.mean(0)
    EmbeddingStore.create(tmp_path / "db", NEST, center=center).append(db)
    EmbeddingStore.create(tmp_path / "q", NEST, center=center).append(q)
    np.save(tmp_path / "q.npy", q)
    out = tmp_path / "idx"
    assert main(["index", "build", str(tmp_path / "db"), "--out", str(out), "--shortlist-dim",
                 "8", "--shortlist", "500"]) == 0  # fmt: skip
    index = MatryoshkaIndex.load(out)
    np.testing.assert_allclose(index.center, center, rtol=1e-6)
    want = _centred_exact(db, q, center, 5)
    for queries in ("q", "q.npy"):  # centred by the store / raw: the same neighbours
        res = tmp_path / f"r-{queries}.json"
        assert main(["search", str(out), str(tmp_path / queries), "--k", "5", "--out",
                     str(res)]) == 0  # fmt: skip
        got = [r["ids"] for r in json.loads(res.read_text())["results"]]
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(index.search(q, 5).indices, want)
    capsys.readouterr()
    EmbeddingStore.create(tmp_path / "q2", NEST, center=center + 1).append(q)
    assert main(["search", str(out), str(tmp_path / "q2"), "--k", "5"]) == 2
    assert "has another center" in capsys.readouterr().err
    plain = tmp_path / "plain"
    EmbeddingStore.create(plain, NEST).append(db)
    assert main(["index", "build", str(plain), "--out", str(tmp_path / "idx2")]) == 0
    assert MatryoshkaIndex.load(tmp_path / "idx2").center is None
    assert main(["search", str(tmp_path / "idx2"), str(tmp_path / "q"), "--k", "5"]) == 2
    assert "the index has no center" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "db"), "--out", str(tmp_path / "idx3"),
                 "--center"]) == 2  # fmt: skip
    assert "centred already" in capsys.readouterr().err


def test_index_build_center_option_centres_rows_and_queries(tmp_path):
    """`--center` on a .npy: the rows' mean is the index's center, applied to the rows and to
    raw queries (equal to exact search on centred data); tuning measures recall in that space."""
    db, _ = mrl_like(600, 32, clusters=10, seed=2)
    db = np.abs(db) + 0.5  # all positive, as post-ReLU features: centring changes the ranking
    q, _ = mrl_like(30, 32, clusters=10, seed=3)
    q = np.abs(q) + 0.5
    np.save(tmp_path / "db.npy", db)
    np.save(tmp_path / "q.npy", q)
    out = tmp_path / "idx"
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(out), "--nesting",
                 "8,16,32", "--center", "--shortlist", "600"]) == 0  # fmt: skip
    index = MatryoshkaIndex.load(out)
    center = db.mean(0, dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(index.center, center)
    want = _centred_exact(db, q, center, 10)
    assert (want != exact_search(db, q, 10)[1]).any()  # centring matters on this data
    np.testing.assert_array_equal(index.search(q, 10).indices, want)
    with pytest.raises(ValueError, match="centered must be True or False"):
        index.search(q, 10, centered="yes")
    tuned = tmp_path / "tuned"
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(tuned), "--nesting",
                 "8,16,32", "--center", "--target-recall", "0.99", "--backend", "flat",
                 "--vector-dtype", "float16"]) == 0  # fmt: skip
    t = MatryoshkaIndex.load(tuned)
    got = t.search(q, 10).indices
    assert recall_at_k(got, want) >= 0.95


def test_index_without_center_refuses_centered_inputs():
    db, _ = mrl_like(50, 32, clusters=5, seed=0)
    index = MatryoshkaIndex(NEST)
    with pytest.raises(ValueError, match="has no center"):
        index.add(db, centered=True)
    for bad in (np.zeros(5), np.zeros((2, 32)), np.zeros((1, 32))):  # [2, 32] was read as 64
        msg = f"center must be a vector of 32 numbers [D], got shape {bad.shape}"
        with pytest.raises(ValueError, match=re.escape(msg)):
            MatryoshkaIndex(NEST, center=bad)
    with pytest.raises(ValueError, match="center must be a vector of 32 numbers"):
        EmbeddingStore.create("unused-path", NEST, center=np.zeros((2, 16)))


def test_qdrant_export_refuses_centred_rows(tmp_path, capsys):
    pytest.importorskip("qdrant_edge")
    db, _ = mrl_like(50, 32, clusters=5, seed=0)
    EmbeddingStore.create(tmp_path / "db", NEST, center=db.mean(0)).append(db)
    assert main(["export", "qdrant", str(tmp_path / "db"), "--collection", "c", "--path",
                 str(tmp_path / "q")]) == 2  # fmt: skip
    assert "cannot centre queries" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()  # refused before any collection was set up


def test_tune_takes_raw_or_centred_inputs_on_a_centred_index():
    """`tune(reference=, queries=)` on a centred float16 index: raw inputs (as given to `add`)
    are centred by tune, centred ones are passed with centered=True; both report the recall a
    fresh measurement gives (a raw reference taken as centred reported 0.05)."""
    db, _ = mrl_like(800, 32, clusters=10, seed=4)
    db = np.abs(db) + 0.5
    q, _ = mrl_like(40, 32, clusters=10, seed=5)
    q = np.abs(q) + 0.5
    center = db.mean(0)
    want = _centred_exact(db, q, center, 10)
    for centered in (False, True):
        index = MatryoshkaIndex(NEST, vector_dtype="float16", center=center, threads=1)
        index.add(db)
        shift = center if centered else 0.0
        res = tune(index, 0.9, k=10, queries=q - shift, reference=db - shift,
                   centered=centered, backends=("flat",), try_funnel=False)  # fmt: skip
        fresh = recall_at_k(index.search(q, 10).indices, want)
        assert res.recall >= 0.9 and abs(res.recall - fresh) < 0.05, (centered, res.recall, fresh)
    plain = MatryoshkaIndex(NEST)
    plain.add(db)
    with pytest.raises(ValueError, match="has no center"):
        tune(plain, 0.9, centered=True)


def test_search_names_a_centred_query_store_of_another_width(tmp_path, capsys):
    db, _ = mrl_like(100, 32, clusters=5, seed=0)
    EmbeddingStore.create(tmp_path / "db", NEST, center=db.mean(0)).append(db)
    q16 = db[:5, :16]
    EmbeddingStore.create(tmp_path / "q", Nesting((8, 16)), center=q16.mean(0)).append(q16)
    assert main(["index", "build", str(tmp_path / "db"), "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err  # was: operands could not be broadcast together
    assert "holds 16-dim rows; the index holds 32-dim rows" in err, err


def test_exact_search_by_query_blocks_equals_one_block():
    """Queries scored `query_block` at a time (bounded memory) give the neighbours of one block,
    duplicate rows in row order included (scores to float32 rounding: BLAS rounds a one-row
    product differently); a bad query_block is named."""
    db, _ = mrl_like(300, 32, clusters=5, seed=6)
    db = np.concatenate([db, db[:50]])  # twins: the tie rule must hold across blocks too
    q, _ = mrl_like(37, 32, clusters=5, seed=7)
    one = exact_search(db, q, 12, dims=16, block=64, query_block=1024)
    for qb in (1, 5, 36):
        got = exact_search(db, q, 12, dims=16, block=64, query_block=qb)
        np.testing.assert_allclose(got[0], one[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(got[1], one[1])
    with pytest.raises(ValueError, match="query_block must be >= 1, got query_block=0"):
        exact_search(db, q, 5, query_block=0)


def test_topk_sorted_equals_a_full_sort_with_ties_inf_and_nan():
    """Against a full sort of each row (score descending, -inf before NaN, then the smaller
    key): rows of few distinct values, -inf and NaN, every k (a NaN kept by argtopk in place of
    a -inf hid a -inf tie at the k-th place)."""
    rng = np.random.default_rng(0)
    pool = np.array([-3, -2, -1, 0, 1, 2, -np.inf, np.nan], np.float32)
    for _ in range(300):
        n = int(rng.integers(2, 30))
        s = rng.choice(pool, size=(3, n))
        keys = np.stack([rng.permutation(100)[:n] for _ in range(3)])
        for k in {1, n // 2 or 1, n - 1 or 1, n}:
            v, i = topk_sorted(s, k, keys=keys)
            low = np.where(np.isnan(s), -np.inf, s)
            want = np.lexsort((keys, np.isnan(s), -low), axis=1)[:, :k]
            np.testing.assert_array_equal(i, want)
            np.testing.assert_array_equal(v, np.take_along_axis(s, want, axis=1))


def test_export_qdrant_itself_refuses_centred_rows(tmp_path):
    """The library call refuses them too (the CLI checks first, before any collection)."""
    pytest.importorskip("qdrant_edge")
    from mrl.qdrant import QdrantLayout, export_qdrant, open_rows

    db, _ = mrl_like(50, 32, clusters=5, seed=0)
    EmbeddingStore.create(tmp_path / "db", NEST, center=db.mean(0)).append(db)
    with pytest.raises(ValueError, match="the store or index to export holds centred rows"):
        export_qdrant(open_rows(tmp_path / "db"), None, QdrantLayout((8, 32)), tmp_path / "p.json")


# ----------------------------------------------------------------------------- later fixes
def _funnel_index(tmp_path, n=600):
    db, _ = mrl_like(n, 64, clusters=8, seed=0)
    q, _ = mrl_like(5, 64, clusters=8, seed=1)
    np.save(tmp_path / "db.npy", db)
    np.save(tmp_path / "q.npy", q)
    out = tmp_path / "idx"
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(out), "--nesting",
                 "8,16,32,64", "--shortlist-dim", "8", "--shortlist", "200", "--funnel"]) == 0
    return out, q


def test_search_with_its_own_shortlist_fits_the_saved_stages(tmp_path, capsys):
    """A funnel index (stages (16,100), (32,50), (64,10)) searched with another --shortlist or
    --shortlist-dim: the saved stages were checked as if typed ("stages[1] keep must be in
    [k=60, 100]"); now they are fitted to the call."""
    out, q = _funnel_index(tmp_path)
    index = MatryoshkaIndex.load(out, threads=1)
    assert index.config.stages == ((16, 100), (32, 50), (64, 10))
    for argv, stages in ((["--k", "60", "--shortlist", "400"], [[16, 100], [32, 60], [64, 60]]),
                         (["--shortlist", "50"], [[16, 50], [32, 50], [64, 10]]),
                         (["--shortlist-dim", "32"], [[32, 50], [64, 10]])):
        res = tmp_path / "res.json"
        assert main(["search", str(out), str(tmp_path / "q.npy"), *argv, "--out", str(res)]) == 0
        assert json.loads(res.read_text())["config"]["stages"] == stages, argv
    capsys.readouterr()
    got = index.search(q, 60, shortlist=400)
    want = index.search(q, 60, shortlist=400, stages=((16, 100), (32, 60), (64, 60)))
    np.testing.assert_array_equal(got.indices, want.indices)
    with pytest.raises(ValueError, match=r"shortlist must be >= k \(60\), got shortlist=50"):
        index.search(q, 60, shortlist=50)  # the call's own shortlist: validated as given


def test_index_build_names_a_bad_k(tmp_path, capsys):
    np.save(tmp_path / "db.npy", np.random.default_rng(0).standard_normal((50, 16), np.float32))
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "i"),
                 "--funnel", "--k", "0"]) == 2
    assert "--k must be >= 1, got --k 0" in capsys.readouterr().err


def test_a_damaged_saved_config_is_one_error(tmp_path, capsys):
    out, _ = _funnel_index(tmp_path, n=300)
    meta = json.loads((out / "index.json").read_text())
    for key, value, message in (("foo", 1, r"unknown search config keys \['foo'\]"),
                                ("shortlist_dim", "16", r"shortlist_dim must be int, got '16'"),
                                ("stages", [[16, 10, 1]], "stages must be a list of")):
        bad = json.loads(json.dumps(meta))
        bad["config"][key] = value
        (out / "index.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"index.json is damaged: config: " + message):
            MatryoshkaIndex.load(out)
        assert main(["search", str(out), str(tmp_path / "q.npy")]) == 2
        assert "is damaged: config:" in capsys.readouterr().err


def test_index_ids_the_store_would_refuse_are_refused():
    """2**64 - 1 became -1 (the "no hit" id of SearchResult.ids), "doc\\x00" became "doc"."""
    db = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    index = MatryoshkaIndex(Nesting((8, 16)), threads=1)
    for ids, message in (([2**63, 2**64 - 1], "ids must fit in int64"),
                         (np.array([2**63 + 5, 7], dtype=np.uint64), "ids must fit in int64"),
                         (["doc\x00", "b"], "ids must not end with a NUL character")):
        with pytest.raises(ValueError, match=message):
            index.add(db, ids=ids)
    assert index.count == 0


def test_int8_index_warns_when_a_later_add_is_clipped():
    rng = np.random.default_rng(0)
    index = MatryoshkaIndex(Nesting((8, 16)), vector_dtype="int8", threads=1)
    index.add(rng.standard_normal((100, 16)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index.add(rng.uniform(-0.5, 0.5, (50, 16)).astype(np.float32))  # within the scale
    with pytest.warns(UserWarning, match=r"int8 index: 16 of 160 values .* were clipped"):
        index.add(np.full((10, 16), 100.0, np.float32) * np.where(np.arange(10) == 0, 1, 0)[:, None]
                  + 0.1)


def test_block_topk_wide_queries_alone_zero_query_and_dot_outlier():
    """A query whose near-top set is wide (an all-zero query ties every column; a "dot" row of
    outsized norm loosens the bound) is done alone: it once widened every query of its block to
    the whole block (40x slower). The results still equal one dot product per pair."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    q = rng.standard_normal((6, 24)).astype(np.float32)
    q[2] = 0.0
    vals, cols = _block_topk(q, x, 7)
    want_v, want_c = _block_topk_reference(q, x, 7)
    np.testing.assert_array_equal(cols[2], np.arange(7))  # all tied at 0: the first columns
    np.testing.assert_allclose(vals, want_v, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(cols, want_c)
    x[5] *= 3e4  # a "dot" outlier
    vals, cols = _block_topk(q, x, 7)
    want_v, want_c = _block_topk_reference(q, x, 7)
    np.testing.assert_allclose(vals, want_v, rtol=1e-6, atol=2e-5)
    np.testing.assert_array_equal(cols, want_c)


def test_exact_search_keeps_the_gemm_value_where_the_rescore_overflows():
    """Rows whose partial sums overflow float32 in einsum's order (true dot product 0) scored
    -inf after the rescore and fell below rows of -4.8."""
    x = np.zeros((30, 16), np.float32)
    x[:10, :8], x[:10, 8:], x[10:] = 3e38, -3e38, -0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vals, idx = exact_search(x, np.ones((1, 16), np.float32), 3, metric="dot")
    np.testing.assert_array_equal(idx, [[0, 1, 2]])
    np.testing.assert_array_equal(vals, [[0.0, 0.0, 0.0]])


def test_fitted_stages_keep_a_first_stage_at_the_shortlist_prefix():
    """IVF-PQ's exact re-score is a first stage at D_s itself: a call's own shortlist dropped it."""
    db, _ = mrl_like(400, 64, clusters=8, seed=0)
    q, _ = mrl_like(3, 64, clusters=8, seed=1)
    nest = Nesting((8, 16, 32, 64))
    index = MatryoshkaIndex(nest, SearchConfig(shortlist_dim=16, shortlist=200,
                                               stages=((16, 50), (64, 10))), threads=1)
    index.add(db)
    assert index.search(q, 10, shortlist=300).config.stages == ((16, 50), (64, 10))
    index.config = SearchConfig(shortlist_dim=8, shortlist=200, stages=((32, 50), (64, 10)))
    res = index.search(q, 10, shortlist_dim=64)  # the final rank stays at 64 (not D)
    assert res.config.stages == ((64, 10),)


def test_int8_index_warns_when_a_later_add_fills_a_column_the_first_add_left_zero():
    """A column all zero in the first add gets scale 1: later values there round to 0 or +-1."""
    rng = np.random.default_rng(0)
    index = MatryoshkaIndex(Nesting((8, 16)), vector_dtype="int8", threads=1)
    first = rng.standard_normal((100, 16)).astype(np.float32)
    first[:, [3, 12]] = 0.0
    index.add(first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index.add(np.where(np.isin(np.arange(16), [3, 12]), 0.0, 0.3).astype(np.float32)[None])
    later = np.full((5, 16), 0.2, np.float32)
    with pytest.warns(UserWarning, match=r"2 column\(s\) \(first: 3\) were all zero"):
        index.add(later)
    np.testing.assert_array_equal(index.vectors(np.arange(101, 106))[:, [3, 12]], 0.0)  # lost


def test_mrl_like_checks_its_arguments():
    """block=-1 skipped the fill loop and returned uninitialised (finite-looking) rows; NaN decay
    gave NaN rows; a wrong-shaped out failed in a numpy broadcast."""
    from mrl.retrieval.synthetic import mrl_like

    x, lab = mrl_like(5, 4, clusters=2, block=2)
    np.testing.assert_allclose(x, mrl_like(5, 4, clusters=2)[0])  # independent of block
    for kwargs, match in (
        (dict(block=-1), "block must be >= 1, got block=-1"),
        (dict(block=0), "block must be >= 1, got block=0"),
        (dict(decay=float("nan")), "decay must be a finite number, got decay=nan"),
        (dict(noise=float("inf")), "noise must be a finite number, got noise=inf"),
        (dict(out=np.empty((10, 4), np.float32)), r"out must be a float32 \[n=5, dim=4\] array, "
                                                   r"got shape \(10, 4\)"),
        (dict(n=2.5), "n must be an integer, got n=2.5"),
    ):
        with pytest.raises(ValueError, match=match):
            mrl_like(**{"n": 5, "dim": 4, "clusters": 2, **kwargs})
