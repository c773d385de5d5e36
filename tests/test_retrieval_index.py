"""MatryoshkaIndex against the exact reference; selection; save/load; bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from mrl import Nesting
from mrl.retrieval import MatryoshkaIndex, SearchConfig, exact_search, funnel_stages
from mrl.retrieval.funnel.select import blockmax_topk_numpy, blockmax_topk_torch

NEST = Nesting((4, 8, 16, 32))


def _data(n=400, q=30, seed=0):
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, 33) ** -0.5).astype(np.float32)  # leading dims carry more energy
    return (rng.standard_normal((n, 32)) * scale).astype(np.float32), (
        rng.standard_normal((q, 32)) * scale
    ).astype(np.float32)


def _index(db, **cfg):
    index = MatryoshkaIndex(NEST, SearchConfig(**cfg), threads=2)
    index.add(db)
    return index


def test_exact_reference_matches_brute_force():
    db, q = _data()
    s, i = exact_search(db, q, 5, block=64)
    full = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        db / np.linalg.norm(db, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(i, np.argsort(-full, axis=1)[:, :5])
    np.testing.assert_allclose(s, np.sort(full, axis=1)[:, ::-1][:, :5], rtol=1e-5)


@pytest.mark.parametrize("backend", ["flat", "numpy", "torch", "hnsw"])
def test_whole_database_shortlist_equals_exact(backend):
    db, q = _data()
    index = _index(db, shortlist_dim=4, shortlist=len(db), backend=backend)
    res = index.search(q, k=10, ef_search=len(db))
    s, i = exact_search(db, q, 10)
    np.testing.assert_array_equal(res.indices, i)
    np.testing.assert_allclose(res.scores, s, rtol=1e-5, atol=1e-6)


# (vector_dtype, metric): every combination the index accepts (int8 needs cosine).
DTYPE_METRIC = [("float32", "cosine"), ("float32", "dot"), ("float16", "cosine"),
                ("float16", "dot"), ("int8", "cosine")]
FUNNEL = funnel_stages(4, 80, 32, 10, NEST)  # ((8, 40), (16, 20), (32, 10))
def _scores_at(x, q, m, metric):
    """Reference scores [Q, N] at prefix m in float64: cosine (both re-normalised) or dot."""
    xm, qm = x[:, :m].astype(np.float64), q[:, :m].astype(np.float64)
    if metric == "cosine":
        xm = xm / np.linalg.norm(xm, axis=1, keepdims=True)
        qm = qm / np.linalg.norm(qm, axis=1, keepdims=True)
    return qm @ xm.T


def _reference_funnel(x, q, metric, shortlist_dim, shortlist, stages):
    """Plain funnel over the stored rows x [N, D]: the top-K at D_s, then each stage re-scores
    its candidates at m and keeps the best (score desc, then row asc). -> (scores, rows)."""
    s = _scores_at(x, q, shortlist_dim, metric)
    cand = np.argsort(-s, axis=1, kind="stable")[:, :shortlist]
    for m, keep in stages:
        sc = np.take_along_axis(_scores_at(x, q, m, metric), cand, axis=1)
        order = np.lexsort((cand, -sc), axis=1)[:, :keep]
        cand, s = np.take_along_axis(cand, order, axis=1), np.take_along_axis(sc, order, axis=1)
    return s, cand


def _typed_index(db, vector_dtype, metric, **cfg):
    # one thread: with two, each IVF build took ~1 s in this file on 2 busy cores (OpenMP)
    index = MatryoshkaIndex(NEST, SearchConfig(**cfg), metric=metric, vector_dtype=vector_dtype,
                            threads=1)
    index.add(db)
    return index


@pytest.mark.parametrize("vector_dtype,metric", [
    pytest.param(*dm)
    for dm in DTYPE_METRIC
])
def test_numpy_funnel_matches_a_plain_reference(vector_dtype, metric):
    """The numpy path (BLAS shortlist, batched rerank with precomputed inverse norms) against a
    float64 loop over the stored (widened / dequantised) rows: the reference of the test below."""
    db, q = _data()
    index = _typed_index(db, vector_dtype, metric, shortlist_dim=4, shortlist=80, stages=FUNNEL,
                         backend="numpy")
    res = index.search(q, 10)
    s, i = _reference_funnel(index.vectors(), q, metric, 4, 80, FUNNEL)
    np.testing.assert_array_equal(res.indices, i)
    # float32 products and inverse norms vs float64: ~1e-7 relative
    np.testing.assert_allclose(res.scores, s, rtol=1e-5, atol=1e-6)


def _backend_cases():
    for vector_dtype, metric in DTYPE_METRIC:
        for backend in ("flat", "torch", "hnsw", "ivf", "ivfpq"):
            yield pytest.param(backend, vector_dtype, metric,
                               id=f"{backend}-{vector_dtype}-{metric}")


@pytest.mark.parametrize("backend,vector_dtype,metric", list(_backend_cases()))
def test_funnel_backends_agree(backend, vector_dtype, metric):
    """Every shortlist backend, configured to be exact (HNSW ef_search = N, IVF nprobe = nlist),
    finds the numpy path's shortlist, and the funnel then returns the numpy path's results.
    IVF-PQ's 4-bit codes are lossy by design: its larger shortlist (3x) is re-scored exactly at
    D_s by a first stage keeping K, so the funnel is exact once that shortlist holds the exact
    top-K at D_s (checked first)."""
    if backend != "torch":
        pytest.importorskip("faiss")
    db, q = _data()
    n, kk = len(db), 80
    index = _typed_index(db, vector_dtype, metric, shortlist_dim=4, shortlist=kk, stages=FUNNEL,
                         backend="numpy", ef_search=n, nlist=8, nprobe=8)
    ref = index.search(q, 10)
    ref_short = np.sort(index._shortlist(q, index.config, kk), axis=1)  # [Q, K] exact at D_s
    if backend == "ivfpq":
        cfg = replace(index.config, backend="ivfpq", shortlist=3 * kk,
                      stages=((4, kk), *FUNNEL))
        big = index._shortlist(q, cfg, 3 * kk)
        assert all(np.isin(r, b).all() for r, b in zip(ref_short, big))
    else:
        cfg = replace(index.config, backend=backend)
        short = np.sort(index._shortlist(q, cfg, kk), axis=1)
        if (backend, metric) == ("hnsw", "dot"):
            # inner product is no metric: a graph on un-normalised prefixes can leave a row
            # unreachable (row 268 here), so even ef_search = N is approximate (documented)
            found = np.mean([np.isin(r, s).mean() for r, s in zip(ref_short, short)])
            assert found >= 0.99
            return
        if (backend, vector_dtype) == ("ivf", "float16"):
            # float16 codes (of the residuals to the cells' centroids, ~2e-4 off here): with
            # every cell probed, the shortlist is the exact top-K over the decoded codes
            ivf = index._ivf[(4, 8)]
            ivf.make_direct_map()
            codes = ivf.reconstruct_n(0, n)  # [N, 4]
            want = np.sort(np.argsort(-(index._norm_q(q, 4) @ codes.T), axis=1)[:, :kk], axis=1)
            np.testing.assert_array_equal(short, want)
        else:
            np.testing.assert_array_equal(short, ref_short)
    res = index.search(q, 10, **{f: getattr(cfg, f) for f in ("backend", "shortlist", "stages")})
    np.testing.assert_array_equal(res.indices, ref.indices)
    # same rows: the numpy rerank gives identical scores; torch's float32 rerank sums in
    # another order (~1e-7 relative)
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-5, atol=1e-6)


def test_funnel_stage_rerank_is_cosine_at_each_prefix():
    db, q = _data()
    index = _index(db, shortlist_dim=8, shortlist=len(db), stages=((16, len(db)),))
    res = index.search(q, k=7)  # last stage = 16 dims, whole database: exact at 16
    s, i = exact_search(db, q, 7, dims=16)
    np.testing.assert_array_equal(res.indices, i)
    np.testing.assert_allclose(res.scores, s, rtol=1e-5, atol=1e-6)


def test_funnel_stages_schedule():
    assert funnel_stages(16, 200, 128, 10, Nesting.doubling(8, 128)) == (
        (32, 100),
        (64, 50),
        (128, 10),
    )
    assert funnel_stages(32, 40, 32, 10, NEST) == ((32, 10),)


def test_add_after_build_and_ids():
    db, q = _data()
    index = _index(db[:200], shortlist_dim=4, shortlist=400)
    index.search(q, 5)  # builds the shortlist matrix
    index.add(db[200:])
    res = index.search(q, 5)
    _, i = exact_search(db, q, 5)
    np.testing.assert_array_equal(res.indices, i)
    np.testing.assert_array_equal(res.ids, i)


@pytest.mark.parametrize("backend", ["numpy", "hnsw"])
def test_save_load_round_trip(tmp_path, backend):
    db, q = _data()
    index = _index(db, shortlist_dim=8, shortlist=50, backend=backend)
    index.tuned = {"target_recall": 0.9}
    before = index.search(q, 5)
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # overwrite: old files removed
    loaded = MatryoshkaIndex.load(tmp_path / "idx")
    after = loaded.search(q, 5)
    np.testing.assert_array_equal(before.indices, after.indices)
    assert loaded.tuned == {"target_recall": 0.9} and loaded.config == index.config
    assert len(list((tmp_path / "idx").glob("vectors-*.npy"))) == 1
    (tmp_path / "idx" / "index.json").write_text("{damaged")  # replaced without being read
    index.save(tmp_path / "idx")
    assert len(list((tmp_path / "idx").glob("vectors-*.npy"))) == 1
    loaded.add(db[:3])
    assert loaded.count == len(db) + 3


@pytest.mark.parametrize("backend", ["hnsw", "ivf", "ivfpq"])
def test_a_killed_save_does_not_block_the_next_one(tmp_path, monkeypatch, backend):
    # Killed after the data files but before index.json: the folder holds only our own files
    # (and a temporary sibling of one), so the next save takes it over and cleans them up.
    import mrl.retrieval.funnel.index as index_module

    db, q = _data()
    index = _index(db, shortlist_dim=8, shortlist=50, backend=backend)
    index.search(q[:1], 5)  # builds the backend's structure, so that save writes its file

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(index_module, "atomic_write_json", killed)
        with pytest.raises(KeyboardInterrupt):
            index.save(tmp_path / "idx")
    (tmp_path / "idx" / ".vectors-0123456789ab.npy.k3x9.tmp").write_bytes(b"partial")
    orphans = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert len(orphans) >= 5 and "index.json" not in orphans
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    kept = {e["file"] for e in meta["files"].values()} | {"index.json"}
    assert {p.name for p in (tmp_path / "idx").iterdir()} == kept
    assert not set(orphans) & kept
    loaded = MatryoshkaIndex.load(tmp_path / "idx")
    np.testing.assert_array_equal(loaded.search(q, 5).indices, index.search(q, 5).indices)
    other = tmp_path / "other"
    other.mkdir()
    (other / "vectors-0123456789ab.npy").write_bytes(b"x")
    (other / "notes.txt").write_text("mine")  # not ours: the folder is refused as before
    with pytest.raises(FileExistsError, match="non-empty folder without index.json"):
        index.save(other)


def test_load_rejects_version_and_truncation(tmp_path):
    db, _ = _data()
    _index(db).save(tmp_path / "idx")
    vec = next((tmp_path / "idx").glob("vectors-*.npy"))
    vec.write_bytes(vec.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        MatryoshkaIndex.load(tmp_path / "idx")
    side = tmp_path / "idx" / "index.json"
    meta = json.loads(side.read_text())
    meta["version"] = 7
    side.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 7"):
        MatryoshkaIndex.load(tmp_path / "idx")
    side.write_text(side.read_text()[:20])
    with pytest.raises(ValueError, match="truncated or not valid JSON"):
        MatryoshkaIndex.load(tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="no MatryoshkaIndex"):
        MatryoshkaIndex.load(tmp_path / "none")


def _edit_sidecar(path, edit):
    meta = json.loads((path / "index.json").read_text())
    edit(meta)
    (path / "index.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["files"].pop("ids"), r"files\.ids must be \{'file': name, 'bytes': size\}, "
     "got None"),
    (lambda m: m.update(config=None), "'config' must be a dict, got None"),
    (lambda m: m.update(count="400"), "'count' must be a int, got '400'"),
    (lambda m: m.update(nesting={"sizes": [4, 8, 16, 64]}), "its nesting ends at 64 but its "
     r"vectors have shape \(400, 32\)"),
])
def test_load_names_what_is_wrong_with_a_damaged_sidecar(tmp_path, edit, message):
    db, _ = _data()
    _index(db).save(tmp_path / "idx")
    _edit_sidecar(tmp_path / "idx", edit)
    with pytest.raises(ValueError, match=message):
        MatryoshkaIndex.load(tmp_path / "idx")


def test_empty_queries_and_tiny_ivfpq_are_clear_errors():
    db, q = _data()
    with pytest.raises(ValueError, match=r"at least one row, got shape \(0, 32\)"):
        _index(db).search(q[:0], 5)
    tiny = _index(db[:10], backend="ivfpq", shortlist_dim=8, shortlist=5)
    with pytest.raises(ValueError, match="ivfpq backend needs at least 16 database items"):
        tiny.search(q, 3)


@pytest.mark.parametrize("part", ["vectors-*.npy", "hnsw-*.faiss", "ivf-*.faiss"])
def test_same_size_corruption_names_the_file(tmp_path, part):
    db, _ = _data()
    backend = {"vec": "flat", "hns": "hnsw", "ivf": "ivf"}[part[:3]]
    index = _index(db, shortlist_dim=8, backend=backend, nlist=8)
    index.build()
    index.save(tmp_path / "idx")
    f = next((tmp_path / "idx").glob(part))
    raw = bytearray(f.read_bytes())
    raw[:16] = b"\xff" * 16  # the header: same size, unreadable
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"index file .*{f.name} is damaged or unreadable"):
        MatryoshkaIndex.load(tmp_path / "idx")


def test_bad_input_messages():
    db, q = _data()
    index = _index(db)
    with pytest.raises(ValueError, match=r"queries must have shape \[Q, 32\]"):
        index.search(q[:, :16])
    with pytest.raises(ValueError, match="floating point"):
        index.search(q.astype(np.int64))
    bad = q.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="query 2 has NaN"):
        index.search(bad)
    with pytest.raises(ValueError, match=r"k must be <= number of database items \(400\)"):
        index.search(q, k=500, shortlist=600)
    with pytest.raises(ValueError, match="shortlist must be >= k"):
        index.search(q, k=20, shortlist=10)
    with pytest.raises(ValueError, match="shortlist_dim must be a prefix size"):
        index.search(q, shortlist_dim=5)
    with pytest.raises(ValueError, match="backend must be one of"):
        index.search(q, backend="gpu")
    with pytest.raises(ValueError, match="stages dims must increase"):
        index.search(q, shortlist_dim=8, stages=((16, 50), (8, 10)))
    with pytest.raises(ValueError, match="unknown search options"):
        index.search(q, shortlst=3)
    with pytest.raises(ValueError, match="dimension 32"):
        index.add(np.zeros((2, 8)))
    with pytest.raises(ValueError, match="the index is empty"):
        MatryoshkaIndex(NEST).search(q)


@pytest.mark.parametrize(
    "n,k,block", [(10_000, 50, None), (1003, 7, 16), (300, 20, 8), (64, 64, 8)]
)
def test_blockmax_topk_matches_reference(n, k, block):
    import torch

    rng = np.random.default_rng(n)
    s = rng.standard_normal((5, n)).astype(np.float32)
    ref = np.sort(s, axis=1)[:, ::-1][:, :k]
    ref_i = np.argsort(-s, axis=1)[:, :k]
    v, i = blockmax_topk_numpy(s, k, block)
    np.testing.assert_array_equal(v, ref)
    np.testing.assert_array_equal(i, ref_i)
    tv, ti = blockmax_topk_torch(torch.from_numpy(s), k, block)
    np.testing.assert_array_equal(tv.numpy(), ref)
    np.testing.assert_array_equal(ti.numpy(), ref_i)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_blockmax_topk_numpy_matches_topk_numpy_with_nan_ties_and_inf(dtype):
    """A NaN in a block made its max NaN, ranked last: the block's top score was skipped."""
    from mrl.retrieval.funnel.select import topk_numpy

    rng = np.random.default_rng(0)
    s = np.round(rng.standard_normal((4, 1030)), 1).astype(dtype)  # ties
    s[0, 3], s[0, 5] = 9.0, np.nan  # the top score shares its block with a NaN
    s[1, :64] = np.nan  # a whole block of NaN
    s[2, 100:200] = -np.inf
    s[3, 1027] = 8.0  # in the ragged last block, beside a NaN
    s[3, 1029] = np.nan
    for k, block in ((5, 8), (10, 16)):
        v, i = blockmax_topk_numpy(s, k, block)
        rv, _ = topk_numpy(s, k)
        np.testing.assert_array_equal(v, rv)
        np.testing.assert_array_equal(np.take_along_axis(s, i, axis=1), v)  # indices hold them
    assert blockmax_topk_numpy(s, 5, 8)[0][0, 0] == 9.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "q,n,k", [(7, 1000, 1), (7, 1000, 37), (3, 50, 49), (1, 5, 5), (4, 2000, 200)]
)
def test_argtopk_selects_what_argpartition_selects(dtype, q, n, k):
    from mrl.retrieval.exact import argtopk

    s = np.random.default_rng(n + k).standard_normal((q, n)).astype(dtype)  # distinct values
    ref = np.argpartition(-s, k - 1, axis=1)[:, :k]  # the reference the fast path replaces
    got = argtopk(s, k)
    assert got.shape == (q, k) and got.dtype == np.int64
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(ref, axis=1))


def test_argtopk_nan_read_only_ties_and_bad_k():
    from mrl.retrieval.exact import argtopk

    s = np.array([[0.5, np.nan, 0.9, 0.1], [np.nan, np.nan, 0.2, 0.3]], np.float32)
    ref = np.argpartition(-s, 1, axis=1)[:, :2]  # NaN sorts last there: never selected
    np.testing.assert_array_equal(np.sort(argtopk(s, 2), axis=1), np.sort(ref, axis=1))
    ro = np.arange(12, dtype=np.float32).reshape(2, 6)[:, ::-1]  # read-only, not contiguous
    ro.flags.writeable = False
    np.testing.assert_array_equal(np.sort(argtopk(ro, 3), axis=1), [[0, 1, 2], [0, 1, 2]])
    tied = np.ones((2, 6), np.float32)
    tied[:, 4] = 2.0
    got = argtopk(tied, 3)  # the 2.0 and any two of the tied 1.0s
    assert all(4 in row and len(set(row)) == 3 for row in got.tolist())
    ints = np.array([[3, 9, 1]], np.int64)  # other dtypes take the reference path
    np.testing.assert_array_equal(np.sort(argtopk(ints, 2), axis=1), [[0, 1]])
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\], got k=4"):
        argtopk(ints, 4)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_compressed_vectors_close_to_exact(dtype, tmp_path):
    db, q = _data()
    index = MatryoshkaIndex(
        NEST, SearchConfig(shortlist_dim=4, shortlist=len(db)), vector_dtype=dtype
    )
    index.add(db)
    res = index.search(q, 10)
    s, i = exact_search(db, q, 10)
    # A stored row x' moves each cosine with row x by at most the angle between them,
    # asin(|x' - x| / |x|) (float16's inverse norms, those of x, change it by at most |x' - x| /
    # |x| too), and the j-th best score by at most the largest such move among the rows of both
    # top-j lists. float16 rounds every coordinate to 2**-11 relative, so the angle is <= 2**-11
    # (~5e-4); int8 rounds to half a step of its column's scale, so it depends on the row: the
    # tolerance is per query, over the rows of its two top-10 lists (7e-3 to 1.2e-2 here).
    stored = index.vectors()
    rel = np.linalg.norm(stored - db, axis=1) / np.linalg.norm(db, axis=1)
    if dtype == "float16":
        assert rel.max() <= 2**-11
    else:
        assert (np.abs(stored - db) <= index._col_scale / 2 * (1 + 1e-6)).all()
    angle = np.arcsin(np.minimum(rel, 1.0))
    tol = np.array([angle[np.union1d(a, b)].max() for a, b in zip(res.indices, i)]) + 1e-6
    assert (np.abs(res.scores - s) <= tol[:, None]).all(), np.abs(res.scores - s).max(axis=1) - tol
    assert np.mean([len(np.intersect1d(a, b)) for a, b in zip(res.indices, i)]) >= 9
    index.save(tmp_path / "i")
    again = MatryoshkaIndex.load(tmp_path / "i").search(q, 10)
    np.testing.assert_array_equal(again.indices, res.indices)
    with pytest.raises(ValueError, match="needs metric='cosine'"):
        MatryoshkaIndex(NEST, vector_dtype="int8", metric="dot")


def test_none_override_means_index_default():
    db, q = _data()
    index = _index(db, shortlist_dim=8, shortlist=50)
    a = index.search(q, k=3)
    b = index.search(q, k=3, stages=None, shortlist=None)
    np.testing.assert_array_equal(a.indices, b.indices)


@pytest.mark.parametrize("vector_dtype", ["float32", "float16", "int8"])
def test_prefix_inverse_norms_are_those_of_the_stored_rows(vector_dtype):
    """[N, G] inverse prefix norms (rerank and shortlist scale) = 1 / |stored row[:m]|, for the
    rows as stored: dequantised int8 codes, including rows a later add clipped to the scale."""
    db, _ = _data()
    index = MatryoshkaIndex(NEST, vector_dtype=vector_dtype)
    index.add(db[:250])
    if vector_dtype == "int8":  # beyond the first add's column scale, so clipped (and warned)
        with pytest.warns(UserWarning, match="were clipped"):
            index.add(db[250:] * 1.5)
    else:
        index.add(db[250:] * 1.5)
    stored = index.vectors().astype(np.float64)  # [N, D] widened / dequantised
    if vector_dtype == "int8":
        assert (np.abs(stored[250:]) == 127 * index._col_scale).any()  # clipping happened
    for g, m in enumerate(NEST.sizes):
        want = 1.0 / np.linalg.norm(stored[:, :m], axis=1)
        # float64 sums rounded once to float32: half an ulp, 2**-24 ~ 6e-8 relative
        np.testing.assert_allclose(index._inv_norms[:, g], want, rtol=2e-7, atol=0)
    dot = MatryoshkaIndex(NEST, metric="dot")
    dot.add(db)
    assert dot._inv_norms.shape == (len(db), len(NEST)) and (dot._inv_norms == 1).all()


# ---------------------------------------------------------------- IVF shortlist backend
@pytest.mark.parametrize("vector_dtype", ["float32", "float16"])
def test_ivf_full_probe_equals_flat_shortlist(vector_dtype):
    """nprobe = nlist scans every row: the IVF shortlist is the exact prefix top-K (flat)."""
    db, q = _data()
    cfg = SearchConfig(shortlist_dim=8, shortlist=40, backend="ivf", nlist=12, nprobe=12)
    ivf = MatryoshkaIndex(NEST, cfg, vector_dtype=vector_dtype, threads=2)
    ivf.add(db)
    cand = ivf._shortlist(q, ivf.config, 40)  # [Q, K] rows
    ref = ivf._shortlist(q, replace(ivf.config, backend="flat"), 40)
    if vector_dtype == "float32":
        np.testing.assert_array_equal(cand, ref)
    else:  # float16 codes: near-ties may swap across the K-th place, nothing else
        assert np.mean([len(np.intersect1d(a, b)) for a, b in zip(cand, ref)]) >= 39
    stages = funnel_stages(8, 40, 32, 10, NEST)
    res = ivf.search(q, 10, stages=stages)
    flat = ivf.search(q, 10, stages=stages, backend="flat")
    np.testing.assert_array_equal(res.indices, flat.indices)
    np.testing.assert_allclose(res.scores, flat.scores, rtol=1e-6)
    assert ivf.ivf_nlist() == 12


def test_ivf_whole_database_equals_exact():
    db, q = _data()
    index = _index(db, shortlist_dim=4, shortlist=len(db), backend="ivf", nlist=8, nprobe=8)
    res = index.search(q, k=10)
    s, i = exact_search(db, q, 10)
    np.testing.assert_array_equal(res.indices, i)
    np.testing.assert_allclose(res.scores, s, rtol=1e-5, atol=1e-6)


def test_ivf_few_probes_pads_and_recall_grows():
    db, q = _data()
    index = _index(db, shortlist_dim=8, shortlist=100, backend="ivf", nlist=40)
    _, truth = exact_search(db, q, 10)
    hits = []
    for p in (1, 4, 40):
        res = index.search(q, 10, nprobe=p)
        if p > 1:  # one ~10-row cell may not fill k=10 (test_ivf_short_lists_... covers it)
            assert (res.indices >= 0).all()
        hits.append(np.mean([len(np.intersect1d(a, b)) for a, b in zip(res.indices, truth)]))
    assert hits[0] <= hits[1] <= hits[2]
    one = index._shortlist(q, replace(index.config, nprobe=1), 100)  # ~10 rows in one cell
    assert (one == -1).any() and (index._shortlist(q, index.config, 100) >= 0).sum() > (
        one >= 0
    ).sum()
    flat = _index(db, shortlist_dim=8).memory_bytes()  # prefix copy [N, 8] float32
    assert index.memory_bytes() == flat + len(db) * 8 + 40 * 8 * 4  # + row ids + centroids


def test_ivf_short_lists_are_marked_empty_not_row_zero():
    # One probed cell of ~10 rows cannot fill k=20: the empty slots must not look like row 0.
    db, q = _data()
    for ids in (None, [f"d{i}" for i in range(len(db))]):
        index = MatryoshkaIndex(NEST, SearchConfig(shortlist_dim=8, shortlist=100, backend="ivf",
                                                   nlist=40, nprobe=1), threads=2)
        index.add(db, ids=ids)
        res = index.search(q, 20)
        short = ~res.found.all(axis=1)
        assert short.any()
        empty = res.indices < 0
        assert np.isneginf(res.scores[empty]).all() and np.isfinite(res.scores[~empty]).all()
        assert (res.ids[empty] == (-1 if ids is None else "")).all()
        # empty slots trail the real hits, and hits() drops them
        assert (np.diff(empty.astype(int), axis=1) >= 0).all()
        j = int(np.flatnonzero(short)[0])
        hit_ids, hit_scores = res.hits(j)
        assert len(hit_ids) == len(hit_scores) == int(res.found[j].sum()) < 20
        assert hit_ids == res.ids[j][: len(hit_ids)].tolist()


def test_ivf_save_load_add_round_trip(tmp_path):
    db, q = _data()
    index = _index(db[:300], shortlist_dim=8, shortlist=50, backend="ivf", nlist=10, nprobe=3)
    before = index.search(q, 5)
    index.save(tmp_path / "idx")
    assert len(list((tmp_path / "idx").glob("ivf-8-10-*.faiss"))) == 1
    loaded = MatryoshkaIndex.load(tmp_path / "idx")
    np.testing.assert_array_equal(loaded.search(q, 5).indices, before.indices)
    for ix in (index, loaded):  # add after build: the new rows go into the existing cells
        ix.add(db[300:])
        assert ix.count == len(db) and ix.ivf_nlist() == 10
    a, b = index.search(q, 5, nprobe=10), loaded.search(q, 5, nprobe=10)
    np.testing.assert_array_equal(a.indices, b.indices)
    _, i = exact_search(db, q, 5)  # nprobe = nlist and K = 50: the true top-5 on this data
    assert np.mean(a.indices == i) > 0.95
    loaded.save(tmp_path / "idx")
    again = MatryoshkaIndex.load(tmp_path / "idx")
    np.testing.assert_array_equal(again.search(q, 5, nprobe=10).indices, a.indices)


def test_ivf_bad_input_messages():
    db, q = _data()
    index = _index(db, shortlist_dim=8, backend="ivf", nlist=10)
    with pytest.raises(ValueError, match="nprobe must be >= 1, got nprobe=0"):
        index.search(q, nprobe=0)
    with pytest.raises(ValueError, match=r"nlist must be in \[1, 400\], got nlist=401"):
        index.search(q, nlist=401)
    with pytest.raises(ValueError, match="nlist must be an integer, got nlist=2.5"):
        index.search(q, nlist=2.5)
    with pytest.raises(ValueError, match="nprobe must be an integer"):
        SearchConfig(nprobe="8") and MatryoshkaIndex(NEST, SearchConfig(nprobe="8"))
    with pytest.raises(ValueError, match="add vectors before building an IVF"):
        MatryoshkaIndex(NEST, SearchConfig(backend="ivf", shortlist_dim=8)).build()


@pytest.mark.parametrize("vector_dtype", ["float32", "float16", "int8"])
def test_batched_candidate_dots_match_reference(vector_dtype):
    """The batched rerank product (float16 widened by torch) vs one widened dot per pair."""
    rng = np.random.default_rng(3)
    db = rng.standard_normal((500, 32)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    index = MatryoshkaIndex(NEST, vector_dtype=vector_dtype)
    index.add(db)
    q = index._norm_q(rng.standard_normal((7, 32)).astype(np.float32), 16)  # [Q, m]
    q = q * index._col_scale[:16]
    cand = rng.integers(0, 500, (7, 40))  # [Q, K]
    fast, ref = index._candidate_dots(q, cand), index._candidate_dots_reference(q, cand)
    assert fast.shape == (7, 40) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6)  # float32 accumulation only
    near = index._candidate_dots(q, np.zeros((7, 1), np.int64) + cand[:, :1])  # repeat a row
    np.testing.assert_allclose(near, ref[:, :1], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- IVF-PQ fast-scan backend
def test_ivfpq_whole_database_equals_exact():
    """Every row probed and kept: the exact re-score at D_s, then D, is exact search."""
    db, q = _data()
    cfg = dict(shortlist_dim=8, shortlist=len(db), backend="ivfpq", nlist=8, nprobe=8)
    index = _index(db, **cfg, stages=((8, len(db)), (32, 10)))
    res = index.search(q, k=10)
    s, i = exact_search(db, q, 10)
    np.testing.assert_array_equal(res.indices, i)
    np.testing.assert_allclose(res.scores, s, rtol=1e-5, atol=1e-6)


def test_ivfpq_shortlist_approximates_flat_and_is_smaller():
    """4-bit codes blur the prefix scores: a larger PQ shortlist holds more of the exact prefix
    top-K (here 67/89/98/99.8% at 2/4/8/16x); its codes take less memory than the IVF's
    float32 prefix copy."""
    db, q = _data(n=2000)
    pq = _index(db, shortlist_dim=16, backend="ivfpq", nlist=20, nprobe=20)
    flat = pq._shortlist(q, replace(pq.config, backend="flat"), 20)  # [Q, 20] exact at D_s
    inside = []
    for mult in (2, 8, 16):
        big = pq._shortlist(q, pq.config, 20 * mult)  # [Q, 20 * mult] approximate
        assert (big >= 0).all()
        inside.append(np.mean([np.isin(f, b).mean() for f, b in zip(flat, big)]))
    assert inside[0] < inside[1] < inside[2] and inside[1] > 0.95 and inside[2] > 0.99
    ivf = _index(db, shortlist_dim=16, backend="ivf", nlist=20)
    ivf.build()
    saved = ivf.memory_bytes() - pq.memory_bytes()  # 4 code bytes per row vs 64 (16 float32)
    assert len(db) * 60 - 20 * 31 * 4 - 16 * 16 * 4 <= saved <= len(db) * 60  # - padding, books
    slots = pq._fastscan_rows(pq.config)
    assert len(db) <= slots < len(db) + 20 * 32  # each cell padded to a block of 32 codes


def test_ivfpq_save_load_round_trip(tmp_path):
    db, q = _data()
    index = _index(db, shortlist_dim=8, shortlist=80, backend="ivfpq", nlist=10, nprobe=4)
    before = index.search(q, 5, stages=((8, 20), (32, 5)))
    index.save(tmp_path / "idx")
    assert len(list((tmp_path / "idx").glob("ivfpq-8-10-*.faiss"))) == 1
    loaded = MatryoshkaIndex.load(tmp_path / "idx")
    after = loaded.search(q, 5, stages=((8, 20), (32, 5)))
    np.testing.assert_array_equal(after.indices, before.indices)
    assert loaded.memory_bytes() == index.memory_bytes()
    extra, _ = _data(n=50, seed=7)
    for ix in (index, loaded):  # add after build: new rows get codes in the existing cells
        ix.add(extra)
        pq = ix._ivfpq[(8, 10)]
        assert ix.count == pq.ntotal == len(db) + 50
        every = {"nprobe": 10, "shortlist": ix.count, "stages": ((8, ix.count), (32, 1))}
        res = ix.search(extra[:5], 1, **every)  # all cells, all rows: exact search
        np.testing.assert_array_equal(res.indices[:, 0], np.arange(len(db), len(db) + 5))


def test_larger_k_widens_the_saved_funnel_only():
    db, q = _data()
    index = _index(db, shortlist_dim=8, shortlist=40, stages=((16, 20), (32, 10)))
    got = index.search(q, 30)  # the funnel keeps 20 at D=16: widened to 30
    want = index.search(q, 30, shortlist=40, stages=((16, 30), (32, 30)))
    np.testing.assert_array_equal(got.indices, want.indices)
    wide = index.search(q, 50, shortlist=50, stages=((16, 50), (32, 50)))
    np.testing.assert_array_equal(index.search(q, 50).indices, wide.indices)
    with pytest.raises(ValueError, match="shortlist must be >= k"):
        index.search(q, 30, shortlist=20)  # an explicit choice is validated as given
    with pytest.raises(ValueError, match=r"stages\[0\] keep must be in \[k=30, 40\]"):
        index.search(q, 30, stages=((16, 20), (32, 10)))


def test_torch_backend_on_a_loaded_index_does_not_warn(tmp_path):
    import warnings

    db, q = _data()
    _index(db).save(tmp_path / "idx")
    index = MatryoshkaIndex.load(tmp_path / "idx")  # read-only memory maps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = index.search(q, 5, backend="torch")
    np.testing.assert_array_equal(res.indices, index.search(q, 5).indices)


def test_all_zero_rows_are_indexed_with_a_warning():
    db, q = _data()
    db[[5, 9]] = 0.0
    with pytest.warns(UserWarning, match=r"2 of 400 added rows are all zeros \(first: row 5\)"):
        index = _index(db)
    res = index.search(q, 5)
    assert not np.isin(res.indices, [5, 9]).any()  # score 0: below every real neighbour
