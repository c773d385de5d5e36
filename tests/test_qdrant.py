"""Qdrant export and funnel search, against the real engine in-process (qdrant-edge-py) and
qdrant-client's local mode; the in-process MatryoshkaIndex and exact search are the references."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qdrant_edge")

from mrl import Nesting  # noqa: E402
from mrl.cli import main  # noqa: E402
from mrl.qdrant import (  # noqa: E402
    FunnelPlan,
    QdrantIndex,
    QdrantLayout,
    export_qdrant,
    open_rows,
    open_target,
)
from mrl.retrieval import EmbeddingStore, MatryoshkaIndex, SearchConfig, exact_search  # noqa: E402

N, D = 600, 32
NEST = Nesting((8, 16, 32))


def mrl_like(n: int, d: int, seed: int) -> np.ndarray:
    """Gaussian rows whose variance decays with the coordinate (leading dims matter most)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) / np.sqrt(1 + np.arange(d))).astype(np.float32)


@pytest.fixture(scope="module")
def db() -> np.ndarray:
    return mrl_like(N, D, 0)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return mrl_like(20, D, 1)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, db) -> Path:
    path = tmp_path_factory.mktemp("store") / "store"
    EmbeddingStore.from_array(path, db, NEST, ids=np.arange(N) * 10 + 7)  # ids != rows
    return path


@pytest.fixture(scope="module")
def edge_index(tmp_path_factory, store_path) -> QdrantIndex:
    root = tmp_path_factory.mktemp("edge")
    target = open_target("docs", path=root)
    layout = QdrantLayout((8, 16, 32))
    export_qdrant(open_rows(store_path), target, layout, root / "docs.progress.json",
                  collection="docs", batch_size=128)
    return QdrantIndex(target)


@pytest.fixture(scope="module")
def memory_index(store_path) -> QdrantIndex:
    pytest.importorskip("qdrant_client")
    target = open_target("docs", url=":memory:")
    export_qdrant(open_rows(store_path), target, QdrantLayout((8, 16, 32)),
                  Path(store_path).parent / "mem.progress.json", collection="docs",
                  batch_size=256)
    return QdrantIndex(target)


# ----------------------------------------------------------------------------- validation
def test_layout_and_plan_validation():
    with pytest.raises(ValueError, match="strictly increasing"):
        QdrantLayout((16, 8))
    with pytest.raises(ValueError, match="distance must be one of"):
        QdrantLayout((8,), "euclid")
    with pytest.raises(ValueError, match=r"indexed prefixes \[12\] are not among"):
        QdrantLayout((8, 16), indexed=(12,))
    layout = QdrantLayout((8, 16, 32))
    assert layout.indexed == (8,)  # only the shortlist prefix gets a graph by default
    assert QdrantLayout.from_dict(layout.to_dict()) == layout
    assert FunnelPlan.build(layout, 10).stages == ((32, 10),)
    assert FunnelPlan.build(layout, 10).shortlist == 200
    with pytest.raises(ValueError, match="shortlist_dim=12 is not stored"):
        FunnelPlan.build(layout, 10, shortlist_dim=12)
    with pytest.raises(ValueError, match=r"shortlist must be >= k \(10\), got shortlist=5"):
        FunnelPlan.build(layout, 10, shortlist=5)
    with pytest.raises(ValueError, match=r"stages\[0\] prefix 24 is not stored"):
        FunnelPlan.build(layout, 10, stages=[(24, 10)])
    with pytest.raises(ValueError, match=r"stages\[1\]=\(16, 20\) must grow the prefix"):
        FunnelPlan.build(layout, 10, stages=[(16, 50), (16, 20)])
    with pytest.raises(ValueError, match="k must be >= 1, got k=0"):
        FunnelPlan.build(layout, 0)
    assert FunnelPlan.build(layout, 10, stages=np.array([[16, 50], [32, 10]])).stages == (
        (16, 50), (32, 10))  # numpy rows are pairs too
    for bad in ([16], [16, 10, 1], 16):
        with pytest.raises(ValueError, match=r"stages\[0\] must be a \(prefix, keep\) pair"):
            FunnelPlan.build(layout, 10, stages=[bad])


def test_open_target_and_rows_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of url or path"):
        open_target("c")
    with pytest.raises(ValueError, match="collection must be a non-empty name"):
        open_target("a/b", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="no embedding store"):
        open_rows(tmp_path)


# ----------------------------------------------------------------------------- export + search
def test_edge_export_holds_every_row_once(edge_index):
    target = edge_index.target
    assert target.count() == N
    assert sorted(target.point_ids().tolist()) == list(range(N))
    assert edge_index.layout == QdrantLayout((8, 16, 32))


def test_edge_whole_database_shortlist_equals_exact_search(edge_index, db, queries):
    k = 10
    scores, ids = edge_index.search(queries, k, shortlist_dim=8, shortlist=N)
    ref_s, ref_rows = exact_search(db, queries, k)
    np.testing.assert_array_equal(ids, ref_rows * 10 + 7)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stages", [None, [(16, 40), (32, 10)]])
def test_edge_funnel_equals_in_process_index(edge_index, db, queries, stages):
    index = MatryoshkaIndex(NEST, SearchConfig(shortlist_dim=8, shortlist=80), threads=1)
    index.add(db, ids=np.arange(N) * 10 + 7)
    ref = index.search(queries, 10, **({} if stages is None else {"stages": stages}))
    scores, ids = edge_index.search(queries, 10, shortlist_dim=8, shortlist=80, stages=stages)
    np.testing.assert_array_equal(ids, ref.ids)
    np.testing.assert_allclose(scores, ref.scores, rtol=1e-4, atol=1e-5)


def test_shortlist_only_plan(edge_index, db, queries):
    scores, ids = edge_index.search(queries, 5, shortlist_dim=32, shortlist=50)
    ref_s, ref_rows = exact_search(db, queries, 5)
    np.testing.assert_array_equal(ids, ref_rows * 10 + 7)


def test_client_memory_mode_matches_edge(memory_index, edge_index, queries):
    for params in ({"shortlist_dim": 8, "shortlist": 80},
                   {"shortlist_dim": 8, "shortlist": 80, "stages": [(16, 40), (32, 10)]}):
        s1, i1 = memory_index.search(queries, 10, **params)
        s2, i2 = edge_index.search(queries, 10, **params)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-5)
    assert memory_index.layout == edge_index.layout
    assert len(memory_index) == N


def test_search_bad_queries(edge_index):
    with pytest.raises(ValueError, match=r"queries must have shape \[Q, >= 32\]"):
        edge_index.search(np.zeros((2, 8), np.float32), 5)
    bad = np.zeros((1, D), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="queries must be finite"):
        edge_index.search(bad, 5)


# ----------------------------------------------------------------------------- faults
class _Crash(Exception):
    pass


def test_interrupted_export_resumes_without_duplicates(tmp_path, store_path):
    rows = open_rows(store_path)
    layout = QdrantLayout((8, 32))
    marker = tmp_path / "c.progress.json"

    def crash_after_two_commits(done, total):
        if done >= 2 * 2 * 50:
            raise _Crash

    target = open_target("c", path=tmp_path)
    with pytest.raises(_Crash):  # commits every 2 batches of 50 rows; dies after the second
        export_qdrant(rows, target, layout, marker, collection="c", batch_size=50,
                      commit_every=2, on_batch=crash_after_two_commits)
    target.close()
    assert json.loads(marker.read_text())["done"] == 200
    target = open_target("c", path=tmp_path)
    report = export_qdrant(rows, target, layout, marker, collection="c", batch_size=100)
    assert (report.resumed_from, report.written, report.batches) == (200, N - 200, 4)
    assert target.count() == N
    assert sorted(target.point_ids().tolist()) == list(range(N))
    again = export_qdrant(rows, target, layout, marker, collection="c", batch_size=100)
    assert again.written == 0  # finished: nothing to do
    target.close()


def test_marker_ahead_of_collection_restarts(tmp_path, store_path):
    rows = open_rows(store_path)
    layout = QdrantLayout((8, 32))
    marker = tmp_path / "m.json"
    t1 = open_target("c", path=tmp_path / "q")
    export_qdrant(rows, t1, layout, marker, collection="c", batch_size=300)
    t1.close()
    shutil.rmtree(tmp_path / "q" / "c")  # the data is gone, the marker says done
    t2 = open_target("c", path=tmp_path / "q")  # the same target (the marker records it)
    report = export_qdrant(rows, t2, layout, marker, collection="c", batch_size=300)
    assert report.resumed_from == 0 and t2.count() == N
    t2.close()


def _has_client() -> bool:
    try:
        import qdrant_client  # noqa: F401

        return True
    except ImportError:
        return False


def test_foreign_marker_is_refused(tmp_path, store_path):
    marker = tmp_path / "p.json"
    marker.write_text(json.dumps({"format": "mrl-qdrant-export", "version": 1,
                                  "fingerprint": {"collection": "other"}, "done": 5}))
    target = open_target("c", path=tmp_path)
    with pytest.raises(ValueError, match="belongs to another export"):
        export_qdrant(open_rows(store_path), target, QdrantLayout((8, 32)), marker,
                      collection="c")
    target.close()


class _Flaky:
    """Wraps a target; its first ``fail`` upserts raise (a network blip)."""

    def __init__(self, inner, fail: int) -> None:
        self.inner, self.fail, self.calls = inner, fail, 0

    def upsert(self, *args):
        self.calls += 1
        if self.calls <= self.fail:
            raise ConnectionError(f"blip {self.calls}")
        return self.inner.upsert(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_batches_are_retried(tmp_path, store_path):
    flaky = _Flaky(open_target("c", path=tmp_path), fail=2)
    report = export_qdrant(open_rows(store_path), flaky, QdrantLayout((8, 32)),
                           tmp_path / "p.json", collection="c", batch_size=300, backoff_s=0.0)
    assert report.retries == 2 and flaky.count() == N
    flaky.inner.close()
    hopeless = _Flaky(open_target("d", path=tmp_path), fail=100)
    with pytest.raises(ValueError, match="commit_every must be >= 1, got commit_every=0"):
        export_qdrant(open_rows(store_path), flaky, QdrantLayout((8, 32)), tmp_path / "r.json",
                      collection="c", commit_every=0)
    with pytest.raises(ConnectionError, match="blip 3"):
        export_qdrant(open_rows(store_path), hopeless, QdrantLayout((8, 32)),
                      tmp_path / "q.json", collection="d", retries=2, backoff_s=0.0)
    hopeless.inner.close()


_KILL_SCRIPT = """
import sys, time
from mrl.qdrant import QdrantLayout, export_qdrant, open_rows, open_target
def slow(done, total):
    print(done, flush=True)
    time.sleep(0.3)
target = open_target("k", path=sys.argv[2])
export_qdrant(open_rows(sys.argv[1]), target, QdrantLayout((8, 32)), sys.argv[3],
              collection="k", batch_size=50, commit_every=1, on_batch=slow)
"""


def test_killed_export_process_resumes(tmp_path, store_path):
    """SIGKILL a real export mid-way, then finish it with `mrl export qdrant`."""
    marker = tmp_path / "k.progress.json"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(store_path), str(tmp_path),
                             str(marker)], stdout=subprocess.PIPE, text=True)
    try:
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 150 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen = int(line)
        assert seen >= 150, "the export did not get going"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = json.loads(marker.read_text())["done"]
    assert 150 <= done < N
    code = main(["export", "qdrant", str(store_path), "--collection", "k", "--path",
                 str(tmp_path), "--prefixes", "8,32", "--batch-size", "50", "--quiet"])
    assert code == 0
    target = open_target("k", path=tmp_path)
    assert target.count() == N
    assert sorted(target.point_ids().tolist()) == list(range(N))
    target.close()


# ----------------------------------------------------------------------------- CLI
def test_cli_exports_an_index_folder(tmp_path, db, queries, capsys):
    index = MatryoshkaIndex(NEST, SearchConfig(shortlist_dim=8, shortlist=60), threads=1)
    index.add(db)
    index.save(tmp_path / "idx")
    code = main(["export", "qdrant", str(tmp_path / "idx"), "--collection", "docs", "--path",
                 str(tmp_path / "q"), "--quiet"])
    assert code == 0
    assert "exported 600 points" in capsys.readouterr().out
    q = QdrantIndex(open_target("docs", path=tmp_path / "q"))
    assert q.layout.prefixes == (16, 32)  # default: smallest size >= 16, and D
    ref = index.search(queries, 10, shortlist_dim=16, shortlist=60)
    _, ids = q.search(queries, 10, shortlist_dim=16, shortlist=60)
    np.testing.assert_array_equal(ids, ref.ids)
    q.target.close()


def test_cli_bad_prefixes(tmp_path, store_path, capsys):
    code = main(["export", "qdrant", str(store_path), "--collection", "x", "--path",
                 str(tmp_path), "--prefixes", "8,24"])
    assert code == 2
    assert "--prefixes [24] are not in the index's nesting [8, 16, 32]" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    code = main(["export", "qdrant", str(store_path), "--collection", "x", "--path",
                 str(tmp_path / "afile")])
    assert code == 2
    assert f"--path '{tmp_path / 'afile'}' is a file; give a folder path" in (
        capsys.readouterr().err)


def test_cli_names_points_left_by_a_larger_earlier_export(tmp_path, db, capsys):
    """A collection holding more points than the store cannot be mended by running the export
    again (the message said so): the error says why and what to do."""
    for name, rows in (("big", db), ("small", db[:300])):
        EmbeddingStore.from_array(tmp_path / name, rows, NEST)
    args = ["export", "qdrant", "--collection", "docs", "--path", str(tmp_path / "q"), "--quiet"]
    assert main([*args[:2], str(tmp_path / "big"), *args[2:]]) == 0
    capsys.readouterr()
    # its own progress file (the first one is refused as another export's)
    again = [*args[:2], str(tmp_path / "small"), *args[2:], "--progress", str(tmp_path / "p.json")]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert "collection 'docs' holds 600 points, expected 300" in err
    assert "earlier, larger export" in err and "run the export again" not in err


# ----------------------------------------------------------------------------- served
def test_serve_search_from_qdrant(edge_index, db, queries):
    pytest.importorskip("fastapi")
    import httpx

    from mrl.serve import QdrantBackend, create_app, serving

    with serving(create_app(None, QdrantBackend(edge_index))) as url:
        r = httpx.post(url + "/v1/search", json={"vector": queries[:2].tolist(), "k": 5,
                                                 "shortlist_dim": 8, "shortlist": 80})
        assert r.status_code == 200, r.text
        _, ids = edge_index.search(queries[:2], 5, shortlist_dim=8, shortlist=80)
        assert [d["ids"] for d in r.json()["data"]] == ids.tolist()
        r = httpx.post(url + "/v1/search", json={"vector": queries[0].tolist(),
                                                 "shortlist_dim": 12})
        assert r.status_code == 400 and r.json()["error"]["param"] == "shortlist_dim"


def test_cluster_compose_file_is_valid():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((Path(__file__).parents[1] / "deploy/docker-compose.yml").read_text())
    nodes = compose["services"]
    assert len(nodes) == 3
    for name, node in nodes.items():
        assert node["environment"]["QDRANT__CLUSTER__ENABLED"] == "true"
        assert ("--bootstrap" in node["command"]) == (name != "qdrant_node1")
    assert all(p.startswith("127.0.0.1:") for p in nodes["qdrant_node1"]["ports"])


def test_mrl_serve_builds_search_from_an_edge_collection(tmp_path, store_path, queries):
    pytest.importorskip("fastapi")
    import httpx

    from mrl.cli import build_parser
    from mrl.commands.serve import build_app
    from mrl.serve import serving

    assert main(["export", "qdrant", str(store_path), "--collection", "docs", "--path",
                 str(tmp_path), "--quiet"]) == 0
    args = build_parser().parse_args(["serve", "--model", "none", "--qdrant-path", str(tmp_path),
                                      "--collection", "docs"])
    with serving(build_app(args)) as url:
        meta = httpx.get(url + "/v1/metadata").json()
        assert meta["index"]["size"] == N and meta["index"]["nesting"] == [16, 32]
        r = httpx.post(url + "/v1/search", json={"vector": queries[0].tolist(), "k": 3})
        assert r.status_code == 200 and len(r.json()["data"][0]["ids"]) == 3
    with pytest.raises(ValueError, match="--collection is needed"):
        build_app(build_parser().parse_args(["serve", "--model", "none", "--qdrant-path",
                                             str(tmp_path)]))


@pytest.mark.skipif(not _has_client(), reason="qdrant-client not installed")
def test_unreachable_server_is_one_error_naming_the_url(store_path, capsys):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    code = main(["export", "qdrant", str(store_path), "--collection", "x", "--url", url])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot reach the Qdrant server at url='{url}'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # mrl serve: the same error, before any model is loaded, and a bad port up front
    assert main(["serve", "--qdrant-url", url, "--collection", "x", "--model", "none"]) == 2
    assert f"url='{url}'" in capsys.readouterr().err
    assert main(["serve", "--model", "none", "--port", "99999"]) == 2
    assert "--port must be in [0, 65535], got --port 99999" in capsys.readouterr().err


def test_an_edge_folder_held_elsewhere_is_a_one_line_error(tmp_path, store_path, capsys):
    """A second handle on an Edge shard (another `mrl serve`, an export meanwhile) ended in a
    17-line traceback: "failed to open WAL ... WouldBlock"."""
    target = open_target("docs", path=tmp_path / "q")
    export_qdrant(open_rows(store_path), target, QdrantLayout((8, 32)),
                  tmp_path / "q.progress.json", collection="docs", batch_size=256)
    # the exporting handle holds the shard (as a running `mrl serve --qdrant-path` would)
    with pytest.raises(FileExistsError, match=r"Qdrant Edge folder .*q/docs' is open "
                       r"elsewhere \(another process, or another handle in this one"):
        open_target("docs", path=tmp_path / "q")
    assert main(["export", "qdrant", str(store_path), "--collection", "docs", "--path",
                 str(tmp_path / "q"), "--prefixes", "8,32"]) == 2  # fmt: skip
    assert "is open elsewhere" in capsys.readouterr().err


def test_empty_stages_rerank_at_full_size_as_the_index_does(edge_index, store_path, queries):
    """stages=[] meant "no rerank" here (the 8-dim shortlist's scores came back) but "one rerank
    at D" in MatryoshkaIndex: the same call gave other neighbours (agreement 0.025)."""
    plan = FunnelPlan.build(edge_index.layout, 10, shortlist_dim=8, shortlist=50, stages=[])
    assert plan.stages == ((32, 10),)
    assert plan == FunnelPlan.build(edge_index.layout, 10, shortlist_dim=8, shortlist=50)


def test_cli_export_of_a_dot_index_uses_its_metric(tmp_path, db, queries, capsys):
    """A metric="dot" index was exported as a cosine collection: Qdrant ranked other
    neighbours than the index (agreement 0.06)."""
    index = MatryoshkaIndex(NEST, SearchConfig(shortlist_dim=8, shortlist=60), metric="dot",
                            threads=1)
    index.add(db)
    index.save(tmp_path / "dot")
    args = ["export", "qdrant", str(tmp_path / "dot"), "--collection", "d", "--quiet"]
    assert main(args + ["--path", str(tmp_path / "q1"), "--distance", "cosine"]) == 2
    assert "--distance cosine differs from the index's metric 'dot'" in capsys.readouterr().err
    assert main(args + ["--path", str(tmp_path / "q")]) == 0
    q = QdrantIndex(open_target("d", path=tmp_path / "q"))
    assert q.layout.distance == "dot"
    ref = index.search(queries, 10, shortlist_dim=16, shortlist=60)
    _, ids = q.search(queries, 10, shortlist_dim=16, shortlist=60)
    np.testing.assert_array_equal(ids, ref.ids)
    q.target.close()


def test_cli_export_names_bad_prefix_specs_and_refuses_dot_dot(tmp_path, store_path, capsys):
    """--collection .. wrote the Edge collection into the parent of --path; "16,8" and "full"
    errors named no option (and "full" asked for a dim the store has)."""
    base = ["export", "qdrant", str(store_path), "--path", str(tmp_path / "q"), "--quiet"]
    for name in ("..", "."):
        assert main(base + ["--collection", name]) == 2
        assert "collection must be a non-empty name without '/'" in capsys.readouterr().err
    assert not (tmp_path / "layout.json").exists() and not (tmp_path / "shard").exists()
    assert main(base + ["--collection", "c", "--prefixes", "16,8"]) == 2
    assert "--prefixes '16,8': sizes must be strictly increasing" in capsys.readouterr().err
    assert main(base + ["--collection", "c", "--prefixes", "doubling:8", "--indexed", "full"]) == 0
    q = QdrantIndex(open_target("c", path=tmp_path / "q"))
    assert q.layout.prefixes == (8, 16, 32) and q.layout.indexed == (32,)
    q.target.close()


def test_string_ids_are_padded_with_empty_strings(tmp_path, db, queries):
    """Fewer hits than k: string ids were padded with "-1" (numpy cast the -1 fill to str),
    which a real id "-1" could be; MatryoshkaIndex pads them with ""."""
    store = tmp_path / "s"
    EmbeddingStore.from_array(store, db[:3], NEST, ids=["-1", "a", "b"])
    target = open_target("c", path=tmp_path / "q")
    export_qdrant(open_rows(store), target, QdrantLayout((8, 32)), tmp_path / "p.json",
                  collection="c", show_progress=False)
    scores, ids = QdrantIndex(target).search(queries[:2], 5)
    assert ids.dtype.kind == "U" and sorted(ids[0, :3]) == ["-1", "a", "b"]
    assert ids[:, 3:].tolist() == [["", ""], ["", ""]] and np.isneginf(scores[:, 3:]).all()
    target.close()
