"""The index's space: rows and queries normalised and centred alike, and the options that
describe a search (numpy ints, float sizes, list stages) made plain Python values.

Reference: exact search (`exact_search`) on rows and queries put into the space by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mrl import Nesting
from mrl.cli import main
from mrl.retrieval import EmbeddingStore, MatryoshkaIndex, SearchConfig, exact_search
from mrl.retrieval.synthetic import mrl_like

NEST = Nesting((8, 16, 32))


def _positive(n: int, seed: int) -> np.ndarray:
    """Post-ReLU-like rows [n, 32] whose norms vary 40x: normalising before centring matters."""
    rng = np.random.default_rng(seed)
    x, _ = mrl_like(n, 32, clusters=10, seed=seed)
    x = np.abs(x) + 0.5
    return (x * rng.uniform(0.5, 20, (n, 1))).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_normalised_store_centred_by_the_index_normalises_raw_queries(tmp_path):
    """`mrl embed` writes unit rows; `mrl index build STORE --center` took the mean of those and
    subtracted it from raw queries, which are in another space: recall@10 0.24 against exact
    search at a whole-database shortlist. The index now normalises queries first (saved)."""
    db, q = _positive(600, 0), _positive(30, 1)
    EmbeddingStore.from_array(tmp_path / "db", db, NEST, normalize=True)
    np.save(tmp_path / "q.npy", q)
    out = tmp_path / "idx"
    assert main(["index", "build", str(tmp_path / "db"), "--out", str(out), "--center",
                 "--shortlist", "600"]) == 0  # fmt: skip
    center = _unit(db).mean(0)
    _, want = exact_search(_unit(db) - center, _unit(q) - center, 10)
    _, raw = exact_search(_unit(db) - center, q - center, 10)
    assert (want != raw).any()  # the data tells the two spaces apart
    res = tmp_path / "r.json"
    assert main(["search", str(out), str(tmp_path / "q.npy"), "--k", "10", "--out",
                 str(res)]) == 0  # fmt: skip
    got = np.array([r["ids"] for r in json.loads(res.read_text())["results"]])
    np.testing.assert_array_equal(got, want)
    assert MatryoshkaIndex.load(out).normalize
    # queries from a normalised store of the same model: the same answer
    EmbeddingStore.from_array(tmp_path / "qs", q, NEST, normalize=True)
    assert main(["search", str(out), str(tmp_path / "qs"), "--k", "10", "--out",
                 str(res)]) == 0  # fmt: skip
    got = np.array([r["ids"] for r in json.loads(res.read_text())["results"]])
    np.testing.assert_array_equal(got, want)


def test_a_store_without_normalize_or_a_store_center_keeps_the_index_raw(tmp_path):
    """Only unit rows centred by the index need it: a raw store with --center, a store with its
    own center (it subtracted the center before normalising) and a store without --center do
    not normalise queries."""
    db = _positive(200, 2)
    EmbeddingStore.from_array(tmp_path / "raw", db, NEST)
    EmbeddingStore.from_array(tmp_path / "own", db, NEST, normalize=True, center=db.mean(0))
    EmbeddingStore.from_array(tmp_path / "unit", db, NEST, normalize=True)
    for name, extra in (("raw", ["--center"]), ("own", []), ("unit", [])):
        out = tmp_path / f"idx-{name}"
        assert main(["index", "build", str(tmp_path / name), "--out", str(out), *extra]) == 0
        assert not MatryoshkaIndex.load(out).normalize, name


def test_search_refuses_query_stores_of_another_space(tmp_path, capsys):
    """Normalised query rows against an index that centres raw rows (recall@10 0.03 before),
    and a centred query store against an index that normalises before its center."""
    db, q = _positive(300, 3), _positive(10, 4)
    np.save(tmp_path / "db.npy", db)
    EmbeddingStore.from_array(tmp_path / "qs", q, NEST, normalize=True)
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "raw"),
                 "--nesting", "8,16,32", "--center"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["search", str(tmp_path / "raw"), str(tmp_path / "qs"), "--k", "5"]) == 2
    assert "holds L2-normalised rows, but the index centres rows" in capsys.readouterr().err
    EmbeddingStore.from_array(tmp_path / "unit", db, NEST, normalize=True)
    assert main(["index", "build", str(tmp_path / "unit"), "--out", str(tmp_path / "norm"),
                 "--center"]) == 0  # fmt: skip
    center = MatryoshkaIndex.load(tmp_path / "norm").center
    EmbeddingStore.from_array(tmp_path / "qc", q, NEST, normalize=True, center=center)
    capsys.readouterr()
    assert main(["search", str(tmp_path / "norm"), str(tmp_path / "qc"), "--k", "5"]) == 2
    assert "subtracts a center before normalising" in capsys.readouterr().err


def test_normalize_in_the_library_matches_the_reference_and_survives_save(tmp_path):
    db, q = _positive(400, 5), _positive(20, 6)
    center = _unit(db).mean(0)
    index = MatryoshkaIndex(NEST, center=center, normalize=True)
    index.add(db)
    _, want = exact_search(_unit(db) - center, _unit(q) - center, 10)
    np.testing.assert_array_equal(index.search(q, 10, shortlist=400).indices, want)
    # rows already in the index's space (normalised and centred) skip both steps
    np.testing.assert_array_equal(
        index.search(_unit(q) - center, 10, shortlist=400, centered=True).indices, want
    )
    index.save(tmp_path / "i")
    loaded = MatryoshkaIndex.load(tmp_path / "i")
    assert loaded.normalize
    np.testing.assert_array_equal(loaded.search(q, 10, shortlist=400).indices, want)
    with pytest.raises(ValueError, match="normalize must be True or False"):
        MatryoshkaIndex(NEST, normalize="yes")


def test_an_index_saved_before_normalize_existed_loads_as_raw(tmp_path):
    db = _positive(50, 7)
    index = MatryoshkaIndex(NEST, center=db.mean(0))
    index.add(db)
    index.save(tmp_path / "i")
    side = tmp_path / "i" / "index.json"
    meta = json.loads(side.read_text())
    del meta["normalize"]
    side.write_text(json.dumps(meta))
    assert MatryoshkaIndex.load(tmp_path / "i").normalize is False


def test_save_refuses_a_folder_whose_index_json_is_another_programs(tmp_path, capsys):
    """Any folder holding an index.json was taken for an index and written into (the file
    replaced, index files mixed in beside the user's)."""
    db = _positive(40, 8)
    np.save(tmp_path / "db.npy", db)
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.json").write_text('{"my": "precious config"}')
    (other / "weights.bin").write_text("data")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "index.json").write_text("[1, 2]")
    for folder in (other, lone):
        before = {p.name: p.read_text() for p in folder.iterdir()}
        assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(folder)]) == 2
        assert "holds a index.json that is not a MatryoshkaIndex's" in capsys.readouterr().err
        assert {p.name: p.read_text() for p in folder.iterdir()} == before
    out = tmp_path / "idx"  # an index folder is still replaced
    for _ in range(2):
        assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(out)]) == 0
    assert MatryoshkaIndex.load(out).count == 40


@pytest.mark.parametrize("backend", ["flat", "numpy", "ivf"])
def test_numpy_integer_options_and_list_stages_search_and_save(tmp_path, backend):
    """np.int64 options (from an array) made FAISS raise a SWIG TypeError and save() write five
    files but no index.json; list stages failed every search."""
    db, q = _positive(300, 9), _positive(5, 10)
    index = MatryoshkaIndex(NEST)
    index.add(db)
    want = index.search(q, 5, shortlist=64, nprobe=4, backend=backend).indices
    got = index.search(q, 5, shortlist=np.int64(64), nprobe=np.int64(4), backend=backend)
    np.testing.assert_array_equal(got.indices, want)
    assert type(got.config.shortlist) is int and type(got.config.nprobe) is int
    cfg = SearchConfig(shortlist_dim=np.int64(8), shortlist=np.int32(50),
                       stages=[[np.int64(16), 20], [32, 10]], backend=backend)  # fmt: skip
    assert cfg.stages == ((16, 20), (32, 10)) and type(cfg.stages[0][0]) is int
    tuned = MatryoshkaIndex(NEST, cfg)
    tuned.add(db)
    res = tuned.search(q, 5, stages=[[16, 20], [32, 10]])
    assert res.config.stages == ((16, 20), (32, 10))
    np.testing.assert_array_equal(res.indices, tuned.search(q, 5, stages=((16, 20), (32, 10)))
                                  .indices)  # fmt: skip
    tuned.save(tmp_path / "i")
    assert MatryoshkaIndex.load(tmp_path / "i").config == cfg


def test_float_sizes_are_named_not_truncated_or_sliced():
    with pytest.raises(ValueError, match="shortlist_dim must be an integer, got shortlist_dim=8.0"):
        MatryoshkaIndex(NEST, SearchConfig(shortlist_dim=8.0))
    index = MatryoshkaIndex(NEST)
    index.add(_positive(50, 11))
    with pytest.raises(ValueError, match=r"stages\[0\] dim must be an integer"):
        index.search(_positive(2, 12), 5, stages=((8.0, 10), (32, 5)))


@pytest.mark.parametrize("n", [999, 1001, 1003, 1007])
@pytest.mark.parametrize("k", [10, 100])
def test_blockmax_topk_with_fewer_than_k_finite_scores(n, k):
    """Masked items scored -inf tied with the padding: the torch pass returned columns >= N
    (an IndexError through the index), the numpy pass column 0 for the padding."""
    import torch

    from mrl.retrieval.funnel.select import blockmax_topk_numpy, blockmax_topk_torch

    rng = np.random.default_rng(n + k)
    s = np.full((4, n), -np.inf, np.float32)
    s[0, 5] = 1.0
    s[1, rng.choice(n, k // 2, replace=False)] = rng.standard_normal(k // 2)
    s[2] = rng.standard_normal(n)  # all finite: the block path itself
    s[3, rng.choice(n, k + 3, replace=False)] = rng.standard_normal(k + 3)
    ref = -np.sort(-s, axis=1)[:, :k]
    for vals, cols in (blockmax_topk_numpy(s, k, block=8),
                       [t.numpy() for t in blockmax_topk_torch(torch.from_numpy(s), k, 8)]):
        np.testing.assert_array_equal(vals, ref)
        assert ((cols >= 0) & (cols < n)).all()
        assert all(len(set(row)) == k for row in cols.tolist())  # k distinct columns
        np.testing.assert_array_equal(np.take_along_axis(s, cols, axis=1), vals)


def test_exact_search_takes_rows_of_extreme_magnitude():
    """The reference took database norms in float32: a row of 1e20 scored 0 against a query
    pointing at it, one of 1e-22 scored above 1; the index got both right."""
    rng = np.random.default_rng(13)
    db = rng.standard_normal((6, 32)).astype(np.float32)
    q = db[:2].copy()
    db[0] *= 1e-22
    db[1] *= 1e20
    scores, idx = exact_search(db, q, 3)
    np.testing.assert_array_equal(idx[:, 0], [0, 1])
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    assert (scores <= 1.0 + 1e-5).all()
    index = MatryoshkaIndex(NEST)
    index.add(db)
    np.testing.assert_array_equal(index.search(q, 3, shortlist=6).indices, idx)


def test_shortlist_below_k_names_the_flags(tmp_path, capsys):
    np.save(tmp_path / "db.npy", _positive(100, 14))
    np.save(tmp_path / "q.npy", _positive(3, 15))
    out = str(tmp_path / "idx")
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", out, "--funnel",
                 "--shortlist", "5", "--k", "10"]) == 2  # fmt: skip
    assert "--shortlist must be >= --k (10) with --funnel, got --shortlist 5" in (
        capsys.readouterr().err)
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", out]) == 0
    capsys.readouterr()
    assert main(["search", out, str(tmp_path / "q.npy"), "--k", "10", "--shortlist", "3"]) == 2
    assert "--shortlist must be >= --k (10), got --shortlist 3" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["flat", "hnsw", "ivf"])
def test_memory_estimate_matches_what_the_saved_index_holds(tmp_path, backend):
    """The HNSW estimate left out the graph's own copy of the prefix (the saved index was
    1.2x the estimate), so a tuned max_memory budget could be exceeded."""
    db = _positive(3000, 16)
    index = MatryoshkaIndex(NEST, SearchConfig(shortlist_dim=16, backend=backend))
    index.add(db)
    index.build()
    index.save(tmp_path / "i")
    held = sum(p.stat().st_size for p in (tmp_path / "i").iterdir() if p.suffix != ".json")
    assert 0.9 * held <= index.memory_bytes() <= 1.1 * held


def test_a_failed_or_unapplied_tuning_leaves_no_candidate_structures(tmp_path):
    """A MemoryBudgetError kept 4 shortlist matrices, 2 graphs, 3 IVFs and 3 IVF-PQs: a save
    grew from 5.3 to 13.2 MB while memory_bytes() reported 5.6."""
    from mrl.retrieval.tune import MemoryBudgetError, tune

    db, _ = mrl_like(3000, 32, clusters=30, seed=3)
    index = MatryoshkaIndex(NEST)
    index.add(db)
    before = index._built()
    with pytest.raises(MemoryBudgetError):
        tune(index, 0.9, k=5, n_queries=50, max_memory=1000)
    assert index._built() == before
    res = tune(index, 0.9, k=5, n_queries=50, apply=False)
    assert index._built() == before and res.config is not None
    tune(index, 0.9, k=5, n_queries=50)  # applied: only the choice's structures stay
    built = index._built()
    assert sum(len(v) for v in built.values()) <= 2


def test_tune_names_its_options_and_warns_on_small_samples():
    from mrl.retrieval.tune import tune

    db, _ = mrl_like(1500, 32, clusters=15, seed=4)
    index = MatryoshkaIndex(NEST)
    index.add(db)
    for kw, says in (({"backends": "ivfpq"}, "backends must be a non-empty sequence"),
                     ({"backends": ("hnws",)}, "backends must be a non-empty sequence"),
                     ({"backends": ("ivfpq",), "nprobes": ()}, "nprobes must be a non-empty"),
                     ({"margin": -0.5}, "margin must be a recall in"),
                     ({"margin": float("nan")}, "margin must be a recall in"),
                     ({"max_hnsw": -1}, "max_hnsw must be >= 0"),
                     ({"n_queries": 2.5}, "n_queries must be an integer"),
                     ({"seed": -1}, "seed must be >= 0"),
                     ({"max_memory": "2G"}, "max_memory must be a positive number")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            tune(index, 0.9, k=5, apply=False, **kw)
    assert tune(index, 0.9, k=np.int64(5), n_queries=100, apply=False).recall >= 0.9
    with pytest.warns(UserWarning, match="tuning on 20 queries cannot certify recall@10 >= 0.99"):
        tune(index, 0.99, k=10, n_queries=20, backends=("flat",), apply=False)


def test_bench_retrieval_checks_its_data_before_the_exact_search():
    from mrl.retrieval.bench import bench_retrieval

    db = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    for data, kw, says in (((db, db[:5, :16]), {}, "with one D"),
                           ((db, db[0]), {}, "with one D"),
                           ((db, db[:5]), {"vector_dtype": "int4"}, "vector_dtype must be"),
                           ((db, db[:5]), {"target_recall": 1.5}, "target_recall must be")):
        with pytest.raises(ValueError, match=says):
            bench_retrieval(data=data, log=lambda s: None, **kw)
