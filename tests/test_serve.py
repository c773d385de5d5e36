"""The HTTP service with a fake encoder: OpenAI compatibility, batching, search, bad input.

A real uvicorn server runs on a free loopback port; it is called with the official `openai` client
and with plain HTTP (httpx).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from mrl import Nesting  # noqa: E402
from mrl.serve import (  # noqa: E402
    HashEncoder,
    IndexBackend,
    ServeConfig,
    create_app,
    serving,
    truncate_normalize,
)
from mrl.serve.batching import DirectRunner, MicroBatcher  # noqa: E402

DIM = 32
MODEL = "hash-encoder"


def reference_embedding(text: str, m: int, enc: HashEncoder) -> np.ndarray:
    """One text, encoded alone, prefix m, re-normalised by a plain loop."""
    z = enc.encode([text])[0][:m].astype(np.float64)
    return z / np.sqrt(sum(v * v for v in z))


@pytest.fixture(scope="module")
def index():
    from mrl.retrieval import MatryoshkaIndex, SearchConfig

    rng = np.random.default_rng(0)
    db = rng.standard_normal((500, DIM)).astype(np.float32)
    idx = MatryoshkaIndex(Nesting.doubling(8, DIM), SearchConfig(shortlist_dim=8, shortlist=50),
                          threads=1)
    idx.add(db, ids=np.arange(1000, 1500))
    return idx


@pytest.fixture(scope="module")
def server(index):
    enc = HashEncoder(DIM, max_tokens=64)
    config = ServeConfig(max_inputs=16, max_request_bytes=64 * 1024, max_k=100)
    app = create_app(enc, IndexBackend(index), config)
    with serving(app) as url:
        yield url, enc, app


@pytest.fixture(scope="module")
def client(server):
    url, _, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


# ----------------------------------------------------------------------------- pure functions
def test_truncate_normalize_matches_loop():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    x[2] = 0.0  # a zero row stays zero instead of NaN
    got = truncate_normalize(x, 8)
    for i in range(5):
        p = x[i, :8].astype(np.float64)
        n = np.sqrt((p * p).sum())
        np.testing.assert_allclose(got[i], p / n if n > 0 else p, rtol=1e-6, atol=1e-7)


def test_serve_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_inputs must be >= 1, got max_inputs=0"):
        ServeConfig(max_inputs=0)
    with pytest.raises(ValueError, match="max_k must be an integer, got max_k=True"):
        ServeConfig(max_k=True)  # bool is an int: it was max_k=1
    for bad in (-1, float("nan"), float("inf")):  # NaN / inf: every request hung
        with pytest.raises(ValueError, match="max_wait_ms must be finite and >= 0"):
            ServeConfig(max_wait_ms=bad)


def test_create_app_needs_encoder_or_index():
    with pytest.raises(ValueError, match="needs an encoder, an index, or both"):
        create_app(None, None)


# ----------------------------------------------------------------------------- batching
def _run(coro):
    return asyncio.run(coro)


def test_micro_batcher_equals_direct_and_batches_concurrent_requests():
    enc = HashEncoder(DIM, delay_s=0.01)
    requests = [[f"text {i} {j}" for j in range(i % 3 + 1)] for i in range(24)]

    async def go(runner):
        await runner.start()
        try:
            return await asyncio.gather(*(runner.submit(r) for r in requests))
        finally:
            await runner.stop()

    batcher = MicroBatcher(enc.encode, max_batch_size=16, max_wait_ms=5)
    batched = _run(go(batcher))
    direct_runner = DirectRunner(enc.encode)
    direct = _run(go(direct_runner))
    for b, d, texts in zip(batched, direct, requests):
        assert b.shape == (len(texts), DIM)
        np.testing.assert_array_equal(b, d)  # each request gets exactly its own rows
    assert direct_runner.batches == len(requests)
    assert batcher.batches < len(requests) / 2  # concurrent requests shared encoder calls
    assert max(batcher.batch_sizes) <= 16


def test_micro_batcher_large_request_runs_alone_and_errors_reach_callers():
    calls = []

    def encode(texts):
        calls.append(len(texts))
        if "boom" in texts:
            raise RuntimeError("model failed")
        return np.zeros((len(texts), 4), np.float32)

    async def go():
        b = MicroBatcher(encode, max_batch_size=4, max_wait_ms=1)
        await b.start()
        try:
            big = await b.submit([str(i) for i in range(10)])  # larger than max_batch_size
            assert big.shape == (10, 4)
            with pytest.raises(RuntimeError, match="model failed"):
                await b.submit(["boom"])
            ok = await b.submit(["fine"])  # the batcher survives a failed batch
            assert ok.shape == (1, 4)
        finally:
            await b.stop()

    _run(go())
    assert calls[0] == 10


def test_micro_batcher_drops_a_cancelled_waiting_request():
    enc = HashEncoder(DIM)
    seen = []

    def encode(texts):
        seen.append(list(texts))
        return enc.encode(texts)

    # a long window (500 ms) against short sleeps (20 ms): a loaded CI machine stays inside it
    batcher = MicroBatcher(encode, max_batch_size=64, max_wait_ms=500)

    async def go():
        await batcher.start()
        try:
            keep = asyncio.create_task(batcher.submit(["a", "b"]))
            gone = asyncio.create_task(batcher.submit(["cancelled"]))
            await asyncio.sleep(0.02)  # both wait for company (up to 500 ms)
            assert not seen
            gone.cancel()
            rows = await asyncio.wait_for(keep, 2)
            with pytest.raises(asyncio.CancelledError):
                await gone
            lone = asyncio.create_task(batcher.submit(["alone"]))
            await asyncio.sleep(0.02)
            lone.cancel()
            await asyncio.sleep(0.6)  # past its window: its batch formed empty, no encoder call
            assert len(seen) == 1
            after = await asyncio.wait_for(batcher.submit(["after"]), 2)  # still serving
        finally:
            await batcher.stop()
        return rows, after

    rows, after = _run(go())
    assert seen == [["a", "b"], ["after"]]
    np.testing.assert_array_equal(rows, enc.encode(["a", "b"]))
    np.testing.assert_array_equal(after, enc.encode(["after"]))
    assert batcher.batches == 2 and list(batcher.batch_sizes) == [2, 1]


def test_micro_batcher_waits_max_wait_for_company_and_no_longer():
    wait = 0.5  # long against the 50 ms sleep below: a loaded machine stays inside it
    calls = []  # (when the encoder started, its texts)

    def encode(texts):
        calls.append((time.monotonic(), list(texts)))
        return np.zeros((len(texts), 2), np.float32)

    async def go():
        b = MicroBatcher(encode, max_batch_size=8, max_wait_ms=wait * 1000)
        await b.start()
        try:
            t0 = time.monotonic()
            first = asyncio.create_task(b.submit(["x"]))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(b.submit(["y"]))  # within the window: same batch
            await asyncio.wait_for(asyncio.gather(first, second), 2)
            t1 = time.monotonic()
            await asyncio.wait_for(b.submit(["z"]), 2)  # alone: waits the whole window
        finally:
            await b.stop()
        # a full batch does not wait for the window (10 s here: the 2 s timeout would hit)
        full = MicroBatcher(encode, max_batch_size=2, max_wait_ms=10_000)
        await full.start()
        try:
            await asyncio.wait_for(asyncio.gather(full.submit(["p"]), full.submit(["q"])), 2)
            await asyncio.wait_for(full.submit(["r", "s", "t"]), 2)  # larger: runs at once
        finally:
            await full.stop()
        return t0, t1

    t0, t1 = _run(go())
    assert [texts for _, texts in calls] == [["x", "y"], ["z"], ["p", "q"], ["r", "s", "t"]]
    # the window starts when the first request arrives: never (much) earlier; later only by
    # what a loaded machine adds (bounded loosely: the 10 s window of `full` would be far above)
    for start, when in ((t0, calls[0][0]), (t1, calls[1][0])):
        assert wait - 0.005 <= when - start < wait + 1.0


def test_micro_batcher_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        MicroBatcher(lambda t: None, max_batch_size=0)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"max_wait_ms must be finite and >= 0, got {bad}"):
            MicroBatcher(lambda t: None, max_wait_ms=bad)


# ----------------------------------------------------------------------------- OpenAI client
def test_openai_client_float_and_base64_match_reference(server):
    url, enc, _ = server
    c = openai.OpenAI(base_url=url + "/v1", api_key="dummy", max_retries=0)
    texts = ["the quick brown fox", "jumps over", "the lazy dog"]
    for fmt in ("float", "base64"):
        for m in (8, 16, 32):
            res = c.embeddings.create(input=texts, model=MODEL, dimensions=m, encoding_format=fmt)
            assert res.model == MODEL and res.object == "list"
            assert [d.index for d in res.data] == [0, 1, 2]
            assert res.usage.prompt_tokens == sum(len(t.split()) + 2 for t in texts)
            for d, t in zip(res.data, texts):
                got = d.embedding
                if fmt == "base64":  # asked for explicitly, the client hands back the string
                    got = np.frombuffer(base64.b64decode(got), dtype="<f4")
                np.testing.assert_allclose(got, reference_embedding(t, m, enc),
                                           rtol=1e-5, atol=1e-6)
    # default: no dimensions -> full size; the client's default base64 transport decodes
    res = c.embeddings.create(input="single text", model=MODEL)
    assert len(res.data) == 1 and len(res.data[0].embedding) == DIM
    np.testing.assert_allclose(np.linalg.norm(res.data[0].embedding), 1.0, rtol=1e-5)


def test_unbatched_server_gives_the_same_embeddings():
    """Concurrent requests: the batching server answers each with exactly what the unbatched
    one (an encoder call per request) answers, while sharing encoder calls between them."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"input": [f"request {i} text {j}" for j in range(i % 3 + 1)], "model": MODEL,
               "dimensions": (8, 16, 32)[i % 3]} for i in range(8)]
    replies, calls = {}, {}
    for batching in (True, False):
        enc = HashEncoder(DIM, delay_s=0.03)  # a model call costs 30 ms: requests pile up
        # a 200 ms window: the 8 requests' threads start well within it, even on a loaded machine
        app = create_app(enc, config=ServeConfig(batching=batching, max_wait_ms=200))
        with serving(app) as url, ThreadPoolExecutor(len(bodies)) as pool:
            got = list(pool.map(
                lambda b, url=url: httpx.post(url + "/v1/embeddings", json=b, timeout=30), bodies))
            calls[batching] = (enc.calls, app.state.mrl["runner"].batches)
        assert [r.status_code for r in got] == [200] * len(bodies)
        replies[batching] = [r.json() for r in got]
    assert replies[True] == replies[False]
    ref = HashEncoder(DIM)
    for body, reply in zip(bodies, replies[True]):
        assert [d["index"] for d in reply["data"]] == list(range(len(body["input"])))
        for text, d in zip(body["input"], reply["data"]):
            np.testing.assert_allclose(d["embedding"], reference_embedding(
                text, body["dimensions"], ref), rtol=1e-5, atol=1e-6)
    assert calls[False] == (len(bodies), len(bodies))  # one encoder call per request
    assert calls[True][0] == calls[True][1] < len(bodies)  # concurrent requests shared calls


def test_openai_client_sees_errors(server):
    url, _, _ = server
    c = openai.OpenAI(base_url=url + "/v1", api_key="dummy", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="dimensions=12 is not a prefix size"):
        c.embeddings.create(input="x", model=MODEL, dimensions=12)
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        c.embeddings.create(input="x", model="text-embedding-3-small")
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]


# ----------------------------------------------------------------------------- plain HTTP
def test_http_response_schema_and_base64_layout(client, server):
    _, enc, _ = server
    r = client.post("/v1/embeddings", json={"input": ["a b", "c"], "model": MODEL,
                                            "encoding_format": "base64", "dimensions": 16})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    row = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(row, reference_embedding("a b", 16, enc), rtol=1e-5, atol=1e-6)
    assert body["data"][0] == {**body["data"][0], "object": "embedding", "index": 0}


def test_health_metadata_models_and_docs(client):
    assert client.get("/health").json() == {"status": "ok"}
    meta = client.get("/v1/metadata").json()
    assert meta["model"]["nesting"] == [8, 16, 32] and meta["model"]["dim"] == DIM
    assert meta["index"]["size"] == 500 and meta["index"]["nesting"] == [8, 16, 32]
    assert "default" in meta["index"]["configs"]
    spec = client.get("/openapi.json").json()
    assert {"/v1/embeddings", "/v1/search", "/v1/metadata", "/health"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def _post(client, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/v1/embeddings", content=data, headers={"content-type": content_type})


BAD_REQUESTS = [
    # (body, content type, status, param, message fragment)
    ({"input": [], "model": MODEL}, None, 400, "input", "must not be an empty list"),
    ({"input": "", "model": MODEL}, None, 400, "input", "input[0] is empty"),
    ({"input": ["ok", "  "], "model": MODEL}, None, 400, "input", "input[1] is empty"),
    ({"input": ["x"] * 17, "model": MODEL}, None, 400, "input", "17 items; at most 16"),
    ({"input": "w " * 100, "model": MODEL}, None, 400, "input", "102 tokens; this model accepts"),
    ({"input": [1, 2, 3], "model": MODEL}, None, 400, "input", "token arrays is not supported"),
    ({"input": [[1, 2]], "model": MODEL}, None, 400, "input", "token arrays is not supported"),
    ({"input": ["a", 3], "model": MODEL}, None, 400, "input", "input"),
    ({"input": "x", "model": MODEL, "dimensions": 0}, None, 400, "dimensions", "positive integer"),
    ({"input": "x", "model": MODEL, "dimensions": -4}, None, 400, "dimensions",
     "positive integer, got -4"),
    ({"input": "x", "model": MODEL, "dimensions": 64}, None, 400, "dimensions",
     "larger than the model's embedding size 32"),
    ({"input": "x", "model": MODEL, "dimensions": 12}, None, 400, "dimensions",
     "choose one of [8, 16, 32]"),
    ({"input": "x", "model": MODEL, "dimensions": "8"}, None, 400, "dimensions", "dimensions"),
    ({"input": "x", "model": MODEL, "encoding_format": "int8"}, None, 400, "encoding_format",
     "encoding_format"),
    ({"input": "x"}, None, 400, "model", "model"),
    ({"model": MODEL}, None, 400, "input", "input"),
    ({"input": "x", "model": "other"}, None, 404, "model", "is not served here"),
    (b'{"input": "x", "model": ', None, 400, None, "not valid JSON"),
    (b"[1, 2", None, 400, None, "not valid JSON"),
    (b'["not", "an", "object"]', None, 400, None, "valid dictionary"),
    ({"input": "x", "model": MODEL}, "text/plain", 415, None, "must be application/json"),
    ({"input": "x", "model": MODEL}, "application/x-www-form-urlencoded", 415, None,
     "must be application/json"),
    ({"input": "x" * 70_000, "model": MODEL}, None, 413, None, "larger than the limit"),
]


@pytest.mark.parametrize("body,ctype,status,param,fragment", BAD_REQUESTS)
def test_bad_requests_get_openai_shaped_errors(client, body, ctype, status, param, fragment):
    r = _post(client, body, ctype or "application/json")
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment in err["message"]
    if param is not None:
        assert err["param"] == param
    assert client.get("/health").status_code == 200  # still serving


def test_wrong_route_and_method(client):
    r = client.get("/v1/embeddings")
    assert r.status_code == 405 and "error" in r.json()
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_missing_content_type_is_415(server):
    url, _, _ = server
    r = httpx.post(url + "/v1/embeddings", content=b'{"input": "x", "model": "hash-encoder"}',
                   headers={"content-type": ""})
    assert r.status_code == 415


# ----------------------------------------------------------------------------- search
def test_search_by_vector_equals_index(client, index):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, DIM)).astype(np.float32)
    r = client.post("/v1/search", json={"vector": q.tolist(), "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = index.search(q, 5)
    assert [d["ids"] for d in body["data"]] == ref.ids.tolist()
    np.testing.assert_allclose([d["scores"] for d in body["data"]], ref.scores, rtol=1e-5)
    assert {"shortlist", "rerank", "search", "total"} <= set(body["timings_ms"])
    assert body["params"]["shortlist_dim"] == 8 and body["params"]["shortlist"] == 50


def test_search_funnel_params_and_named_config(client, index):
    q = np.random.default_rng(6).standard_normal(DIM).astype(np.float32)
    body = {"vector": q.tolist(), "k": 4, "shortlist_dim": 16, "shortlist": 20,
            "stages": [[32, 4]]}
    r = client.post("/v1/search", json=body)
    assert r.status_code == 200, r.text
    ref = index.search(q[None], 4, shortlist_dim=16, shortlist=20, stages=((32, 4),))
    assert r.json()["data"][0]["ids"] == ref.ids[0].tolist()
    r = client.post("/v1/search", json={"vector": q.tolist(), "k": 4, "config": "default"})
    assert r.status_code == 200


def test_tuned_configuration_is_offered_and_used(index):
    from mrl.retrieval.tune import tune

    tuned = copy_index(index)
    queries = np.random.default_rng(8).standard_normal((30, DIM)).astype(np.float32)
    result = tune(tuned, 0.9, k=5, queries=queries, shortlist_dims=(8, 16),
                  shortlists=(100, 500), backends=("flat",), try_funnel=False)
    backend = IndexBackend(tuned)
    assert backend.configs["tuned"]["shortlist_dim"] == result.config.shortlist_dim
    q = np.random.default_rng(7).standard_normal((2, DIM)).astype(np.float32)
    out = backend.search(q, 5, config="tuned")
    ref = tuned.search(q, 5, **{k: v for k, v in result.config.to_dict().items()
                                if k != "stages"})
    assert out.ids == ref.ids.tolist()
    assert out.params["shortlist"] == result.config.shortlist


def copy_index(index):
    from mrl.retrieval import MatryoshkaIndex

    new = MatryoshkaIndex(index.nesting, index.config, threads=1)
    new.add(index.vectors(), ids=index.ids)
    return new


def test_search_by_text_embeds_with_the_model(client, index, server):
    _, enc, _ = server
    r = client.post("/v1/search", json={"query": ["hello world", "bye"], "k": 3})
    assert r.status_code == 200, r.text
    ref = index.search(enc.encode(["hello world", "bye"]), 3)
    assert [d["ids"] for d in r.json()["data"]] == ref.ids.tolist()
    assert "embed" in r.json()["timings_ms"]


@pytest.mark.parametrize("body,param,fragment", [
    ({"k": 3}, "query", "exactly one of query"),
    ({"query": "x", "vector": [0.0] * DIM}, "query", "exactly one of query"),
    ({"vector": [0.1] * 5}, "vector", "dimension 32, got 5"),
    ({"vector": [0.1] * DIM, "k": 0}, "k", "k must be in [1, 100]"),
    ({"vector": [0.1] * DIM, "k": 101}, "k", "k must be in [1, 100]"),
    ({"vector": [0.1] * DIM, "shortlist_dim": 12}, "shortlist_dim", "shortlist_dim"),
    ({"vector": [0.1] * DIM, "k": 20, "shortlist": 10}, "shortlist", "shortlist must be >= k"),
    ({"vector": [0.1] * DIM, "config": "fastest"}, "config", "not a configuration"),
    ({"vector": [0.1] * DIM, "stages": [[12, 5]]}, "stages", "stages"),
    ({"vector": [0.1] * DIM, "surprise": 1}, "surprise", "Extra inputs"),
    ({"vector": []}, "vector", "vector must hold 1 to 256 query vectors, got 0"),
    ({"vector": [[0.1] * DIM] * 257}, "vector", "vector must hold 1 to 256 query vectors"),
    ({"query": [""]}, "query", "query[0] is empty"),
    ({"vector": [[0.1] * DIM, [0.0] * DIM]}, "vector", "vector[1] is all zeros"),
])
def test_search_bad_input(client, body, param, fragment):
    r = client.post("/v1/search", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["param"] == param


def test_search_without_index_is_404():
    app = create_app(HashEncoder(DIM))
    with serving(app) as url:
        r = httpx.post(url + "/v1/search", json={"query": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "index_not_loaded"


def test_search_only_server_refuses_text(index):
    app = create_app(None, IndexBackend(index))
    with serving(app) as url:
        r = httpx.post(url + "/v1/search", json={"query": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_loaded"
        r = httpx.post(url + "/v1/search", json={"vector": [0.5] * DIM, "k": 2})
        assert r.status_code == 200


# ----------------------------------------------------------------------------- load
async def _load(url: str, n: int, concurrency: int, dims=(8, 16, 32)) -> dict:
    """n embeddings requests, at most ``concurrency`` in flight; latencies and errors."""
    sem = asyncio.Semaphore(concurrency)
    latencies, errors = [], []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def one(i: int) -> None:
            async with sem:
                t = time.perf_counter()
                r = await c.post("/v1/embeddings", json={
                    "input": [f"request {i}", f"second text {i}"], "model": MODEL,
                    "dimensions": dims[i % len(dims)]})
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200 or len(r.json()["data"]) != 2:
                    errors.append((i, r.status_code))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3
    return {"n": n, "errors": errors, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "rps": n / wall}


def test_load_small_zero_errors(server):
    url, _, _ = server
    stats = asyncio.run(_load(url, 100, 16))
    print(f"\nload 100 @16: p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms, "
          f"{stats['rps']:.0f} req/s")
    assert stats["errors"] == []


@pytest.mark.slow
def test_load_2000_requests_concurrency_32(server):
    url, _, _ = server
    stats = asyncio.run(_load(url, 2000, 32))
    print(f"\nload 2000 @32: p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms, "
          f"{stats['rps']:.0f} req/s")
    assert stats["errors"] == []


def test_mrl_serve_command_end_to_end():
    """`mrl serve` as a user runs it: a subprocess on a free loopback port."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mrl.cli", "serve", "--model", "hash:32",
                             "--port", str(port), "--log-level", "warning"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="dummy", max_retries=0)
        res = client.embeddings.create(input=["a", "b"], model="hash:32", dimensions=16)
        assert [len(d.embedding) for d in res.data] == [16, 16]
    finally:
        proc.terminate()
        proc.wait(30)


def test_search_short_ivf_lists_are_trimmed_not_padded():
    # one probed IVF cell of ~12 rows cannot fill k=30: answer fewer hits, never id 0 / null
    from mrl.retrieval import MatryoshkaIndex, SearchConfig

    rng = np.random.default_rng(3)
    idx = MatryoshkaIndex(Nesting.doubling(8, DIM), SearchConfig(
        shortlist_dim=8, shortlist=50, backend="ivf", nlist=40, nprobe=1), threads=1)
    idx.add(rng.standard_normal((500, DIM)).astype(np.float32), ids=np.arange(1000, 1500))
    q = rng.standard_normal((4, DIM)).astype(np.float32)
    app = create_app(None, IndexBackend(idx))
    with serving(app) as url:
        r = httpx.post(url + "/v1/search", json={"vector": q.tolist(), "k": 30})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    ref = idx.search(q, 30)
    assert any(len(d["ids"]) < 30 for d in data)
    for j, d in enumerate(data):
        assert (d["ids"], d["scores"]) == ref.hits(j)
        assert len(d["ids"]) == len(d["scores"]) and all(i >= 1000 for i in d["ids"])


def test_named_config_is_widened_for_a_larger_k_and_reports_what_ran():
    from mrl.retrieval import MatryoshkaIndex, SearchConfig

    rng = np.random.default_rng(4)
    idx = MatryoshkaIndex(Nesting.doubling(8, DIM), SearchConfig(
        shortlist_dim=8, shortlist=40, stages=((16, 20), (DIM, 10))), threads=1)
    idx.add(rng.standard_normal((300, DIM)).astype(np.float32))
    q = rng.standard_normal((2, DIM)).astype(np.float32)
    backend = IndexBackend(idx)
    for name in (None, "default"):  # the index's funnel keeps 20 at 16 dims; k=30 widens it
        out = backend.search(q, 30, config=name)
        assert [len(ids) for ids in out.ids] == [30, 30]
        assert out.params["shortlist"] == 40 and out.params["stages"] == [[16, 30], [DIM, 30]]
    with pytest.raises(ValueError, match=r"stages\[0\] keep must be in \[k=30, 40\]"):
        backend.search(q, 30, stages=[[16, 20], [DIM, 10]])  # explicit: run as given


def test_busy_port_or_unknown_host_fail_before_the_model_loads(monkeypatch, capsys):
    import socket

    import mrl.commands.serve as serve_command
    from mrl.cli import main

    def no_model(args):
        raise AssertionError("the model must not load before the port is bound")

    monkeypatch.setattr(serve_command, "build_app", no_model)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "hash:32", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on --host 127.0.0.1 --port {port}: Address already in use" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["serve", "--model", "hash:32", "--host", "no-such-host.invalid"]) == 2
    assert "--host 'no-such-host.invalid' is not an address" in capsys.readouterr().err


def test_bind_addresses_follow_uvicorn():
    import socket

    from mrl.serve.server import _resolve, bind_socket

    assert _resolve("localhost", 8000) == (socket.AF_INET, ("127.0.0.1", 8000))
    sock = bind_socket("", 0)  # '' = every interface, as uvicorn binds it
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "0.0.0.0"
    finally:
        sock.close()


def test_serve_prints_where_it_listens(monkeypatch, capsys):
    """uvicorn is handed a bound socket and does not announce it: mrl says the address, with
    the real port for --port 0."""
    import mrl.commands.serve as serve_command
    import mrl.serve.server as server
    from mrl.cli import main

    monkeypatch.setattr(serve_command, "build_app", lambda args: object())
    seen = {}
    monkeypatch.setattr(server, "serve_forever",
                        lambda app, sock, **k: seen.setdefault("port", sock.getsockname()[1]))
    assert main(["serve", "--model", "hash:32", "--port", "0"]) == 0
    port, out = seen["port"], capsys.readouterr().out
    assert port > 0 and f"mrl serve: listening on http://127.0.0.1:{port}" in out
