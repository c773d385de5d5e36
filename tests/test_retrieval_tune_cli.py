"""Auto-tuning, the CLI (index build / search / bench retrieval) and the demo section."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from mrl import Nesting
from mrl.cli import main
from mrl.retrieval import EmbeddingStore, MatryoshkaIndex, SearchConfig, exact_search
from mrl.retrieval.synthetic import mrl_like
from mrl.retrieval.tune import flops_per_query, margin_for, recall_at_k, tune

NEST = Nesting.doubling(8, 64)


@pytest.fixture(scope="module")
def data():
    db, labels = mrl_like(2000, 64, clusters=20, seed=0)
    q, qlabels = mrl_like(50, 64, clusters=20, seed=1)
    return db, labels, q, qlabels


def test_synthetic_prefix_is_informative(data):
    db, _, q, _ = data
    _, truth = exact_search(db, q, 10)
    r8 = recall_at_k(exact_search(db, q, 10, dims=8)[1], truth)
    r32 = recall_at_k(exact_search(db, q, 10, dims=32)[1], truth)
    assert 0 < r8 < r32 < 1


def test_tune_meets_target_and_is_stored(data):
    db = data[0]
    index = MatryoshkaIndex(NEST, SearchConfig(hnsw_m=16, ef_construction=40))
    index.add(db)
    res = tune(index, 0.95, k=10, n_queries=60, backends=("flat", "hnsw"))
    assert res.recall >= 0.95 and res.qps > 0 and res.flops_per_query > 0
    assert index.config == res.config and index.tuned["recall"] == res.recall
    assert all(c["recall"] <= 1 for c in res.candidates)
    # the chosen config reaches the target on fresh held-out rows too (loosely: other sample)
    rows = np.random.default_rng(5).choice(len(db), 60, replace=False)
    _, truth = exact_search(db, db[rows], 11)
    found = index.search(db[rows], 11).indices
    drop = [f[f != r][:10] for f, r in zip(found, rows)]
    want = [t[t != r][:10] for t, r in zip(truth, rows)]
    assert recall_at_k(np.array(drop), np.array(want)) >= 0.9


def test_tune_with_user_queries_and_bad_input(data):
    db, _, q, _ = data
    index = MatryoshkaIndex(NEST)
    index.add(db)
    res = tune(index, 0.9, k=5, queries=q, backends=("numpy",), try_funnel=False, apply=False)
    assert res.config.backend == "numpy" and index.tuned is None
    with pytest.raises(ValueError, match="target_recall must be in"):
        tune(index, 1.5)
    with pytest.raises(ValueError, match="k must be an int in"):
        tune(index, 0.9, k=5000)
    with pytest.raises(ValueError, match="not in the nesting"):
        tune(index, 0.9, shortlist_dims=(12,))


def test_cli_build_search(tmp_path, data, capsys):
    db, _, q, _ = data
    np.save(tmp_path / "db.npy", db)
    np.save(tmp_path / "q.npy", q)
    assert (
        main(
            [
                "index",
                "build",
                str(tmp_path / "db.npy"),
                "--out",
                str(tmp_path / "idx"),
                "--shortlist-dim",
                "16",
                "--shortlist",
                "100",
                "--funnel",
            ]
        )
        == 0
    )
    out = tmp_path / "res.json"
    assert (
        main(
            [
                "search",
                str(tmp_path / "idx"),
                str(tmp_path / "q.npy"),
                "--k",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert len(res["results"]) == len(q) and len(res["results"][0]["ids"]) == 5
    _, truth = exact_search(db, q, 5)
    assert recall_at_k(np.array([r["ids"] for r in res["results"]]), truth) > 0.8


def test_cli_build_from_store_with_tuning(tmp_path, data, capsys):
    db = data[0]
    EmbeddingStore.from_array(tmp_path / "store", db, NEST, ids=[f"d{i}" for i in range(len(db))])
    assert (
        main(
            [
                "index",
                "build",
                str(tmp_path / "store"),
                "--out",
                str(tmp_path / "idx"),
                "--target-recall",
                "0.9",
                "--tune-queries",
                "40",
                "--backend",
                "numpy",
            ]
        )
        == 0
    )
    assert "tuned:" in capsys.readouterr().out
    index = MatryoshkaIndex.load(tmp_path / "idx")
    assert index.tuned["recall"] >= 0.9 and index.ids[0] == "d0"


def test_cli_bad_input(tmp_path, data, capsys):
    db, _, q, _ = data
    np.save(tmp_path / "db.npy", db)
    assert (
        main(
            [
                "index",
                "build",
                str(tmp_path / "db.npy"),
                "--out",
                str(tmp_path / "i"),
                "--shortlist-dim",
                "12",
            ]
        )
        == 2
    )
    assert "--shortlist-dim must be a prefix size" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "i")]) == 2
    assert "not found" in capsys.readouterr().err
    main(["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "i")])
    np.save(tmp_path / "q.npy", q[:, :32])
    assert main(["search", str(tmp_path / "i"), str(tmp_path / "q.npy")]) == 2
    assert "queries must have shape [Q, 64]" in capsys.readouterr().err
    np.save(tmp_path / "q.npy", q)
    assert main(["search", str(tmp_path / "i"), str(tmp_path / "q.npy"), "--k", "5000"]) == 2
    assert "--k must be in [1, 2000] (the index's rows), got --k 5000" in (
        capsys.readouterr().err)  # the flag, not the library's k (named before the queries load)
    for argv, message in ((["--shortlist", "0"], "--shortlist must be >= 1, got --shortlist 0"),
                          (["--shortlist-dim", "12"], "--shortlist-dim must be a prefix size of "
                           "the index [8, 16, 32, 64], got --shortlist-dim 12")):
        assert main(["search", str(tmp_path / "i"), str(tmp_path / "q.npy"), *argv]) == 2
        assert message in capsys.readouterr().err


def test_cli_build_refuses_options_and_folders_up_front(tmp_path, data, capsys):
    np.save(tmp_path / "db.npy", data[0][:300])
    build = ["index", "build", str(tmp_path / "db.npy"), "--out"]
    store = tmp_path / "store"
    store.mkdir()
    (store / "store.json").write_text("{}")  # e.g. the embedding store itself
    cases = [
        ([str(store)], f"--out '{store}' is a non-empty folder without index.json"),
        ([str(tmp_path / "db.npy")], "is a file; give a folder path"),
        ([str(tmp_path / "db.npy" / "i")], "which is a file"),
        ([str(tmp_path / "i"), "--target-recall", "2"], "--target-recall must be in (0, 1]"),
        ([str(tmp_path / "i"), "--max-memory", "1G"], "--max-memory needs --target-recall"),
        ([str(tmp_path / "i"), "--nprobe", "4"], "--nprobe is for --backend ivf or ivfpq"),
        ([str(tmp_path / "i"), "--tune-queries", "7"], "--tune-queries is for --target-recall"),
        ([str(tmp_path / "i"), "--k", "3"], "--k sizes the tuning (--target-recall) or the last "
                                            "keep of --funnel; without either it is not used"),
    ]
    for extra, message in cases:
        assert main(build + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in store.iterdir()) == ["store.json"]  # untouched
    assert main(build + [str(tmp_path / "i")]) == 0
    assert main(build + [str(tmp_path / "i")]) == 0  # an index folder is replaced
    assert main(["search", str(tmp_path / "i"), str(tmp_path / "db.npy"), "--nprobe", "4"]) == 2
    assert "--nprobe is for the ivf/ivfpq backends; this search runs flat" in (
        capsys.readouterr().err)


def test_cli_bench_empty_query_file(tmp_path, data, capsys):
    np.save(tmp_path / "db.npy", data[0][:100])
    np.save(tmp_path / "q.npy", data[2][:0])
    assert main(["bench", "retrieval", "--embeddings", str(tmp_path / "db.npy"),
                 "--query-embeddings", str(tmp_path / "q.npy")]) == 2
    assert f"embeddings in {tmp_path / 'q.npy'} are empty (shape (0, 64))" in (
        capsys.readouterr().err)
    np.save(tmp_path / "ints.npy", np.arange(64 * 20).reshape(20, 64))
    assert main(["index", "build", str(tmp_path / "ints.npy"), "--out", str(tmp_path / "i")]) == 2
    assert "must be floating point, got dtype int64" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "q.npy"), "--out", str(tmp_path / "i")]) == 2
    assert "are empty" in capsys.readouterr().err
    EmbeddingStore.create(tmp_path / "store", NEST)
    assert main(["index", "build", str(tmp_path / "store"), "--out", str(tmp_path / "i")]) == 2
    assert "holds no rows" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()


def test_cli_bench_and_tuning_bad_options_name_themselves(tmp_path, data, capsys):
    x = data[0][:100].copy()
    x[57, 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    assert main(["bench", "retrieval", "--embeddings", str(tmp_path / "nan.npy"),
                 "--queries", "10"]) == 2
    assert "--embeddings: row 57 has NaN or inf" in capsys.readouterr().err  # the file's row
    from mrl.commands.bench import _check_finite

    with pytest.raises(ValueError, match="--embeddings: row 57 has NaN"):  # found across blocks
        _check_finite(x, "--embeddings", block=10)
    assert main(["bench", "retrieval", "--n", "50", "--dim", "7", "--queries", "5"]) == 2
    assert "dim must be >= 16" in capsys.readouterr().err
    np.save(tmp_path / "db.npy", data[0][:100])
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "i"),
                 "--target-recall", "0.9", "--tune-queries", "0"]) == 2
    assert "--tune-queries must be >= 1, got --tune-queries 0" in capsys.readouterr().err


def test_cli_bench_tiny(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert (
        main(
            [
                "bench",
                "retrieval",
                "--n",
                "3000",
                "--dim",
                "64",
                "--queries",
                "50",
                "--hnsw-n",
                "1500",
                "--target-recall",
                "0.9",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| part | N | method |" in text
    recs = json.loads(out.read_text())
    methods = {r["method"] for r in recs}
    assert {"exact", "funnel", "hnsw", "funnel-paper"} <= methods
    metrics = {r["metric"] for r in recs}
    assert {"qps", "recall@10", "speedup_vs_exact", "memory_bytes", "build_s"} <= metrics
    fun = [r for r in recs if r["method"] == "funnel" and r["metric"] == "recall@10"]
    assert all(r["value"] >= 0.8 for r in fun)


def test_demo_section(tmp_path, data):
    db, labels, q, qlabels = data
    ctx = SimpleNamespace(
        db_embeddings=db,
        db_labels=labels,
        query_embeddings=q,
        query_labels=qlabels,
        nesting=NEST,
        out_dir=tmp_path,
    )
    from mrl.retrieval.demo import demo_section

    md, recs = demo_section(ctx)
    assert "| funnel | 8 |" in md and "| exact | 64 |" in md
    exact_map = next(r["value"] for r in recs if r["method"] == "exact" and r["metric"] == "map@10")
    f32 = next(
        r["value"]
        for r in recs
        if r["method"] == "funnel" and r["prefix"] == 32 and r["metric"] == "map@10"
    )
    assert abs(f32 - exact_map) < 5  # percent
    assert (tmp_path / "retrieval.json").exists()


def test_demo_section_reads_the_demo_context_names(data):
    import torch

    db, labels, q, qlabels = data
    ctx = SimpleNamespace(
        train_embeddings=torch.from_numpy(db[:500]),
        train_labels=torch.from_numpy(labels[:500]),
        test_embeddings=torch.from_numpy(q),
        test_labels=torch.from_numpy(qlabels),
        nesting=NEST,
    )
    from mrl.retrieval.demo import demo_section

    md, recs = demo_section(ctx)
    assert "## Adaptive retrieval" in md and all(r["section"] == "retrieval" for r in recs)
    # the context the other sections' records carry (retrieval records had none)
    assert all(r["k"] == 10 and r["n_db"] == 500 and r["n_queries"] == len(q) for r in recs)
    # the top hit's label accuracy is 1-NN, as the first section names it (it sat in the demo's
    # top1 table beside the heads' classification accuracy)
    assert {r["metric"] for r in recs} == {"map@10", "1nn", "recall@10", "qps"}


def test_bench_on_unnormalised_embeddings_uses_cosine():
    from mrl.retrieval.bench import bench_retrieval

    db, _ = mrl_like(1200, 32, clusters=12, seed=0)
    q, _ = mrl_like(30, 32, clusters=12, seed=1)
    scale = np.random.default_rng(0).uniform(0.1, 10, (len(db), 1)).astype(np.float32)
    recs = bench_retrieval(
        data=(db * scale, q * 3), hnsw_n=0, target_recall=0.9, log=lambda s: None
    )
    fun = next(r for r in recs if r["method"] == "funnel" and r["metric"] == "recall@10")
    assert fun["value"] >= 0.85  # exact truth and funnel agree on cosine, whatever the norms


def test_tune_with_reference_counts_quantisation_error(data):
    db = data[0]
    index = MatryoshkaIndex(NEST, vector_dtype="int8")
    index.add(db)
    res = tune(index, 0.9, k=10, n_queries=40, backends=("numpy",), reference=db)
    rows = np.random.default_rng(0).choice(len(db), 40, replace=False)
    rows.sort()
    _, truth = exact_search(db, db[rows], 11)  # float32 truth, as tune used
    found = index.search(db[rows], 11).indices
    drop = np.array([f[f != r][:10] for f, r in zip(found, rows)])
    want = np.array([t[t != r][:10] for t, r in zip(truth, rows)])
    assert abs(recall_at_k(drop, want) - res.recall) < 1e-9
    with pytest.raises(ValueError, match="reference must have shape"):
        tune(index, 0.9, reference=db[:10])


def test_tune_ivf_sweeps_nprobe(data):
    db = data[0]
    index = MatryoshkaIndex(NEST, SearchConfig(nlist=40))
    index.add(db)
    log: list[str] = []
    res = tune(index, 0.95, k=10, n_queries=60, backends=("ivf",), max_ivf=2, log=log.append)
    assert res.config.backend == "ivf" and res.recall >= 0.95
    assert res.config.nprobe in (4, 8, 16, 32, 40)
    ivf = [c for c in res.candidates if c["config"]["backend"] == "ivf"]
    assert len({c["config"]["shortlist_dim"] for c in ivf}) <= 2  # max_ivf structures built
    assert any("nprobe=" in line for line in log)
    assert index.ivf_nlist() == 40 and not index._short  # the IVF holds its own prefix copy
    assert res.flops_per_query < 2 * len(db) * 64  # far below exact full-size search


def test_tune_ivfpq_rescored_funnel(data):
    """IVF-PQ candidates: shortlists 5-40x the exact scan's K, first stage exact at D_s."""
    db = data[0]
    index = MatryoshkaIndex(NEST, SearchConfig(nlist=40))
    index.add(db)
    res = tune(index, 0.95, k=10, n_queries=60, backends=("ivfpq",), max_ivf=1)
    assert res.config.backend == "ivfpq" and res.recall >= 0.95
    m, stages = res.config.shortlist_dim, res.config.stages
    assert stages[0][0] == m and stages[0][1] < res.config.shortlist and stages[-1][0] == 64
    pq = [c for c in res.candidates if c["config"]["backend"] == "ivfpq"]
    assert len({c["config"]["shortlist"] for c in pq}) >= 1
    ivf = replace(res.config, backend="ivf")  # the same search with float codes: m per row
    assert flops_per_query(len(db), res.config, 64, 10) < flops_per_query(len(db), ivf, 64, 10)


def test_cli_ivf_build_search(tmp_path, data, capsys):
    db, _, q, _ = data
    np.save(tmp_path / "db.npy", db)
    np.save(tmp_path / "q.npy", q)
    build = ["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "idx")]
    opts = ["--shortlist-dim", "16", "--shortlist", "100", "--backend", "ivf", "--nlist", "20"]
    assert main(build + opts + ["--nprobe", "20", "--vector-dtype", "float16"]) == 0
    out = tmp_path / "res.json"
    assert main(["search", str(tmp_path / "idx"), str(tmp_path / "q.npy"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["backend"] == "ivf" and res["config"]["nlist"] == 20
    _, truth = exact_search(db, q, 10)
    assert recall_at_k(np.array([r["ids"] for r in res["results"]]), truth) > 0.9
    assert main(["search", str(tmp_path / "idx"), str(tmp_path / "q.npy"), "--nprobe", "1"]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), str(tmp_path / "q.npy"), "--nprobe", "0"]) == 2
    assert "--nprobe must be >= 1, got --nprobe 0" in capsys.readouterr().err


def test_tune_memory_budget_picks_fastest_that_fits(data):
    """max_memory: only configurations within the budget are eligible; none fits -> clear error."""
    db = data[0]
    index = MatryoshkaIndex(NEST, SearchConfig(nlist=40), vector_dtype="float16")
    index.add(db)
    free = tune(index, 0.95, k=10, n_queries=60, backends=("flat", "ivf", "ivfpq"), apply=False)
    sizes = sorted(c["memory_bytes"] for c in free.candidates if c["recall"] >= 0.95)
    assert sizes[0] < sizes[-1]  # the budget below has a real choice to make
    budget = sizes[0]
    res = tune(
        index, 0.95, k=10, n_queries=60, backends=("flat", "ivf", "ivfpq"), max_memory=budget
    )
    assert index.memory_bytes(res.config) <= budget and res.recall >= 0.95
    chosen = [c for c in res.candidates if c["config"] == res.config.to_dict()]
    assert chosen[0]["memory_bytes"] == index.memory_bytes(res.config)  # what the budget saw
    with pytest.raises(ValueError, match=r"fits max_memory=1000 bytes \(the smallest") as info:
        tune(index, 0.95, k=10, n_queries=60, backends=("flat",), max_memory=1000)
    # The error carries the fastest configuration without the budget, from the same measurements.
    fallback = info.value.unbudgeted
    need = min(1.0, 0.95 + margin_for(0.95, 60, 10))
    assert fallback.qps == max(c["qps"] for c in fallback.candidates if c["recall"] >= need)
    assert fallback.recall >= 0.95 and index.memory_bytes(fallback.config) > 1000
    with pytest.raises(ValueError, match="max_memory must be a positive number of bytes"):
        tune(index, 0.95, max_memory=0)


def test_cli_index_max_memory(tmp_path, data, capsys):
    db = data[0]
    np.save(tmp_path / "db.npy", db)
    build = ["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "idx")]
    tuned = build + ["--target-recall", "0.9", "--tune-queries", "60", "--max-memory", "1K"]
    assert main(tuned) == 2
    assert "fits max_memory=1024 bytes" in capsys.readouterr().err
    for bad in ("lots", "inf", "1e400"):  # inf was an OverflowError traceback
        with pytest.raises(SystemExit):
            main(build + ["--target-recall", "0.9", "--max-memory", bad])
        assert "--max-memory must be a positive size" in capsys.readouterr().err
    ok = ["--target-recall", "0.9", "--tune-queries", "60", "--max-memory", "2M"]
    assert main(build + ok) == 0
    saved = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert saved["tuned"]["config"] == saved["config"]


def test_bench_hnsw_comparison_memory_budget():
    """The funnel beside HNSW is tuned within half of HNSW's memory; where that cannot be met
    (float32 rerank rows alone, 2 KB at D=512, exceed it) it says so and tunes without one."""
    from mrl.retrieval.bench import bench_retrieval

    db, _ = mrl_like(1000, 512, clusters=10, seed=0)
    q, _ = mrl_like(30, 512, clusters=10, seed=1)
    for dtype in ("float16", "float32"):
        log: list[str] = []
        recs = bench_retrieval(
            data=(db, q), hnsw_n=1000, target_recall=0.9, vector_dtype=dtype, log=log.append
        )
        mem = {
            r["method"]: r["value"]
            for r in recs
            if r["metric"] == "memory_bytes" and r["n"] == 1000 and r["method"] != "funnel-paper"
        }
        impossible = any("impossible here" in line for line in log)
        assert impossible == (dtype == "float32")
        if not impossible:
            assert mem["funnel"] <= mem["hnsw"] / 2


def test_drop_self_keeps_empty_slots_empty():
    from mrl.retrieval.tune import _drop_self

    # [Q, k+1] -> [Q, k]; query 0's probe found 3 rows (one of them twice), query 1's missed
    # itself, so its last row goes.
    found = np.array([[0, 3, 0, -1, -1], [7, 8, 9, 4, 2]])
    out = _drop_self(found, np.array([0, 1]), 4)
    assert out.tolist() == [[3, -1, -1, -1], [7, 8, 9, 4]]


def test_tune_small_database_with_short_ivf_lists(monkeypatch):
    # 300 rows: single probed cells hold fewer than k+1 rows (a regression: this crashed in
    # _drop_self when short lists were padded with row 0 and the query was row 0).
    import mrl.retrieval.tune as tune_module

    short_for_row_0 = []

    def spy(indices, rows, k):  # records whether query row 0 got a short (-1 padded) list
        if rows is not None and (rows == 0).any():
            short_for_row_0.append(bool((indices[rows == 0] < 0).any()))
        return _drop_self(indices, rows, k)

    _drop_self = tune_module._drop_self
    monkeypatch.setattr(tune_module, "_drop_self", spy)
    rng = np.random.default_rng(0)
    db = (rng.standard_normal((300, 64)) * np.arange(1, 65) ** -0.5).astype(np.float32)
    index = MatryoshkaIndex(NEST)
    index.add(db)
    res = tune(index, 0.95, k=10, n_queries=50)  # as `mrl index build --target-recall 0.95`
    assert any(short_for_row_0)  # the regression's situation was exercised
    assert res.recall >= 0.95 + margin_for(0.95, 50, 10)  # target + the safety margin
    assert all(0 <= c["recall"] <= 1 for c in res.candidates)
    # the reported recall, recomputed: the applied config vs exact search on the held-out rows
    rows = np.sort(np.random.default_rng(0).choice(len(db), 50, replace=False))
    _, truth = exact_search(db, db[rows], 11)
    found = index.search(db[rows], 11).indices
    drop = np.full((50, 10), -1)  # without the query's own row; -1: nothing found there
    for j, (f, r) in enumerate(zip(found, rows)):
        keep = f[(f != r) & (f >= 0)][:10]
        drop[j, : len(keep)] = keep
    want = np.array([t[t != r][:10] for t, r in zip(truth, rows)])
    assert abs(recall_at_k(drop, want) - res.recall) < 1e-9


def test_tune_single_size_nesting():
    # `mrl embed --model default` writes a one-size nesting [D]: D_s = D, no funnel stages.
    rng = np.random.default_rng(0)
    index = MatryoshkaIndex(Nesting((32,)))
    index.add(rng.standard_normal((400, 32)).astype(np.float32))
    res = tune(index, 0.95, k=5, n_queries=50)
    assert res.recall >= 0.95 and res.config.shortlist_dim == 32
    assert all(m == 32 for m, _ in res.config.stages)


def test_cli_sidecar_errors_name_the_sidecar(tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32)
    np.save(tmp_path / "e.npy", x)
    build = ["index", "build", str(tmp_path / "e.npy"), "--out", str(tmp_path / "i")]
    for text, message in [
        ("{bad", "e.json is not valid JSON"),
        ('{"nesting": {"sizes": [8, 16]}}', "e.json has a nesting ending at 16, but the "
                                            "embeddings have 32 dims"),
    ]:
        (tmp_path / "e.json").write_text(text)
        assert main(build) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "e.json").write_text('{"nesting": null, "model": "m"}')  # encode without one
    assert main(build) == 0


def test_bench_table_keeps_the_two_parts_apart_at_the_same_n():
    from mrl.records import make_record
    from mrl.retrieval.bench import format_table

    recs = []
    for part, qps in (("main", 100.0), ("hnsw", 80.0)):  # two exact timings at one N
        for method, speed in (("exact", 1.0), ("funnel", 5.0)):
            recs.append(make_record(method, 64, "qps", qps * speed, n=1000, part=part))
            recs.append(make_record(method, 64, "speedup_vs_exact", speed, n=1000, part=part))
    rows = [line for line in format_table(recs).splitlines()[2:]]
    assert len(rows) == 4
    assert "| main | 1000 | exact | 64 |  | 100.0 |" in rows[0]
    assert "| hnsw | 1000 | exact | 64 |  | 80.0 |" in rows[2]


def test_cli_int8_rerank_vectors(tmp_path, data, capsys):
    db, _, q, _ = data
    np.save(tmp_path / "db.npy", db)
    np.save(tmp_path / "q.npy", q)
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "i8"),
                 "--vector-dtype", "int8"]) == 0  # fmt: skip
    index = MatryoshkaIndex.load(tmp_path / "i8")
    assert index.vector_dtype == "int8"
    _, truth = exact_search(db, q, 10)
    assert recall_at_k(index.search(q, 10).indices, truth) > 0.9


def test_cli_search_out_records_the_widened_funnel(tmp_path, data):
    db, _, q, _ = data
    np.save(tmp_path / "db.npy", db[:500])
    np.save(tmp_path / "q.npy", q[:5])
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "i"),
                 "--shortlist-dim", "8", "--shortlist", "40", "--funnel", "--k", "10"]) == 0
    assert main(["search", str(tmp_path / "i"), str(tmp_path / "q.npy"), "--k", "30", "--out",
                 str(tmp_path / "r.json")]) == 0  # fmt: skip
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["config"]["shortlist"] == 40
    assert all(keep >= 30 for _, keep in out["config"]["stages"])
    assert all(len(r["ids"]) == 30 for r in out["results"])


def test_cli_tuning_quantised_index_measures_against_float32(tmp_path, data, monkeypatch):
    # int8/float16 rerank vectors: the recall the tuner reports must include the quantisation
    # error, i.e. the CLI hands the float32 originals to tune() as its reference (measured
    # before: int8 reported 0.996 where the truth was 0.979). float32 needs no reference.
    import mrl.retrieval.tune as tune_module

    db = data[0]
    np.save(tmp_path / "db.npy", db)
    seen = []

    def recording_tune(index, target, **kw):
        seen.append(kw.get("reference"))
        return tune(index, target, **kw)

    monkeypatch.setattr(tune_module, "tune", recording_tune)
    opts = ["--target-recall", "0.9", "--tune-queries", "40", "--backend", "numpy"]
    for dtype in ("int8", "float16", "float32"):
        out = str(tmp_path / dtype)
        assert main(["index", "build", str(tmp_path / "db.npy"), "--vector-dtype", dtype,
                     "--out", out] + opts) == 0
    assert seen[0] is not None and seen[0].dtype == np.float32
    np.testing.assert_array_equal(seen[0], db)
    np.testing.assert_array_equal(seen[1], db)
    assert seen[2] is None


@pytest.mark.parametrize("extra,message", [
    (["--shortlist", "300"], "--shortlist is chosen by the tuner with --target-recall"),
    (["--funnel"], "--funnel is chosen by the tuner"),
    (["--nprobe", "8", "--backend", "ivf"], "--nprobe is chosen by the tuner"),
])
def test_cli_tuning_refuses_options_it_would_ignore(tmp_path, data, capsys, extra, message):
    np.save(tmp_path / "db.npy", data[0][:300])
    build = ["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "i"),
             "--target-recall", "0.9"]
    assert main(build + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "i").exists()


def test_cli_tuning_keeps_to_a_named_backend(tmp_path, data):
    np.save(tmp_path / "db.npy", data[0])
    build = ["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "i"),
             "--target-recall", "0.9", "--tune-queries", "40", "--backend", "ivf"]
    assert main(build) == 0
    assert MatryoshkaIndex.load(tmp_path / "i").config.backend == "ivf"


def test_cli_search_out_never_overwrites_its_inputs(tmp_path, data, capsys):
    db, _, q, _ = data
    np.save(tmp_path / "db.npy", db[:300])
    np.save(tmp_path / "q.npy", q)
    (tmp_path / "q.json").write_text(json.dumps({"nesting": NEST.to_dict()}))
    EmbeddingStore.from_array(tmp_path / "qs", q, NEST)
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "i")]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [
        ("i", str(tmp_path / "i" / "index.json"), "would overwrite the index"),
        ("i", str(tmp_path / "q.npy"), "would overwrite the queries"),
        ("i", str(tmp_path / "q.json"), "would overwrite the sidecar of the queries"),
        ("qs", str(tmp_path / "qs" / "store.json"), "would overwrite the queries"),
    ]
    for queries_name, out, message in cases:
        queries = str(tmp_path / ("q.npy" if queries_name == "i" else "qs"))
        assert main(["search", str(tmp_path / "i"), queries, "--out", out]) == 2
        err = capsys.readouterr().err
        assert message in err and f"--out {out!r}" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert main(["search", str(tmp_path / "i"), str(tmp_path / "qs"), "--out",
                 str(tmp_path / "r.json")]) == 0
    # a new file beside the index's own is fine (nothing is overwritten; the index still loads)
    assert main(["search", str(tmp_path / "i"), str(tmp_path / "qs"), "--out",
                 str(tmp_path / "i" / "results.json")]) == 0
    assert MatryoshkaIndex.load(tmp_path / "i").count == 300


def test_index_build_says_which_nesting_it_used(tmp_path, capsys):
    """A .npy without a sidecar gets a default nesting: the build says so (a model prefix the
    default lacks surfaced only at search time)."""
    np.save(tmp_path / "db.npy", np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32))
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "i")]) == 0
    out = capsys.readouterr().out
    assert "nesting [8, 16, 32, 64] (a default: db.json does not name one" in out
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "j"),
                 "--nesting", "4,16,64", "--shortlist-dim", "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "nesting [4, 16, 64]," in out and "a default" not in out


def test_index_build_says_a_null_sidecar_nesting_is_a_default(tmp_path, capsys):
    np.save(tmp_path / "db.npy", np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32))
    (tmp_path / "db.json").write_text(json.dumps({"shape": [50, 64], "nesting": None}))
    assert main(["index", "build", str(tmp_path / "db.npy"), "--out", str(tmp_path / "i")]) == 0
    assert "(a default: db.json does not name one" in capsys.readouterr().out


def test_tuning_k_against_a_small_database_names_the_option(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32))
    out = tmp_path / "i"
    assert main(["index", "build", str(tmp_path / "x.npy"), "--out", str(out),
                 "--nesting", "8,16", "--target-recall", "0.9"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--k 10 (recall@k of the tuning; default 10) must be in [1, 3)" in err, err
    assert "x.npy' has 3 rows" in err and not out.exists()


def test_more_tuning_queries_than_rows_is_said(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(60, 16)).astype(np.float32))
    assert main(["index", "build", str(tmp_path / "x.npy"), "--out", str(tmp_path / "i"),
                 "--nesting", "8,16", "--target-recall", "0.5", "--backend", "flat",
                 "--tune-queries", "1000"]) == 0  # fmt: skip
    assert "--tune-queries 1000 is more than the 60 rows; tuning with all 60" in (
        capsys.readouterr().err)  # fmt: skip


def test_bench_times_the_budget_fallback_config_it_reports(monkeypatch):
    """With no configuration in the memory budget, tune raised before setting its choice on
    the index: the bench timed the index's default (flat, D_s=16, K=200) under the fallback's
    name, memory and build time."""
    from mrl.retrieval import bench

    db, _ = mrl_like(3000, 64, clusters=30, seed=0)
    q, _ = mrl_like(120, 64, clusters=30, seed=1)  # a count the tuning searches do not use
    tq, _ = mrl_like(100, 64, clusters=30, seed=2)
    truth = exact_search(db, q, k=10)[1]
    searched = []
    real = MatryoshkaIndex.search

    def spy(self, queries, k=10, **kw):
        res = real(self, queries, k, **kw)
        searched.append((len(queries), res.config))
        return res

    monkeypatch.setattr(MatryoshkaIndex, "search", spy)
    f = bench._funnel(db, q, truth, Nesting.doubling(8, 64), 10, 0.95, lambda s: None,
                      backends=("flat", "ivf"), vector_dtype="float32", tune_queries=tq,
                      max_memory=1, budget_fallback=True)  # fmt: skip
    assert f["budget_error"] is not None  # the fallback path
    timed = [c for n, c in searched if n == len(q)][0]  # the funnel's timed test search
    assert timed == f["config"]


def test_tune_times_a_config_warm_and_keeps_its_fastest_run(data, monkeypatch):
    """One cold timing per config: a first search after a build, or one noisy run, decided
    the choice (the same index tuned 4 times chose 3 different configs)."""
    import time

    from mrl.retrieval import tune as tune_mod

    db, q = data[0], data[2]  # [2000, 64], [50, 64]
    index = MatryoshkaIndex(Nesting.doubling(8, db.shape[1]))
    index.add(db)
    calls = []
    real = MatryoshkaIndex.search

    def slow_first_and_third(self, queries, k=10, **kw):
        calls.append(len(queries))
        if len(calls) in (1, 3):  # the warm-up, and one of the timed runs
            time.sleep(0.3)
        return real(self, queries, k, **kw)

    monkeypatch.setattr(MatryoshkaIndex, "search", slow_first_and_third)
    truth = exact_search(db, q, k=10)[1]
    out = tune_mod._measure(index, SearchConfig(shortlist_dim=16, shortlist=50), q, None,
                            truth, 10, lambda s: None)  # fmt: skip
    assert calls[0] < len(q) and calls[1:] == [len(q)] * 3  # warm-up, then three timed runs
    assert out["qps"] > len(q) / 0.3  # neither slow call counted


def test_cli_bench_takes_a_stores_nesting_and_refuses_mixed_centres(tmp_path, data, capsys,
                                                                    monkeypatch):
    """`--embeddings STORE` was read with nesting 'full' and benchmarked at 8, 16, 32, ... (not
    the model's prefixes); a centred store's rows were searched with raw .npy queries."""
    import mrl.retrieval.bench as rb

    seen = {}

    def fake_bench(*args, nesting=None, data=None, **kw):
        seen["nesting"] = nesting
        return []

    monkeypatch.setattr(rb, "bench_retrieval", fake_bench)
    db, q = data[0], data[2]
    EmbeddingStore.from_array(tmp_path / "s", db, Nesting((16, 64)))
    np.save(tmp_path / "q.npy", q)
    assert main(["bench", "retrieval", "--embeddings", str(tmp_path / "s"),
                 "--query-embeddings", str(tmp_path / "q.npy")]) == 0
    assert seen["nesting"].sizes == (16, 64)
    capsys.readouterr()
    EmbeddingStore.from_array(tmp_path / "c", db, Nesting((16, 64)), center=db.mean(0))
    assert main(["bench", "retrieval", "--embeddings", str(tmp_path / "c"),
                 "--query-embeddings", str(tmp_path / "q.npy")]) == 2
    assert "are not centred alike" in capsys.readouterr().err
    assert main(["bench", "retrieval", "--embeddings", str(tmp_path / "c"),
                 "--queries", "20"]) == 0  # held-out rows of the store: one space


def test_bench_on_a_nesting_without_16(tmp_path, data, capsys):
    """The index was built with the default shortlist_dim 16: a store of prefixes 8, 32, 64
    failed ("shortlist_dim must be a prefix size") after the exact search had run."""
    EmbeddingStore.from_array(tmp_path / "s", data[0], Nesting((8, 32, 64)))
    assert main(["bench", "retrieval", "--embeddings", str(tmp_path / "s"), "--queries", "30",
                 "--hnsw-n", "0", "--target-recall", "0.8"]) == 0  # fmt: skip
    assert "| main | 1970 | funnel-paper | 8 |" in capsys.readouterr().out


def test_tune_measures_a_large_flat_shortlist_when_there_is_no_funnel():
    """Nesting (8, 32): a shortlist over 400 was measured only as a funnel, and with D_s just
    below D there is none, so "no configuration could be tried" although flat was allowed."""
    rng = np.random.default_rng(0)
    index = MatryoshkaIndex(Nesting((8, 32)), threads=1)
    index.add(rng.standard_normal((2000, 32)).astype(np.float32))  # no leading-dims structure
    res = tune(index, 0.95, k=10, n_queries=50, backends=("flat",), apply=False)
    assert res.config.backend == "flat" and res.config.shortlist > 400, res.config
    assert res.recall >= 0.95
