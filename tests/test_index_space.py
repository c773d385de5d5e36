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
from mrl.retrieval import EmbeddingStore, MatryoshkaIndex, exact_search
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
