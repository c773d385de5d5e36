"""Bad options of `mrl export`, `mrl serve` and `mrl bench` are one error naming the option and
its value, given before any work, and leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mrl import Nesting
from mrl.cli import build_parser, main
from mrl.retrieval import EmbeddingStore

NEST = Nesting((8, 16, 32))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A 50-row embedding store: enough for an export to start."""
    path = tmp_path_factory.mktemp("store") / "store"
    x = np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32)
    EmbeddingStore.from_array(path, x, NEST)
    return path


def export(store: Path, out: Path, *options: str) -> list[str]:
    return ["export", "qdrant", str(store), "--collection", "c", "--path", str(out), "--quiet",
            *options]


# ----------------------------------------------------------------------------- mrl export
@pytest.mark.parametrize("option, value, low", [
    ("--retries", "-1", 0),
    ("--batch-size", "0", 1),
    ("--commit-every", "0", 1),
])
def test_export_numbers_checked_before_anything(tmp_path, store, capsys, option, value, low):
    out = tmp_path / "qd"
    assert main(export(store, out, option, value)) == 2
    assert f"mrl export: error: {option} must be >= {low}, got {option} {value}" in (
        capsys.readouterr().err)
    assert not out.exists()  # --retries -1 left out/c/{layout.json,shard/} behind


@pytest.mark.parametrize("option", ["--shards", "--replication"])
def test_export_cluster_numbers_checked(tmp_path, store, capsys, option):
    progress = tmp_path / "p.json"
    code = main(["export", "qdrant", str(store), "--collection", "c", "--url", ":memory:",
                 "--progress", str(progress), "--quiet", option, "0"])
    assert code == 2
    assert f"{option} must be >= 1, got {option} 0" in capsys.readouterr().err
    assert not progress.exists()


def test_export_cluster_options_refused_with_path(tmp_path, store, capsys):
    out = tmp_path / "qd"
    assert main(export(store, out, "--shards", "2")) == 2
    assert "--shards and --replication apply to a cluster (--url), not to --path" in (
        capsys.readouterr().err)
    assert not out.exists()


def test_export_progress_folder_refused(tmp_path, store, capsys):
    out, folder = tmp_path / "qe", tmp_path / "somefolder"
    folder.mkdir()
    assert main(export(store, out, "--progress", str(folder))) == 2
    assert f"--progress {str(folder)!r} is a folder; give a file path" in capsys.readouterr().err
    assert not out.exists()  # was: out/c/layout.json and a shard, then [Errno 21]


@pytest.mark.parametrize("text, reason", [
    ("hello\n", "(Expecting value: line 1 column 1 (char 0))"),
    ("[1, 2]", "(not an mrl-qdrant-export v1 marker)"),
    ('{"format": "mrl-qdrant-export", "version": 1, "done": -3}',
     "(not an mrl-qdrant-export v1 marker)"),
])
def test_export_progress_file_that_is_not_a_marker(tmp_path, store, capsys, text, reason):
    out, progress = tmp_path / "qe", tmp_path / "some.txt"
    progress.write_text(text)
    assert main(export(store, out, "--progress", str(progress))) == 2
    err = capsys.readouterr().err
    assert f"--progress {str(progress)!r} is not a progress file {reason}" in err
    assert not out.exists()
    assert progress.read_text() == text  # left as it was


class _NoTarget:
    """A target that fails the test when the export gets as far as touching it."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the export reached target.{name}")


def test_export_qdrant_checks_retries_and_progress_first(tmp_path, store):
    from mrl.qdrant import QdrantLayout, export_qdrant, open_rows

    rows, layout = open_rows(store), QdrantLayout((16, 32))
    with pytest.raises(ValueError, match=r"retries must be >= 0, got retries=-1"):
        export_qdrant(rows, _NoTarget(), layout, tmp_path / "p.json", retries=-1)
    with pytest.raises(FileExistsError, match="progress_path .* is a folder"):
        export_qdrant(rows, _NoTarget(), layout, tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="progress_path .* is not a progress file"):
        export_qdrant(rows, _NoTarget(), layout, tmp_path / "bad.json")


def test_check_progress_file_accepts_a_marker(tmp_path):
    from mrl.qdrant import check_progress_file

    assert check_progress_file(tmp_path / "none.json", "--progress") is None
    marker = {"format": "mrl-qdrant-export", "version": 1, "fingerprint": {}, "done": 7}
    (tmp_path / "m.json").write_text(json.dumps(marker))
    assert check_progress_file(tmp_path / "m.json", "--progress") == marker


# ----------------------------------------------------------------------------- mrl serve
def test_serve_unknown_log_level_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:  # was: uvicorn's KeyError traceback
        main(["serve", "--model", "none", "--log-level", "banana"])
    assert exc.value.code == 2
    assert "--log-level: invalid choice: 'banana'" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--log-level", "DEBUG"]).log_level == "debug"


@pytest.mark.parametrize("option, value, low", [
    ("--max-batch-size", "0", 1),
    ("--max-inputs", "0", 1),
    ("--max-request-bytes", "-5", 1),
    ("--max-wait-ms", "-1.0", "finite and "),
    ("--max-wait-ms", "inf", "finite and "),
])
def test_serve_limits_name_the_option(capsys, option, value, low):
    assert main(["serve", "--model", "none", "--port", "0", option, value]) == 2
    expected = f"{low}>= 0" if isinstance(low, str) else f">= {low}"
    assert f"mrl serve: error: {option} must be {expected}, got {option} {value}" in (
        capsys.readouterr().err)


# ----------------------------------------------------------------------------- mrl bench
@pytest.fixture
def no_benchmark(monkeypatch):
    """The benchmark itself must not start (it takes minutes with the default options)."""

    def ran(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr("mrl.retrieval.bench.bench_retrieval", ran)


def test_bench_query_embeddings_need_embeddings(tmp_path, capsys, no_benchmark):
    np.save(tmp_path / "q.npy", np.ones((3, 32), np.float32))
    # was: the synthetic benchmark ran, the queries silently ignored
    assert main(["bench", "retrieval", "--query-embeddings", str(tmp_path / "q.npy")]) == 2
    assert "--query-embeddings needs --embeddings" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--max-hnsw", "-1"], "--max-hnsw must be >= 0, got --max-hnsw -1"),
    (["--max-ivf", "-1"], "--max-ivf must be >= 0, got --max-ivf -1"),
    (["--ef-construction", "0"], "--ef-construction must be >= 1, got --ef-construction 0"),
    (["--queries", "0"], "--queries must be >= 1, got --queries 0"),
    (["--k", "0"], "--k must be >= 1, got --k 0"),
    (["--seed", "-1"], "--seed must be >= 0, got --seed -1"),
    (["--hnsw-n", "-1"], "--hnsw-n must be >= 0, got --hnsw-n -1"),
    (["--hnsw-n", "10"], "--hnsw-n must be 0 (skip) or >= 16 with --k 10, got --hnsw-n 10"),
    (["--n", "12"], "--n must be >= 16 with --k 10"),
    (["--n", "100", "--k", "100"], "--n must be >= 101 with --k 100"),
])
def test_bench_numbers_name_the_option(capsys, no_benchmark, options, message):
    assert main(["bench", "retrieval", *options]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("rows, options, message", [
    (3, [], "has 3 rows; the benchmark needs at least 1016: --queries 1000 held out as "
            "queries plus a database of at least 16 rows (more than --k 10, and at least 16)"),
    (20, ["--queries", "5", "--k", "2"], "has 20 rows; the benchmark needs at least 21"),
    (20, ["--queries", "2", "--k", "20"], "has 20 rows; the benchmark needs at least 23"),
])
def test_bench_too_few_rows_says_how_many(tmp_path, capsys, no_benchmark, rows, options,
                                          message):
    path = tmp_path / "small.npy"
    np.save(path, np.random.default_rng(0).standard_normal((rows, 32)).astype(np.float32))
    # was: "k must be < n (0), got k=10", or an IVF-PQ error after the exact search had run
    assert main(["bench", "retrieval", "--embeddings", str(path), *options]) == 2
    assert f"--embeddings {str(path)!r} {message}" in capsys.readouterr().err


def test_bench_too_few_rows_with_query_file(tmp_path, capsys, no_benchmark):
    np.save(tmp_path / "db.npy", np.ones((12, 32), np.float32))
    np.save(tmp_path / "q.npy", np.ones((3, 32), np.float32))
    assert main(["bench", "retrieval", "--embeddings", str(tmp_path / "db.npy"),
                 "--query-embeddings", str(tmp_path / "q.npy"), "--k", "5"]) == 2
    assert "has 12 rows; the benchmark needs at least 16: a database of at least 16 rows" in (
        capsys.readouterr().err)


def test_bench_retrieval_checks_its_arguments():
    from mrl.retrieval.bench import bench_retrieval

    quiet = {"log": lambda s: None}
    with pytest.raises(ValueError, match="max_hnsw must be >= 0, got max_hnsw=-1"):
        bench_retrieval(20, 16, 2, max_hnsw=-1, hnsw_n=0, **quiet)
    with pytest.raises(ValueError, match=r"hnsw_n must be 0 \(skip\) or >= 16"):
        bench_retrieval(20, 16, 2, k=1, hnsw_n=5, **quiet)
    with pytest.raises(ValueError, match="the database needs at least 16 rows"):
        bench_retrieval(12, 16, 2, k=1, hnsw_n=0, **quiet)


# ----------------------------------------------------------------------------- mrl embed / text
@pytest.mark.parametrize("option", ["--shard-size", "--batch-size"])
def test_embed_sizes_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, option):
    import mrl.serve.encoders as encoders

    def no_load(*args, **kw):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(encoders, "load_encoder", no_load)
    corpus = tmp_path / "c.txt"
    corpus.write_text("one\ntwo\n")
    args = ["embed", "--input", str(corpus), "--out", str(tmp_path / "s"), option, "0"]
    assert main(args) == 2
    assert f"{option} must be >= 1, got {option} 0" in capsys.readouterr().err


def test_text_encode_batch_size_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import mrl.text.encoders as encoders

    def no_load(*args, **kw):
        raise AssertionError("the model was loaded before --batch-size was checked")

    monkeypatch.setattr(encoders, "load_encoder", no_load)
    args = ["text", "encode", "--corpus", "cranfield", "--out", str(tmp_path / "e.npy"),
            "--batch-size", "0"]
    assert main(args) == 2
    assert "--batch-size must be >= 1, got --batch-size 0" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--n", "7"], "--n sizes the synthetic data; with --embeddings the file gives it"),
    (["--dim", "4096"], "--dim sizes the synthetic data; with --embeddings the file gives it"),
    (["--query-embeddings", "Q", "--queries", "2"],
     "--queries sets how many queries are drawn; --query-embeddings gives them"),
])
def test_bench_sizes_the_files_give_are_refused(tmp_path, capsys, no_benchmark, options,
                                                message):
    """--n 7 --dim 4096 --queries 2 with your own embeddings ran on the files' 120 x 32 and 5
    queries, and the records said so, but nothing else did."""
    np.save(tmp_path / "db.npy", np.ones((120, 32), np.float32))
    np.save(tmp_path / "q.npy", np.ones((5, 32), np.float32))
    options = [str(tmp_path / "q.npy") if o == "Q" else o for o in options]
    assert main(["bench", "retrieval", "--embeddings", str(tmp_path / "db.npy"), *options]) == 2
    assert message in capsys.readouterr().err
