"""Serving under real use: the micro-batcher's results equal serving each request alone (with a
failing, a cancelled or a stopped request beside good ones), HTTP edge cases, search through the
service equal to `mrl search`, and Qdrant export resume / re-export.

No test synchronises by sleeping: batches form because they fill (``max_batch_size`` texts, with a
window far longer than any test), and an encoder blocked on a `threading.Event` marks "running".
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from mrl import Nesting  # noqa: E402
from mrl.serve import HashEncoder, IndexBackend, ServeConfig, create_app, serving  # noqa: E402
from mrl.serve.batching import DirectRunner, MicroBatcher  # noqa: E402

DIM = 32
LONG_WAIT_MS = 60_000  # a batch never forms by the timer in these tests: only by filling up


def _run(coro):
    return asyncio.run(coro)


class ExplodingEncoder(HashEncoder):
    """HashEncoder whose ``encode`` fails on any batch holding the text "explode" (a model that
    breaks on one input; ``count_tokens`` accepts it, so it reaches a batch)."""

    def encode(self, texts):
        if "explode" in texts:
            with self._lock:
                self.calls += 1
            raise RuntimeError("the model broke on 'explode'")
        return super().encode(texts)


# ----------------------------------------------------------------------------- micro-batcher
def test_a_failing_request_does_not_poison_its_batch():
    enc = ExplodingEncoder(DIM)
    seen = []

    def encode(texts):
        seen.append(list(texts))
        return enc.encode(texts)

    async def go():
        b = MicroBatcher(encode, max_batch_size=4, max_wait_ms=LONG_WAIT_MS)
        await b.start()
        try:
            return await asyncio.wait_for(asyncio.gather(
                b.submit(["a", "b"]), b.submit(["explode"]), b.submit(["c"]),
                return_exceptions=True), 30)
        finally:
            await b.stop()

    good1, bad, good2 = _run(go())
    assert seen[0] == ["a", "b", "explode", "c"]  # the three requests did share one batch
    assert isinstance(bad, RuntimeError) and "explode" in str(bad)
    np.testing.assert_array_equal(good1, HashEncoder(DIM).encode(["a", "b"]))
    np.testing.assert_array_equal(good2, HashEncoder(DIM).encode(["c"]))


def test_an_encoder_answering_the_wrong_row_count_is_an_error_not_wrong_rows():
    def short(texts):  # one row too few: request 2 would get nothing, request 1 a wrong row
        return np.zeros((len(texts) - 1, 4), np.float32)

    async def go(runner):
        await runner.start()
        try:
            return await asyncio.wait_for(asyncio.gather(
                runner.submit(["a", "b"]), runner.submit(["c"]), return_exceptions=True), 30)
        finally:
            await runner.stop()

    for runner in (MicroBatcher(short, max_batch_size=3, max_wait_ms=LONG_WAIT_MS),
                   DirectRunner(short)):
        out = _run(go(runner))
        for got, n in zip(out, (2, 1)):
            assert isinstance(got, RuntimeError), got
            assert f"for {n} texts; expected [{n}, D]" in str(got)


def test_stop_answers_queued_and_running_requests_and_later_submits():
    started, release = threading.Event(), threading.Event()

    def encode(texts):
        started.set()
        release.wait(30)
        return np.zeros((len(texts), 2), np.float32)

    async def go(runner):
        await runner.start()
        running = asyncio.create_task(runner.submit(["running"]))
        assert await asyncio.to_thread(started.wait, 30)  # the encoder holds the first batch
        queued = asyncio.create_task(runner.submit(["queued"]))
        await asyncio.sleep(0)  # let it enqueue (a scheduling yield, not a timing wait)
        await runner.stop()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(running, queued, return_exceptions=True), 10)
            with pytest.raises(RuntimeError, match="was stopped; the request was not served"):
                await asyncio.wait_for(runner.submit(["late"]), 10)
        finally:
            release.set()
        return results

    for runner in (MicroBatcher(encode, max_batch_size=1, max_wait_ms=0), DirectRunner(encode)):
        started.clear()
        release.clear()
        results = _run(go(runner))
        for r in results:  # before: both waited for ever (DirectRunner: a CancelledError)
            assert isinstance(r, RuntimeError), (runner, r)
            assert "stopped before this request was served" in str(r)

    async def direct():
        runner = DirectRunner(lambda t: np.zeros((len(t), 2), np.float32))
        await runner.stop()
        with pytest.raises(RuntimeError, match="runner was stopped; the request was not served"):
            await runner.submit(["late"])

    _run(direct())


def test_a_cancelled_request_in_the_running_batch_leaves_the_others_their_rows():
    started, release = threading.Event(), threading.Event()
    enc = HashEncoder(DIM)

    def encode(texts):
        started.set()
        release.wait(30)
        return enc.encode(texts)

    async def go():
        b = MicroBatcher(encode, max_batch_size=3, max_wait_ms=LONG_WAIT_MS)
        await b.start()
        try:
            gone = asyncio.create_task(b.submit(["x", "y"]))
            kept = asyncio.create_task(b.submit(["z"]))
            assert await asyncio.to_thread(started.wait, 30)  # both are in the running batch
            gone.cancel()
            release.set()
            rows = await asyncio.wait_for(kept, 30)
            with pytest.raises(asyncio.CancelledError):
                await gone
            after = await asyncio.wait_for(b.submit(["w", "v", "u"]), 30)  # still serving
        finally:
            release.set()
            await b.stop()
        return rows, after

    rows, after = _run(go())
    np.testing.assert_array_equal(rows, enc.encode(["z"]))
    np.testing.assert_array_equal(after, enc.encode(["w", "v", "u"]))


# ----------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def index():
    from mrl.retrieval import MatryoshkaIndex, SearchConfig

    rng = np.random.default_rng(0)
    idx = MatryoshkaIndex(Nesting.doubling(8, DIM), SearchConfig(shortlist_dim=8, shortlist=60),
                          threads=1)
    idx.add(rng.standard_normal((400, DIM)).astype(np.float32), ids=np.arange(400) * 3 + 1)
    return idx


# One mixed batch: embeddings at every prefix and both formats, text searches with different k
# and funnels, a request the model breaks on, and one refused before batching (too long).
MIXED = [
    ("/v1/embeddings", {"input": ["alpha one", "alpha two"], "model": "hash-encoder",
                        "dimensions": 8}),
    ("/v1/embeddings", {"input": "beta", "model": "hash-encoder", "dimensions": 16,
                        "encoding_format": "base64"}),
    ("/v1/embeddings", {"input": ["explode"], "model": "hash-encoder"}),
    ("/v1/search", {"query": ["gamma", "delta"], "k": 3}),
    ("/v1/embeddings", {"input": "w " * 200, "model": "hash-encoder"}),
    ("/v1/search", {"query": "epsilon", "k": 7, "shortlist_dim": 16, "shortlist": 40}),
    ("/v1/embeddings", {"input": ["zeta"], "model": "hash-encoder", "dimensions": 32}),
]
BATCHED_TEXTS = 8  # texts of the MIXED requests that reach the batcher


def _replies(index, batching: bool):
    enc = ExplodingEncoder(DIM, max_tokens=64)
    config = ServeConfig(batching=batching, max_batch_size=BATCHED_TEXTS,
                         max_wait_ms=LONG_WAIT_MS)
    app = create_app(enc, IndexBackend(index), config)
    with serving(app) as url, ThreadPoolExecutor(len(MIXED)) as pool:
        got = list(pool.map(lambda rb: httpx.post(url + rb[0], json=rb[1], timeout=60), MIXED))
        calls = enc.calls
    return [(r.status_code, r.json()) for r in got], calls


def test_mixed_concurrent_requests_batched_equal_each_served_alone(index):
    batched, calls_batched = _replies(index, batching=True)
    alone, calls_alone = _replies(index, batching=False)
    assert calls_alone == BATCHED_TEXTS - 2  # one encoder call per request that reached it
    # one batch of all 8 texts, which failed on "explode"; then each of its 6 requests alone
    assert calls_batched == 1 + 6
    statuses = [s for s, _ in batched]
    assert statuses == [200, 200, 500, 200, 400, 200, 200]
    for (s1, b1), (s2, b2) in zip(batched, alone):
        assert s1 == s2
        if s1 == 200 and "timings_ms" in b1:  # search: same hits, params; timings differ
            b1, b2 = ({k: v for k, v in b.items() if k != "timings_ms"} for b in (b1, b2))
        assert b1 == b2
    # and the hits are the index's own for the model's embeddings
    ref = index.search(HashEncoder(DIM).encode(["gamma", "delta"]), 3)
    assert [d["ids"] for d in batched[3][1]["data"]] == ref.ids.tolist()
    ref = index.search(HashEncoder(DIM).encode(["epsilon"]), 7, shortlist_dim=16, shortlist=40)
    assert batched[5][1]["data"][0]["ids"] == ref.ids[0].tolist()
    assert batched[4][1]["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path,body,param", [
    ("/v1/embeddings", b'{"input": ["ok", "cut \\ud83d"], "model": "hash-encoder"}', "input"),
    ("/v1/embeddings", b'{"input": "\\udc00", "model": "hash-encoder"}', "input"),
    ("/v1/search", b'{"query": ["fine", "x\\ud800y"], "k": 2}', "query"),
])
def test_lone_surrogate_text_is_a_400_naming_the_item(index, path, body, param):
    # JSON can carry half an emoji (a client cut "\ud83d\ude00" in two); the model cannot
    # encode it: all-MiniLM's tokenizer raised TypeError (a 500), the fake UnicodeEncodeError
    app = create_app(HashEncoder(DIM), IndexBackend(index))
    with serving(app) as url:
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == "invalid_input"
        item = 1 if b"[" in body.split(b":")[1] else 0
        assert f"{param}[{item}] is not valid Unicode text: a lone surrogate" in err["message"]
        assert httpx.get(url + "/health").status_code == 200


def test_a_request_after_the_runner_stopped_is_a_503_not_a_500():
    from fastapi.testclient import TestClient

    for batching in (False, True):  # (unfixed, the batcher's request waited for ever)
        app = create_app(HashEncoder(DIM), config=ServeConfig(batching=batching))
        with TestClient(app, raise_server_exceptions=False) as client:
            client.portal.call(app.state.mrl["runner"].stop)
            r = client.post("/v1/embeddings", json={"input": "x", "model": "hash-encoder"})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "service_unavailable"


def test_service_search_equals_mrl_search_and_the_library(index, tmp_path):
    from mrl.cli import main

    index.save(tmp_path / "idx")
    q = np.random.default_rng(9).standard_normal((4, DIM)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    app = create_app(None, IndexBackend(index))
    with serving(app) as url:
        for opts, body in (([], {}), (["--shortlist", "30", "--shortlist-dim", "16"],
                                      {"shortlist": 30, "shortlist_dim": 16})):
            out = tmp_path / f"r{len(opts)}.json"
            assert main(["search", str(tmp_path / "idx"), str(tmp_path / "q.npy"), "--k", "6",
                         "--out", str(out)] + opts) == 0
            cli = json.loads(out.read_text())["results"]
            r = httpx.post(url + "/v1/search", json={"vector": q.tolist(), "k": 6, **body})
            assert r.status_code == 200, r.text
            served = r.json()["data"]
            lib = index.search(q, 6, **body)
            for j in range(len(q)):
                assert served[j]["ids"] == cli[j]["ids"] == lib.ids[j].tolist()
                np.testing.assert_allclose(served[j]["scores"], cli[j]["scores"], rtol=1e-6)


# ----------------------------------------------------------------------------- Qdrant
N = 300


@pytest.fixture()
def edge(tmp_path):
    pytest.importorskip("qdrant_edge")
    from mrl.qdrant import QdrantIndex, QdrantLayout, export_qdrant, open_rows, open_target
    from mrl.retrieval import EmbeddingStore

    db = np.random.default_rng(1).standard_normal((N, DIM)).astype(np.float32)
    EmbeddingStore.from_array(tmp_path / "a", db, Nesting((8, 16, 32)))
    target = open_target("docs", path=tmp_path / "q")
    export_qdrant(open_rows(tmp_path / "a"), target, QdrantLayout((8, 16, 32)),
                  tmp_path / "p.json", collection="docs")
    yield QdrantIndex(target), db
    target.close()


def test_qdrant_service_widens_its_default_shortlist_for_a_large_k(edge):
    from mrl.serve import QdrantBackend

    qindex, _ = edge
    q = np.random.default_rng(2).standard_normal(DIM).astype(np.float32)
    backend = QdrantBackend(qindex)  # default funnel: K=200 on d8, rerank at d32
    out = backend.search(q[None], 250)  # k > K: was a 400 "shortlist must be >= k (250)"
    _, ids = qindex.search(q[None], 250, shortlist_dim=8, shortlist=250)
    assert out.ids == ids.tolist()
    assert out.params == {"shortlist_dim": 8, "shortlist": 250, "stages": [[32, 250]]}
    out = backend.search(q[None], 5)  # params report the funnel that ran
    assert out.params == {"shortlist_dim": 8, "shortlist": 200, "stages": [[32, 5]]}
    with pytest.raises(ValueError, match=r"shortlist must be >= k \(250\), got shortlist=100"):
        backend.search(q[None], 250, shortlist=100)  # explicit: run (and refused) as given


def test_reexporting_another_store_of_the_same_shape_is_refused(edge, tmp_path):
    from mrl.qdrant import QdrantLayout, export_qdrant, open_rows
    from mrl.retrieval import EmbeddingStore

    qindex, db = edge
    other = np.random.default_rng(3).standard_normal((N, DIM)).astype(np.float32)
    EmbeddingStore.from_array(tmp_path / "b", other, Nesting((8, 16, 32)))  # same count, ids
    with pytest.raises(ValueError, match="belongs to another export"):  # was: 0 rows written
        export_qdrant(open_rows(tmp_path / "b"), qindex.target, QdrantLayout((8, 16, 32)),
                      tmp_path / "p.json", collection="docs")
    _, ids = qindex.search(db[:3], 1, shortlist=N)  # the collection still holds store a
    assert ids.ravel().tolist() == [0, 1, 2]
    # a marker written before the vector sample was recorded still resumes its own store
    marker = json.loads((tmp_path / "p.json").read_text())
    del marker["fingerprint"]["sample"], marker["finished"]
    (tmp_path / "p.json").write_text(json.dumps(marker))
    report = export_qdrant(open_rows(tmp_path / "a"), qindex.target, QdrantLayout((8, 16, 32)),
                           tmp_path / "p.json", collection="docs")
    assert report.written == 0


class _Crash(Exception):
    pass


class _FinishCounter:
    """Wraps a target; counts ``finish`` calls; the first ``crash`` of them die (a kill while
    Edge builds its HNSW graph, which takes minutes on a large collection)."""

    def __init__(self, inner, crash: int = 0) -> None:
        self.inner, self.crash, self.finished = inner, crash, 0

    def finish(self):
        self.finished += 1
        if self.finished <= self.crash:
            raise _Crash
        return self.inner.finish()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_an_export_killed_while_finishing_finishes_when_run_again(tmp_path):
    pytest.importorskip("qdrant_edge")
    from mrl.qdrant import QdrantLayout, export_qdrant, open_rows, open_target
    from mrl.retrieval import EmbeddingStore

    db = np.random.default_rng(4).standard_normal((N, DIM)).astype(np.float32)
    EmbeddingStore.from_array(tmp_path / "s", db, Nesting((8, 32)))
    rows, layout, marker = open_rows(tmp_path / "s"), QdrantLayout((8, 32)), tmp_path / "m.json"
    target = _FinishCounter(open_target("c", path=tmp_path / "q"), crash=1)
    with pytest.raises(_Crash):
        export_qdrant(rows, target, layout, marker, collection="c", batch_size=100)
    assert json.loads(marker.read_text())["done"] == N  # every row is in, the graph is not
    report = export_qdrant(rows, target, layout, marker, collection="c", batch_size=100)
    assert report.written == 0 and target.finished == 2  # before: finish was skipped
    export_qdrant(rows, target, layout, marker, collection="c", batch_size=100)
    assert target.finished == 2  # finished and recorded: a third run does nothing
    assert target.count() == N
    target.inner.close()


def test_an_encoder_raising_stopiteration_fails_its_request_instead_of_hanging():
    def encode(texts):
        raise StopIteration("exhausted generator inside the model")

    async def go(runner):
        await runner.start()
        try:
            with pytest.raises(RuntimeError, match="the encoder raised StopIteration"):
                await asyncio.wait_for(runner.submit(["a"]), 10)  # was: waited for ever
        finally:
            await runner.stop()

    for runner in (MicroBatcher(encode, max_batch_size=4, max_wait_ms=0), DirectRunner(encode)):
        _run(go(runner))


def test_served_connections_have_tcp_nodelay():
    """Connections accepted on `bind_socket`'s socket get TCP_NODELAY from asyncio (it sets it
    only for sockets created with IPPROTO_TCP): without it each response waited for the client's
    delayed ACK, p50 44 ms for GET /health on loopback (0.9 ms with it)."""
    import socket

    from mrl.serve.server import bind_socket

    async def go() -> int:
        sock = bind_socket("127.0.0.1", 0)
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                s = transport.get_extra_info("socket")
                seen.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(seen, 10)
            writer.close()
        finally:
            server.close()
        return value

    assert _run(go()) != 0
