"""Qdrant exports to more than one target, and the Edge folder an export may write into.

Two "servers" are two qdrant-client local instances, one per URL, kept alive across CLI calls.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("qdrant_client")
pytest.importorskip("qdrant_edge")

import mrl.qdrant as mq  # noqa: E402
from mrl import Nesting  # noqa: E402
from mrl.cli import main  # noqa: E402
from mrl.retrieval import EmbeddingStore  # noqa: E402

NEST = Nesting((8, 32))


@pytest.fixture
def servers(monkeypatch):
    """ClientTarget(url=...) talks to one in-memory instance per URL for the whole test."""
    import qdrant_client

    held: dict[str, object] = {}
    init = mq.ClientTarget.__init__

    def fake_init(self, collection, url=None, client=None, **kw):
        client = held.setdefault(url.rstrip("/"), qdrant_client.QdrantClient(location=":memory:"))
        init(self, collection, url=url, client=client, **kw)

    monkeypatch.setattr(mq.ClientTarget, "__init__", fake_init)
    monkeypatch.setattr(mq.ClientTarget, "close", lambda self: None)
    return held


def _own_top1(url: str, x: np.ndarray, ids: list[str]) -> int:
    """How many of the rows x find their own id first on the server at url."""
    index = mq.QdrantIndex(mq.ClientTarget("docs", url=url))
    _, got = index.search(x / np.linalg.norm(x, axis=1, keepdims=True), k=1)
    return int((got[:, 0] == np.array(ids[: len(x)])).sum())


def test_an_export_to_a_second_server_writes_its_rows(tmp_path, servers, monkeypatch):
    """The default --url marker was named after the index and collection only, and its
    fingerprint had no server: exporting a re-embedded store to staging, then to prod (which
    served the old vectors) skipped every row on prod and exited 0."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    ids = [f"doc{i}" for i in range(60)]
    old, new = (rng.standard_normal((60, 32)).astype(np.float32) for _ in range(2))
    EmbeddingStore.from_array("old", old, NEST, ids=ids, normalize=True)
    EmbeddingStore.from_array("store", new, NEST, ids=ids, normalize=True)
    quiet = ["--collection", "docs", "--quiet"]
    assert main(["export", "qdrant", "old", "--url", "http://prod:6333", *quiet]) == 0
    assert main(["export", "qdrant", "store", "--url", "http://staging:6333", *quiet]) == 0
    assert main(["export", "qdrant", "store", "--url", "http://prod:6333/", *quiet]) == 0
    assert _own_top1("http://prod:6333/", new[:20], ids) == 20
    # one --progress file for two servers: the second is refused, not skipped
    marker = str(tmp_path / "one.json")
    assert main(["export", "qdrant", "store", "--url", "http://a:6333", "--progress", marker,
                 *quiet]) == 0  # fmt: skip
    assert main(["export", "qdrant", "store", "--url", "http://b:6333", "--progress", marker,
                 *quiet]) == 2  # fmt: skip
    assert _own_top1("http://a:6333", new[:5], ids) == 5


def test_a_marker_written_before_the_target_was_recorded_still_resumes():
    fp = {"collection": "c", "count": 3, "target": "http://x:6333", "sample": "ab"}
    assert mq._same_export({"collection": "c", "count": 3, "sample": "ab"}, fp)
    assert mq._same_export({"collection": "c", "count": 3}, fp)
    assert not mq._same_export({**fp, "target": "http://y:6333"}, fp)


def test_serve_uses_qdrants_hnsw_only_when_asked(tmp_path, monkeypatch):
    """`mrl serve --qdrant-path` always scanned exactly: the HNSW graph the export spends most
    of its time on was never used. `--qdrant-hnsw` turns it on; elsewhere it is refused."""
    import mrl.serve
    from mrl.cli import build_parser
    from mrl.commands.serve import build_app
    from mrl.qdrant import QdrantLayout, export_qdrant, open_rows, open_target

    db = np.random.default_rng(1).standard_normal((50, 32)).astype(np.float32)
    EmbeddingStore.from_array(tmp_path / "s", db, NEST)
    target = open_target("docs", path=tmp_path / "q")
    export_qdrant(open_rows(tmp_path / "s"), target, QdrantLayout((8, 32)), tmp_path / "p.json",
                  collection="docs")  # fmt: skip
    target.close()
    seen = []
    monkeypatch.setattr(mrl.serve, "create_app", lambda enc, backend, cfg: seen.append(backend))
    base = ["serve", "--model", "none", "--qdrant-path", str(tmp_path / "q"), "--collection",
            "docs"]  # fmt: skip
    for extra, exact in (([], True), (["--qdrant-hnsw"], False)):
        build_app(build_parser().parse_args([*base, *extra]))
        assert seen[-1].index.exact is exact
        seen[-1].index.target.close()
    with pytest.raises(ValueError, match="--qdrant-hnsw is for --qdrant-path/--qdrant-url"):
        build_app(build_parser().parse_args(["serve", "--model", "none", "--qdrant-hnsw"]))


def test_an_edge_collection_folder_of_other_files_is_not_written_into(tmp_path, capsys):
    """`--path P --collection C` mixed the shard and layout.json into an existing P/C of user
    files; a file at P/C was a bare "[Errno 17] File exists"."""
    EmbeddingStore.from_array(tmp_path / "s", np.eye(32, dtype=np.float32)[:20] + 0.1, NEST)
    notes = tmp_path / "qg" / "notes"
    notes.mkdir(parents=True)
    (notes / "todo.txt").write_text("mine")
    (tmp_path / "qf").mkdir()
    (tmp_path / "qf" / "docs").write_text("a file")
    for root, name, says in (("qg", "notes", "holds other files and no layout.json"),
                             ("qf", "docs", "is a file")):
        assert main(["export", "qdrant", str(tmp_path / "s"), "--collection", name, "--path",
                     str(tmp_path / root), "--quiet"]) == 2  # fmt: skip
        assert says in capsys.readouterr().err
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    assert (tmp_path / "qf" / "docs").read_text() == "a file"
