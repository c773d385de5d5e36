"""EmbeddingStore: round trips per dtype, append, ids, crash safety, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mrl import Nesting
from mrl.retrieval.store import EmbeddingStore

NEST = Nesting((4, 8, 16))


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


@pytest.mark.parametrize("dtype,tol", [("float32", 0), ("float16", 2e-3), ("int8", 0.03)])
@pytest.mark.parametrize("scale", ["per-vector", "per-dim"])
def test_round_trip(tmp_path, dtype, tol, scale):
    x = _x(50)
    store = EmbeddingStore.from_array(tmp_path / "s", x, NEST, dtype=dtype, int8_scale=scale)
    back = EmbeddingStore.open(tmp_path / "s").read()
    assert back.dtype == np.float32 and back.shape == (50, 16)
    np.testing.assert_allclose(back, x, atol=tol * np.abs(x).max() + 1e-7)
    np.testing.assert_allclose(store.read(dims=4), back[:, :4])
    np.testing.assert_allclose(store.take(np.array([3, 1]), dims=8), back[[3, 1], :8])


def test_sidecar_contents(tmp_path):
    EmbeddingStore.from_array(
        tmp_path / "s", _x(5), NEST, dtype="float16", normalize=True, center=np.ones(16)
    )
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    assert meta["nesting"] == NEST.to_dict() and meta["dtype"] == "float16"
    assert meta["normalized"] is True and meta["count"] == 5 and meta["version"] == 1
    assert len(meta["center"]) == 16


def test_normalize_and_center(tmp_path):
    x = _x(10)
    s = EmbeddingStore.from_array(tmp_path / "s", x, NEST, normalize=True, center=x.mean(0))
    y = (x - x.mean(0)) / np.linalg.norm(x - x.mean(0), axis=1, keepdims=True)
    np.testing.assert_allclose(s.read(), y, atol=1e-6)


def test_append_ids_and_compact(tmp_path):
    s = EmbeddingStore.from_array(tmp_path / "s", _x(10), NEST)
    s.append(_x(5, 1))
    assert s.count == 15 and list(s.ids) == list(range(15))
    s2 = EmbeddingStore.open(tmp_path / "s")
    np.testing.assert_array_equal(s2.read(), np.concatenate([_x(10), _x(5, 1)]))
    s2.compact()
    # against the rows read before compaction (s2 itself then reads the new segment)
    want = np.concatenate([_x(10), _x(5, 1)])
    np.testing.assert_array_equal(EmbeddingStore.open(tmp_path / "s").read(), want)
    np.testing.assert_array_equal(s2.read(), want)
    assert list(EmbeddingStore.open(tmp_path / "s").ids) == list(range(15))
    assert len(list((tmp_path / "s").glob("seg-*.npy"))) == 1


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_compact_keeps_quantised_rows_exactly(tmp_path, dtype):
    """float16 and int8 per-vector segments compact without re-rounding any value."""
    s = EmbeddingStore.from_array(tmp_path / "s", _x(10) * 0.01, NEST, dtype=dtype)
    s.append(_x(5, 1))
    before = s.read()
    s.compact()
    np.testing.assert_array_equal(s.read(), before)
    np.testing.assert_array_equal(EmbeddingStore.open(tmp_path / "s").read(), before)


def test_compact_refuses_to_requantise_int8_per_dim_segments(tmp_path):
    """One shared column scale would cost the small-valued segment most of its precision."""
    s = EmbeddingStore.from_array(tmp_path / "s", _x(50) * 0.01, NEST, dtype="int8",
                                  int8_scale="per-dim")
    s.append(_x(50, 1))
    before = s.read()
    with pytest.raises(ValueError, match="re-quantise this int8 per-dim store"):
        s.compact()
    np.testing.assert_array_equal(EmbeddingStore.open(tmp_path / "s").read(), before)
    assert len(list((tmp_path / "s").glob("seg-*.npy"))) == 2


def test_string_ids(tmp_path):
    s = EmbeddingStore.from_array(tmp_path / "s", _x(2), NEST, ids=["a", "b"])
    with pytest.raises(ValueError, match="already in the store"):
        s.append(_x(1), ids=["a"])
    with pytest.raises(ValueError, match="ids must be given"):
        s.append(_x(1))
    s.append(_x(1), ids=["c"])
    assert list(EmbeddingStore.open(tmp_path / "s").ids) == ["a", "b", "c"]


def test_crash_mid_append_leaves_store_intact(tmp_path, monkeypatch):
    s = EmbeddingStore.from_array(tmp_path / "s", _x(10), NEST)
    before = s.read()
    import mrl.retrieval.store as mod

    calls = {"n": 0}
    real = mod.np.save

    def failing_save(f, arr, allow_pickle=False):  # dies after writing half of the 2nd file
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"\x93NUMPY partial")
            raise OSError("disk full (simulated)")
        return real(f, arr, allow_pickle=allow_pickle)

    monkeypatch.setattr(mod.np, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        s.append(_x(7, 2))
    monkeypatch.setattr(mod.np, "save", real)
    again = EmbeddingStore.open(tmp_path / "s")
    assert again.count == 10
    np.testing.assert_array_equal(again.read(), before)
    again.append(_x(3, 3))  # works after the failure, orphans cleaned
    assert EmbeddingStore.open(tmp_path / "s").count == 13
    names = {p.name for p in (tmp_path / "s").iterdir()}
    assert len([n for n in names if n.startswith("seg-")]) == 2


def test_crash_before_sidecar_swap(tmp_path, monkeypatch):
    s = EmbeddingStore.from_array(tmp_path / "s", _x(4), NEST)
    import mrl.retrieval.store as mod

    def boom(*a, **k):
        raise OSError("crash before commit (simulated)")

    monkeypatch.setattr(mod, "atomic_write_json", boom)
    with pytest.raises(OSError, match="simulated"):
        s.append(_x(2, 1))
    assert EmbeddingStore.open(tmp_path / "s").count == 4


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        EmbeddingStore.create(tmp_path / "a", NEST, dtype="float64")
    with pytest.raises(ValueError, match="int8_scale"):
        EmbeddingStore.create(tmp_path / "a", NEST, dtype="int8", int8_scale="global")
    s = EmbeddingStore.create(tmp_path / "b", NEST)
    with pytest.raises(ValueError, match="dimension 16"):
        s.append(np.zeros((2, 8)))
    bad = _x(3)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="row 1 has NaN"):
        s.append(bad)
    with pytest.raises(ValueError, match="one entry per vector"):
        s.append(_x(3), ids=[1, 2])
    with pytest.raises(FileExistsError, match="already exists"):
        EmbeddingStore.create(tmp_path / "b", NEST)
    with pytest.raises(FileNotFoundError, match="no embedding store"):
        EmbeddingStore.open(tmp_path / "nothing")
    with pytest.raises(ValueError, match="dims must be"):
        s.read(dims=99)


def test_version_and_truncation(tmp_path):
    EmbeddingStore.from_array(tmp_path / "s", _x(100), NEST)
    seg = next((tmp_path / "s").glob("seg-*.npy"))
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        EmbeddingStore.open(tmp_path / "s")
    side = tmp_path / "s" / "store.json"
    meta = json.loads(side.read_text())
    meta["version"] = 99
    side.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 99"):
        EmbeddingStore.open(tmp_path / "s")


def test_uint64_ids_beyond_int64_are_refused(tmp_path):
    """Hash-like uint64 ids >= 2**63 were wrapped to negative int64 ids without a word."""
    x = np.ones((2, 4), np.float32)
    ids = np.array([2**63 + 5, 7], dtype=np.uint64)
    with pytest.raises(ValueError, match="ids must fit in int64.*9223372036854775813"):
        EmbeddingStore.from_array(tmp_path / "s", x, ids=ids)
    small = np.array([3, 7], dtype=np.uint64)  # uint64 that fits is kept as int64
    assert EmbeddingStore.from_array(tmp_path / "t", x, ids=small).ids.tolist() == [3, 7]
    # Python ids: an int past int64 made a float64 array ("got dtype float64"), and numpy's str
    # dtype dropped a trailing NUL ("doc\x00" was stored as "doc")
    with pytest.raises(ValueError, match="ids must fit in int64, got 9223372036854775808"):
        EmbeddingStore.from_array(tmp_path / "u", x, ids=[2**63, 5])
    with pytest.raises(ValueError, match="ids must not end with a NUL character, got 'doc"):
        EmbeddingStore.from_array(tmp_path / "v", x, ids=["doc\x00", "b"])


def test_a_reader_survives_another_process_compacting(tmp_path):
    """ids and int8 scales were mapped lazily, so a store opened before another writer compacted
    it called itself damaged (their files were gone)."""
    s = EmbeddingStore.from_array(tmp_path / "s", _x(10), NEST, dtype="int8")
    s.append(_x(5, 1))
    want_rows, want_ids = s.read(), s.ids.copy()
    reader = EmbeddingStore.open(tmp_path / "s")  # opened, nothing read yet
    EmbeddingStore.open(tmp_path / "s").compact()
    np.testing.assert_array_equal(reader.ids, want_ids)
    np.testing.assert_array_equal(reader.read(), want_rows)


def test_open_checks_every_file_against_the_sidecar(tmp_path):
    s = EmbeddingStore.from_array(tmp_path / "s", _x(60), NEST)
    seg = next((tmp_path / "s").glob("seg-*.npy"))
    np.save(seg, _x(10))  # a valid .npy of the wrong length
    with pytest.raises(ValueError, match=r"has shape \(10, 16\), the sidecar says 60 rows of 16"):
        EmbeddingStore.open(tmp_path / "s")
    del s


def test_iter_blocks_names_a_bad_block(tmp_path):
    s = EmbeddingStore.from_array(tmp_path / "s", _x(10), NEST)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match=r"block must be (>= 1|an integer), got block="):
            list(s.iter_blocks(block=bad))
