"""Serving benchmarks: embeddings/s (batching on vs off), /v1/search latency at 1M vectors, and the
Qdrant funnel's recall against the in-process index.

    python benchmarks/bench_serve.py --part embed   [--requests 400 --concurrency 32]
    python benchmarks/bench_serve.py --part search  [--n 1000000 --dim 384 --queries 200]
    python benchmarks/bench_serve.py --part qdrant  [--qdrant-n 100000]
    python benchmarks/bench_serve.py --part all --json results/serve/bench.json

Synthetic "MRL-like" vectors: Gaussian coordinates whose standard deviation decays as
1/sqrt(1 + j) with the coordinate j (leading dims carry most of the signal, as in MRL models);
queries are database rows plus Gaussian noise (so each has a true near neighbour). Every part runs
once; the tables (last) give the ratios measured in that run.

Agreement, before timing: the model's batched encodings equal its one-text-per-call encodings, and
each server's warm-up responses equal the model's own (unit-normalised) embeddings of those texts;
the Qdrant rows report their overlap with the in-process funnel. Each timed search path is built
and warmed up before it is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mrl.records import make_record, save_records


def mrl_like(n: int, d: int, seed: int, block: int = 100_000) -> np.ndarray:
    """[n, d] float32, std of coordinate j = 1/sqrt(1+j); generated in blocks (bounded memory)."""
    rng = np.random.default_rng(seed)
    scale = (1.0 / np.sqrt(1.0 + np.arange(d))).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, block):
        out[s : s + block] = rng.standard_normal((min(block, n - s), d), dtype=np.float32) * scale
    return out


def noisy_queries(db: np.ndarray, q: int, seed: int, noise: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(db), q, replace=False)
    scale = db[:1000].std(axis=0)
    return db[rows] + noise * scale * rng.standard_normal((q, db.shape[1])).astype(np.float32)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k (rows [Q, k])."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, p))


# ---------------------------------------------------------------------- embeddings/s
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "mrl.cli", "serve", "--port", str(port), "--log-level",
           "warning", *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def _text(i: int) -> str:
    return f"request number {i}: how do matryoshka embeddings nest?"


async def _load(url: str, model: str, n: int, concurrency: int, keep: int = 0) -> dict:
    """n one-text requests at ``concurrency``; the embeddings of requests 0..keep-1 are returned
    under "embeddings" (the warm-up's, for the agreement check)."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    kept: dict[int, list[float]] = {}
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        async def one(i: int) -> None:
            nonlocal errors
            async with sem:
                t = time.perf_counter()
                r = await c.post("/v1/embeddings", json={"input": _text(i), "model": model})
                lat.append(time.perf_counter() - t)
                errors += r.status_code != 200
                if i < keep and r.status_code == 200:
                    kept[i] = r.json()["data"][0]["embedding"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"texts_per_s": n / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "errors": errors, "requests": n, "embeddings": kept}


AGREE_ATOL = 1e-4  # unit vectors: padding in a batch moves coordinates by ~1e-7


def _unit_rows(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def direct_throughput(model: str, threads: int, n: int = 64, batch: int = 32) -> dict:
    """The model alone, no HTTP: texts/s one text per call vs ``batch`` texts per call. Checks
    first that both give the same embeddings; "reference" holds the one-per-call unit rows."""
    import torch

    from mrl.serve.encoders import load_encoder

    torch.set_num_threads(threads)
    enc = load_encoder(model)
    texts = [_text(i) for i in range(n)]
    ref = _unit_rows(np.concatenate([enc.encode([t]) for t in texts[:batch]]))  # also a warm-up
    diff = float(np.abs(_unit_rows(enc.encode(texts[:batch])) - ref).max())
    if diff > AGREE_ATOL:
        raise AssertionError(f"batched encodings differ from one-per-call ones by {diff:.2e}")
    t = time.perf_counter()
    for text in texts:
        enc.encode([text])
    one = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(0, n, batch):
        enc.encode(texts[i : i + batch])
    return {"one_per_call": one, "batched": n / (time.perf_counter() - t), "batch": batch,
            "reference": ref, "max_diff": diff}


def bench_embed(args) -> list[dict]:
    records = []
    rows = []
    agree: list[str] = []
    load_before = os.getloadavg()[0]
    direct = direct_throughput(args.model, args.threads)
    for key in ("one_per_call", "batched"):
        records.append(make_record(f"model-{key}", None, "texts_per_s", direct[key],
                                   part="embed", model=args.model, threads=args.threads))
    for batching in (True, False):
        extra = ["--model", args.model, "--threads", str(args.threads)]
        extra += [] if batching else ["--no-batching"]
        proc, url = _start_server(extra)
        try:
            import httpx

            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            warm = asyncio.run(_load(url, model, 32, args.concurrency, keep=32))  # warm-up
            name = "batching" if batching else "no-batching"
            got = warm["embeddings"]
            if len(got) != 32:
                raise AssertionError(f"{name}: {32 - len(got)} of 32 warm-up requests failed")
            served = _unit_rows([got[i] for i in range(32)])
            diff = float(np.abs(served - direct["reference"]).max())
            if diff > AGREE_ATOL:  # before timing: the server returns the model's embeddings
                raise AssertionError(f"{name}: served embeddings differ from the model's by "
                                     f"{diff:.2e}")
            agree.append(f"{name} {diff:.1e}")
            stats = asyncio.run(_load(url, model, args.requests, args.concurrency))
            batches = httpx.get(url + "/v1/metadata").json()["batches"]
        finally:
            proc.terminate()
            proc.wait(30)
        rows.append((name, stats, batches))
        for metric in ("texts_per_s", "p50_ms", "p99_ms", "errors"):
            records.append(make_record(name, None, metric, stats[metric], part="embed",
                                       requests=args.requests, concurrency=args.concurrency,
                                       model=args.model))
    print(f"\nembeddings: {args.requests} one-text requests at concurrency {args.concurrency}, "
          f"server torch threads {args.threads}, load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"agreement (max |difference| of unit embeddings, limit {AGREE_ATOL}): model batched vs "
          f"one per call {direct['max_diff']:.1e}; served vs the model: {', '.join(agree)}")
    print(f"the model alone (no HTTP, {args.threads} thread(s)): {direct['one_per_call']:.1f} "
          f"texts/s one per call, {direct['batched']:.1f} texts/s in calls of {direct['batch']}")
    print(f"batching speed-up: {rows[0][1]['texts_per_s'] / rows[1][1]['texts_per_s']:.2f}x")
    print("| mode | texts/s | p50 ms | p99 ms | errors | encoder calls (incl. 32 warm-up) |")
    print("|---|---|---|---|---|---|")
    for name, s, b in rows:
        print(f"| {name} | {s['texts_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | "
              f"{s['errors']} | {b} |")
    return records


# ---------------------------------------------------------------------- /v1/search at 1M
def bench_search(args) -> list[dict]:
    import httpx

    from mrl import Nesting
    from mrl.retrieval import MatryoshkaIndex, SearchConfig, exact_search
    from mrl.serve import IndexBackend, create_app, serving

    t = time.perf_counter()
    db = mrl_like(args.n, args.dim, 0)
    queries = noisy_queries(db, args.queries, 1)
    index = MatryoshkaIndex(Nesting.doubling(16, args.dim),
                            SearchConfig(shortlist_dim=16, shortlist=200), threads=2)
    for s in range(0, args.n, 250_000):  # blocks: bounded temporaries for the prefix norms
        index.add(db[s : s + 250_000])
    del db
    build = index.build()
    print(f"\nsearch: {args.n} x {args.dim} index built in {time.perf_counter() - t:.1f} s "
          f"(shortlist matrix {build:.1f} s)")
    lat, server_ms = [], []
    with serving(create_app(None, IndexBackend(index))) as url, httpx.Client(base_url=url) as c:
        for q in queries[:5]:  # warm-up
            c.post("/v1/search", json={"vector": q.tolist(), "k": 10})
        found = []
        for q in queries:
            t = time.perf_counter()
            r = c.post("/v1/search", json={"vector": q.tolist(), "k": 10})
            lat.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
            found.append(r.json()["data"][0]["ids"])
            server_ms.append(r.json()["timings_ms"])
    truth = exact_search(index.vectors(), queries, 10)[1]  # full-size exact top-10 (reference)
    rec = recall_at(np.asarray(found), index.ids[truth])
    stages = {k: float(np.median([s[k] for s in server_ms])) for k in server_ms[0]}
    print(f"/v1/search ({args.queries} sequential queries, k=10, D_s=16, K=200 -> D): "
          f"p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms, recall@10 vs exact {rec:.3f}")
    print("server-side median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    ctx = {"part": "search", "n": args.n, "dim": args.dim, "queries": args.queries,
           "shortlist": 200}
    return [make_record("funnel-http", 16, "p50_ms", pct(lat, 50), **ctx),
            make_record("funnel-http", 16, "p99_ms", pct(lat, 99), **ctx),
            make_record("funnel-http", 16, "recall@10", rec, **ctx),
            *[make_record("funnel-server", 16, f"{k}_ms_median", v, **ctx)
              for k, v in stages.items()]]


# ---------------------------------------------------------------------- Qdrant recall
def bench_qdrant(args) -> list[dict]:
    from mrl import Nesting
    from mrl.qdrant import QdrantIndex, QdrantLayout, export_qdrant, open_target
    from mrl.retrieval import EmbeddingStore, MatryoshkaIndex, SearchConfig, exact_search

    n, d, k = args.qdrant_n, args.dim, 10
    db = mrl_like(n, d, 2)
    queries = noisy_queries(db, args.queries, 3)
    nesting = Nesting.doubling(16, d)
    records, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddingStore.from_array(Path(tmp) / "store", db, nesting)
        target = open_target("bench", path=Path(tmp) / "q")
        mids = tuple(p for p in (64,) if p < d)  # the middle rescoring prefix, when D > 64
        layout = QdrantLayout((16, *mids, d))
        report = export_qdrant(store, target, layout, Path(tmp) / "p.json", collection="bench",
                               batch_size=2048)
        upload = report.seconds - report.finish_seconds
        names = ", ".join(f"d{p}" for p in layout.prefixes)
        print(f"\nqdrant edge: exported {n} x {d} (vectors {names}; HNSW on d16) in "
              f"{upload:.1f} s ({n / upload:.0f} points/s), then optimize() (index build) "
              f"{report.finish_seconds:.1f} s")
        index = MatryoshkaIndex(nesting, SearchConfig(shortlist_dim=16, shortlist=200), threads=2)
        index.add(db)
        index.build()  # the 16-dim shortlist matrix: else the first timed search builds it
        truth = exact_search(db, queries, k)[1]
        warm = queries[: min(5, len(queries))]
        for shortlist in (50, 200):
            staged = (*((m, shortlist // 2) for m in mids), (d, k))
            for stages in (None, staged) if mids else (None,):  # without mids both are 16->D
                kw = {} if stages is None else {"stages": stages}
                index.search(warm, k, shortlist_dim=16, shortlist=shortlist, **kw)  # warm-up
                t = time.perf_counter()
                ref = index.search(queries, k, shortlist_dim=16, shortlist=shortlist, **kw)
                t_ref = time.perf_counter() - t
                for exact in (True, False):
                    q = QdrantIndex(target, exact=exact)
                    q.search(warm, k, shortlist_dim=16, shortlist=shortlist, stages=stages)
                    t = time.perf_counter()
                    _, ids = q.search(queries, k, shortlist_dim=16, shortlist=shortlist,
                                      stages=stages)
                    t_q = time.perf_counter() - t
                    agree = recall_at(ids, ref.ids)
                    vs_exact = recall_at(ids, truth)
                    path = "->".join(["16", *map(str, mids), "D"]) if stages else "16->D"
                    name = f"K={shortlist} {path} {'exact' if exact else 'index'}"
                    rows.append((name, agree, vs_exact, recall_at(ref.ids, truth),
                                 len(queries) / t_q, len(queries) / t_ref))
                    ctx = {"part": "qdrant", "n": n, "dim": d, "shortlist": shortlist,
                           "stages": [list(s) for s in stages] if stages else None,
                           "exact_scan": exact}
                    records += [make_record("qdrant-edge", 16, "recall@10_vs_index", agree, **ctx),
                                make_record("qdrant-edge", 16, "recall@10_vs_exact", vs_exact,
                                            **ctx),
                                make_record("qdrant-edge", 16, "qps", len(queries) / t_q, **ctx),
                                make_record("in-process", 16, "qps", len(queries) / t_ref, **ctx)]
        info = target.shard.info()
        print(f"edge shard: {info.segments_count} segments, {info.indexed_vectors_count} "
              "vectors in an HNSW index")
        target.close()
    print("| funnel | overlap with in-process funnel | recall@10 vs exact (qdrant) | "
          "recall@10 vs exact (in-process) | qdrant q/s | in-process q/s |")
    print("|---|---|---|---|---|---|")
    for name, a, b, c, qq, qr in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {c:.3f} | {qq:.0f} | {qr:.0f} |")
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--part", choices=["embed", "search", "qdrant", "all"], default="all")
    p.add_argument("--model", default="default")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--qdrant-n", type=int, default=100_000)
    p.add_argument("--json", default=None, help="write the records here")
    args = p.parse_args(argv)
    if args.dim <= 16:  # the shortlist prefix is 16 dims
        p.error(f"--dim must be above 16 (the shortlist prefix), got --dim {args.dim}")
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}")
    parts = ["embed", "search", "qdrant"] if args.part == "all" else [args.part]
    records = []
    for part in parts:
        print(f"\n[{part}] load average {os.getloadavg()[0]:.1f} (2 cores shared with other jobs)")
        records += {"embed": bench_embed, "search": bench_search, "qdrant": bench_qdrant}[part](
            args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        save_records(args.json, records, append=True)
        print(f"records appended to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
