"""`mrl embed`: shards, resume after interruption, several processes, merge into one store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mrl import Nesting
from mrl.cli import main
from mrl.embed import embed_corpus, merge_shards, read_corpus, shard_plan
from mrl.retrieval import EmbeddingStore
from mrl.serve.encoders import HashEncoder

DIM = 16
N = 53


def write_corpus(path: Path, n: int = N, jsonl: bool = True) -> list[str]:
    texts = [f"document number {i} about topic {i % 7}" for i in range(n)]
    if jsonl:
        path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n"
                                for i, t in enumerate(texts)))
    else:
        path.write_text("\n".join(texts) + "\n")
    return texts


def reference(texts: list[str]) -> np.ndarray:
    """All texts encoded in one call, each row normalised: what the store must hold."""
    x = HashEncoder(DIM).encode(texts).astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class FailingEncoder(HashEncoder):
    """Raises on encode call number ``fail_at`` (an interruption mid-run)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(DIM, name="hash:16")
        self.fail_at = fail_at

    def encode(self, texts):
        if self.calls + 1 == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        return super().encode(texts)


def test_read_corpus_txt_and_jsonl(tmp_path):
    f = tmp_path / "c.txt"
    texts = write_corpus(f, 5, jsonl=False)
    assert list(read_corpus(f)) == list(enumerate(texts))
    g = tmp_path / "c.jsonl"
    g.write_text('{"text": "a"}\n{"id": 7, "text": "b"}\n{"id": "x", "body": "c", "text": "d"}\n')
    assert list(read_corpus(g)) == [(0, "a"), (7, "b"), ("x", "d")]
    h = tmp_path / "d.jsonl"
    h.write_text('{"key": "k1", "body": "first"}\n{"key": "k2", "body": "second"}')  # no final \n
    assert list(read_corpus(h, field="body", id_field="key")) == [("k1", "first"), ("k2", "second")]


def test_rows_end_at_newline_only(tmp_path):
    # A bare \r inside a row (old Mac line ends, pasted text) is part of the row, and CRLF files
    # read like LF ones: the rows read must be the rows `embed` counted, or shards mis-align.
    f = tmp_path / "c.txt"
    f.write_bytes(b"one\rstill one\r\ntwo\r\nthree")
    assert list(read_corpus(f)) == [(0, "one\rstill one"), (1, "two"), (2, "three")]
    report = embed_corpus(HashEncoder(DIM), f, tmp_path / "store", shard_size=1, batch_size=2,
                          show_progress=False)
    assert report.rows == 3 and EmbeddingStore.open(tmp_path / "store").count == 3


@pytest.mark.parametrize("content,name,fragment", [
    ('{"text": "a"}\n{"text": \n', "c.jsonl", "c.jsonl line 2: not valid JSON"),
    ('{"text": "a"}\n{"title": "b"}\n', "c.jsonl",
     "line 2: no field 'text' (keys: 'title'); pick the text field with --field"),
    ('{"text": "a"}\n{"text": 3}\n', "c.jsonl", "line 2: field 'text' must be a string"),
    ('{"text": "a"}\n[1, 2]\n', "c.jsonl", "line 2: expected a JSON object"),
    ('{"text": "a"}\n{"text": "  "}\n', "c.jsonl", "line 2: empty text"),
    ('{"text": "a", "id": 1.5}\n', "c.jsonl", "line 1: 'id' must be an int or a string"),
    ("one\n\nthree\n", "c.txt", "c.txt line 2: blank line; every line is one text: remove it"),
    ("one\n \n", "c.txt", "c.txt line 2: blank line"),  # an editor's trailing line
    ('{"text": "a"}\n\n', "c.jsonl", "c.jsonl line 2: blank line"),  # was "not valid JSON"
    ("x\n", "c.csv", "must be a .txt or .jsonl file"),
])
def test_read_corpus_bad_lines(tmp_path, content, name, fragment):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        list(read_corpus(f))


def test_shard_plan():
    assert shard_plan(53, 10) == [0, 1, 2, 3, 4, 5]
    assert shard_plan(53, 10, rank=1, world_size=2) == [1, 3, 5]
    assert shard_plan(0, 10) == []
    with pytest.raises(ValueError, match="shard_size must be >= 1, got shard_size=0"):
        shard_plan(5, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got rank=2"):
        shard_plan(5, 1, rank=2, world_size=2)


def test_embed_writes_one_normalised_store(tmp_path):
    texts = write_corpus(tmp_path / "c.jsonl")
    report = embed_corpus(HashEncoder(DIM), tmp_path / "c.jsonl", tmp_path / "store",
                          shard_size=10, batch_size=4, show_progress=False)
    assert (report.rows, report.shards, report.merged) == (N, 6, True)
    store = EmbeddingStore.open(tmp_path / "store")
    assert store.count == N and store.nesting.sizes == (8, 16)
    assert store.ids.tolist() == [f"doc-{i}" for i in range(N)]
    np.testing.assert_allclose(store.read(), reference(texts), rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "store.parts").exists()  # parts removed after the merge


def test_interrupted_run_resumes_and_skips_finished_shards(tmp_path):
    texts = write_corpus(tmp_path / "c.txt", jsonl=False)
    with pytest.raises(KeyboardInterrupt):  # dies while encoding the third shard
        embed_corpus(FailingEncoder(fail_at=3), tmp_path / "c.txt", tmp_path / "store",
                     shard_size=10, batch_size=10, show_progress=False)
    done = sorted(p.name for p in (tmp_path / "store.parts").glob("shard-*.json"))
    assert done == ["shard-00000.json", "shard-00001.json"]
    again = HashEncoder(DIM, name="hash:16")
    report = embed_corpus(again, tmp_path / "c.txt", tmp_path / "store", shard_size=10,
                          batch_size=10, show_progress=False)
    assert report.skipped == [0, 1] and report.encoded == [2, 3, 4, 5]
    assert again.calls == 4  # only the unfinished shards were encoded
    store = EmbeddingStore.open(tmp_path / "store")
    assert store.ids.tolist() == list(range(N))
    np.testing.assert_allclose(store.read(), reference(texts), rtol=1e-5, atol=1e-6)


def test_interrupted_merge_resumes(tmp_path, monkeypatch):
    texts = write_corpus(tmp_path / "c.jsonl")
    embed_corpus(HashEncoder(DIM), tmp_path / "c.jsonl", tmp_path / "store", shard_size=10,
                 merge=False, show_progress=False)
    real_load = np.load

    def flaky_load(path, *a, **kw):
        if Path(path).name == "shard-00002.npy":  # vectors of the third shard
            raise OSError("disk hiccup")
        return real_load(path, *a, **kw)

    monkeypatch.setattr(np, "load", flaky_load)
    with pytest.raises(OSError, match="disk hiccup"):
        merge_shards(tmp_path / "store")
    monkeypatch.setattr(np, "load", real_load)
    assert EmbeddingStore.open(tmp_path / "store").count == 20  # two shards merged
    store = merge_shards(tmp_path / "store")
    assert store.count == N and len(set(store.ids.tolist())) == N
    np.testing.assert_allclose(store.read(), reference(texts), rtol=1e-5, atol=1e-6)


def test_parts_of_another_run_are_refused(tmp_path):
    write_corpus(tmp_path / "c.jsonl")
    embed_corpus(HashEncoder(DIM), tmp_path / "c.jsonl", tmp_path / "s", shard_size=10,
                 merge=False, show_progress=False)
    with pytest.raises(ValueError, match=r"another run \(differs in \['shard_size'\]"):
        embed_corpus(HashEncoder(DIM), tmp_path / "c.jsonl", tmp_path / "s", shard_size=20,
                      show_progress=False)


def test_empty_or_missing_input(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="is empty: nothing to embed"):
        embed_corpus(HashEncoder(DIM), tmp_path / "e.txt", tmp_path / "s", show_progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed_corpus(HashEncoder(DIM), tmp_path / "nope.txt", tmp_path / "s", show_progress=False)


def test_rank0_gives_up_waiting_for_missing_shards(tmp_path):
    write_corpus(tmp_path / "c.jsonl")
    with pytest.raises(TimeoutError, match=r"shards \[1, 3, 5\] are still missing"):
        embed_corpus(HashEncoder(DIM), tmp_path / "c.jsonl", tmp_path / "s", shard_size=10,
                     rank=0, world_size=2, wait_timeout_s=0.3, show_progress=False)


def test_existing_store_is_not_overwritten(tmp_path):
    write_corpus(tmp_path / "c.jsonl")
    embed_corpus(HashEncoder(DIM), tmp_path / "c.jsonl", tmp_path / "s", show_progress=False)
    with pytest.raises(FileExistsError, match="a store already exists"):
        embed_corpus(HashEncoder(DIM), tmp_path / "c.jsonl", tmp_path / "s", show_progress=False)


def test_a_folder_that_is_not_a_store_is_never_written_into(tmp_path, capsys):
    write_corpus(tmp_path / "c.jsonl")
    other = tmp_path / "model"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code = main(["embed", "--model", "hash:16", "--input", str(tmp_path / "c.jsonl"), "--out",
                 str(other), "--quiet"])
    assert code == 2
    assert f"--out '{other}' is a non-empty folder that is not an embedding store" in (
        capsys.readouterr().err)
    with pytest.raises(FileExistsError, match="not an embedding store"):
        embed_corpus(HashEncoder(DIM), tmp_path / "c.jsonl", other, show_progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "model.parts").exists()


def test_cli_embed_and_bad_input(tmp_path, capsys):
    write_corpus(tmp_path / "c.jsonl")
    code = main(["embed", "--model", "hash:16", "--input", str(tmp_path / "c.jsonl"), "--out",
                 str(tmp_path / "s"), "--shard-size", "20", "--quiet"])
    assert code == 0 and "53 texts in 3 shards: encoded 3" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    code = main(["embed", "--model", "hash:16", "--input", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "t"), "--quiet"])
    assert code == 2
    assert "bad.jsonl line 2: field 'text' must be a string" in capsys.readouterr().err


def test_two_processes_split_shards_and_merge(tmp_path):
    """Two ranks (RANK/WORLD_SIZE, as torchrun sets them) produce the single-process store."""
    texts = write_corpus(tmp_path / "c.jsonl")
    cmd = [sys.executable, "-m", "mrl.cli", "embed", "--model", "hash:16", "--input",
           str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "s"), "--shard-size", "10",
           "--quiet"]
    procs = [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "encoded 3" in outs[0][0] and "merged" in outs[0][0]
    assert "encoded 3" in outs[1][0] and "merged" not in outs[1][0]
    store = EmbeddingStore.open(tmp_path / "s")
    assert store.ids.tolist() == [f"doc-{i}" for i in range(N)]
    np.testing.assert_allclose(store.read(), reference(texts), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    """The real launcher: `torchrun --nproc-per-node 2 -m mrl.cli embed ...`."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    texts = write_corpus(tmp_path / "c.jsonl")
    out = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "mrl.cli", "embed",
                          "--model", "hash:16", "--input", str(tmp_path / "c.jsonl"), "--out",
                          str(tmp_path / "s"), "--shard-size", "10", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    store = EmbeddingStore.open(tmp_path / "s")
    np.testing.assert_allclose(store.read(), reference(texts), rtol=1e-5, atol=1e-6)


def test_embedding_needs_no_http_stack():
    """`mrl embed` imports neither fastapi nor uvicorn (the serve extra is optional for it)."""
    code = ("import sys, mrl.embed, mrl.serve, mrl.commands.embed\n"
            "from mrl.serve import load_encoder\n"
            "load_encoder('hash:8')\n"
            "bad = [m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_misspelt_id_field_is_an_error(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"key": "a", "text": "x"}\n{"key": "b", "text": "y"}\n')
    with pytest.raises(ValueError, match="no line has the id field 'kye'"):
        embed_corpus(HashEncoder(DIM), tmp_path / "c.jsonl", tmp_path / "s", id_field="kye",
                     show_progress=False)
    report = embed_corpus(HashEncoder(DIM), tmp_path / "c.jsonl", tmp_path / "s",
                          id_field="key", show_progress=False)
    assert report.rows == 2 and EmbeddingStore.open(tmp_path / "s").ids.tolist() == ["a", "b"]


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "text": "x"}', '{"id": "b", "text": "y"}', '{"id": "a", "text": "z"}'],
     "c.jsonl line 3: id 'a' is also on line 1; ids must be unique"),
    (['{"id": 1, "text": "x"}', '{"id": "b", "text": "y"}'],
     "c.jsonl line 2: id 'b' is a str, but earlier ids are ints"),
    (['{"text": "x"}', '{"id": 0, "text": "y"}'],  # row-number ids and given ids would clash
     "c.jsonl line 2 has an 'id' field but line 1 has none"),
    (['{"id": "a", "text": "x"}', '{"text": "y"}'],
     "c.jsonl line 2 has no 'id' field but line 1 has one"),
    (['{"id": "a", "text": "x"}', '{"id": null, "text": "y"}'],
     "c.jsonl line 2: 'id' is null"),
    # numpy keeps ids >= 2**63 as uint64, which the store wrapped to negative ids
    (['{"id": 1, "text": "x"}', '{"id": 9223372036854775813, "text": "y"}'],
     "c.jsonl line 2: id 9223372036854775813 does not fit in int64"),
    # numpy's str dtype strips a trailing NUL: 'a' and 'a\\u0000' became twins at the merge
    (['{"id": "a", "text": "x"}', '{"id": "a\\u0000", "text": "y"}'],
     "c.jsonl line 2: id 'a\\\\x00' ends with a NUL character"),
])
def test_bad_ids_fail_before_any_encoding(tmp_path, lines, message):
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    enc = HashEncoder(DIM)
    with pytest.raises(ValueError, match=message):
        embed_corpus(enc, tmp_path / "c.jsonl", tmp_path / "s", show_progress=False)
    assert enc.calls == 0 and not (tmp_path / "s").exists()  # nothing left to block a rerun
    assert not list(tmp_path.glob("s.parts*"))


def test_cli_checks_the_input_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """A missing file or a duplicate id is one line before any model is loaded."""
    import mrl.serve.encoders as encoders
    from mrl.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load before the input is checked")

    monkeypatch.setattr(encoders, "load_encoder", no_model)
    out = str(tmp_path / "s")
    assert main(["embed", "--model", "default", "--input", str(tmp_path / "nope.jsonl"),
                 "--out", out]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    assert main(["embed", "--model", "default", "--input", str(dup), "--out", out]) == 2
    assert "id 'a' is also on line 1" in capsys.readouterr().err


def test_joined_fields_match_the_text_side_documents(tmp_path):
    """--field title+text embeds a BEIR corpus's documents as `mrl eval` encodes them."""
    from mrl.text.beir import load_beir_documents

    rows = [{"_id": "d1", "title": "Wings", "text": "lift at low speed"},
            {"_id": "d2", "text": "no title here"},
            {"_id": "d3", "title": None, "text": "null title"},
            {"_id": "d4", "title": "Repeated", "text": "Repeated title opens the body"},
            {"_id": "d5", "title": "only a title", "text": ""}]  # fmt: skip
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = list(read_corpus(tmp_path / "corpus.jsonl", field="title+text", id_field="_id"))
    assert [t for _, t in got] == load_beir_documents(tmp_path).documents
    assert got[0] == ("d1", "Wings\nlift at low speed") and got[3][1].startswith("Repeated title")
    out = tmp_path / "s"
    assert main(["embed", "--model", "hash:16", "--input", str(tmp_path / "corpus.jsonl"),
                 "--out", str(out), "--field", "title+text", "--id-field", "_id",
                 "--quiet"]) == 0  # fmt: skip
    store = EmbeddingStore.open(out)
    assert store.ids.tolist() == ["d1", "d2", "d3", "d4", "d5"]
    np.testing.assert_allclose(store.read(), reference([t for _, t in got]), atol=1e-6)


@pytest.mark.parametrize(
    "line, field, message",
    [('{"title": 3, "text": "a"}', "title+text", "field 'title' must be a string or null"),
     ('{"title": "", "text": " "}', "title+text", "line 1: empty text"),
     ('{"title": "t", "text": "a"}', "titel+text",
      "c.jsonl: no line has the field 'titel' of field='titel+text'; check its spelling"),
     ('{"text": "a"}', "title+", "--field must be a field name or names joined by '+'"),
     ('{"text": "a"}', "+text", "--field must be a field name or names joined by '+'")],
)
def test_joined_field_errors(tmp_path, capsys, line, field, message):
    (tmp_path / "c.jsonl").write_text(line + "\n")
    assert main(["embed", "--model", "hash:16", "--input", str(tmp_path / "c.jsonl"),
                 "--out", str(tmp_path / "s"), "--field", field, "--quiet"]) == 2  # fmt: skip
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_non_utf8_input_names_the_line(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"c.txt line 2: not UTF-8 text \(.* at byte 3\)"):
        list(read_corpus(f))  # was a UnicodeDecodeError naming neither file nor line


@pytest.mark.parametrize(
    "extra, message",
    [(["--merge-only", "--no-merge"], "--merge-only and --no-merge contradict each other"),
     (["--wait-timeout", "-5"], "--wait-timeout must be positive (seconds), got -5.0"),
     (["--field", "body"], "--field 'body' applies to .jsonl input"),
     (["--id-field", "key"], "--id-field 'key' applies to .jsonl input"),
     (["--no-merge", "--dtype", "int8"], "--dtype is the merged store's: give it to the step "
                                          "that merges (--merge-only)"),
     (["--merge-only"], "--input, --model would be ignored with --merge-only")],
)
def test_embed_options_that_would_be_ignored_are_refused(tmp_path, capsys, extra, message):
    write_corpus(tmp_path / "c.txt", 5, jsonl=False)
    argv = ["embed", "--model", "hash:16", "--input", str(tmp_path / "c.txt"), "--out",
            str(tmp_path / "s"), "--quiet", *extra]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_over_long_texts_are_counted_and_warned(tmp_path):
    """`mrl eval` and `mrl text encode` warn that long texts are truncated; `mrl embed` was
    silent."""
    lines = ["short text", "word " * 20, "another one", "w " * 30]  # 22 and 32 tokens
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    enc = HashEncoder(DIM, max_tokens=16)
    with pytest.warns(UserWarning, match="2 of the 4 texts encoded exceed the model's "
                      "max_tokens=16 tokens and were truncated"):
        report = embed_corpus(enc, tmp_path / "c.txt", tmp_path / "s", shard_size=2,
                              show_progress=False)
    assert report.truncated == 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none when every text fits
        embed_corpus(HashEncoder(DIM, max_tokens=64), tmp_path / "c.txt", tmp_path / "t",
                     show_progress=False)


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    """A Windows editor's BOM made line 1 of a .jsonl "not valid JSON" and stuck to a .txt's
    first text."""
    f, g = tmp_path / "c.txt", tmp_path / "c.jsonl"
    f.write_bytes(b"\xef\xbb\xbfone\ntwo\n")
    g.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert list(read_corpus(f)) == [(0, "one"), (1, "two")]
    assert list(read_corpus(g)) == [(0, "a"), (1, "b")]


def test_merge_only_takes_its_dtype_and_a_resumed_merge_keeps_its_own(tmp_path, capsys):
    """--no-merge --dtype int8, then --merge-only, made a float32 store; a resumed merge given
    another dtype kept the old one without a word."""
    write_corpus(tmp_path / "c.txt", 12, jsonl=False)
    shards = ["embed", "--model", "hash:16", "--input", str(tmp_path / "c.txt"), "--out",
              str(tmp_path / "s"), "--quiet", "--shard-size", "5", "--no-merge"]
    assert main(shards) == 0
    assert main(["embed", "--out", str(tmp_path / "s"), "--merge-only", "--dtype", "int8"]) == 0
    assert EmbeddingStore.open(tmp_path / "s").dtype == "int8"
    capsys.readouterr()
    # an interrupted merge: the store holds shard 0 only, its parts are still there
    assert main([*shards[:6], str(tmp_path / "t"), *shards[7:]]) == 0
    from mrl.embed import _parts_dir, _shard_paths

    parts = _parts_dir(tmp_path / "t")
    store = EmbeddingStore.create(tmp_path / "t", Nesting.doubling(8, 16), dtype="float16",
                                  normalize=True)  # fmt: skip
    vec, ids, _ = _shard_paths(parts, 0)
    store.append(np.load(vec), ids=np.load(ids))
    assert main(["embed", "--out", str(tmp_path / "t"), "--merge-only", "--dtype", "int8"]) == 2
    assert "writes float16, not dtype=int8" in capsys.readouterr().err
    assert main(["embed", "--out", str(tmp_path / "t"), "--merge-only"]) == 0
    merged = EmbeddingStore.open(tmp_path / "t")
    assert merged.dtype == "float16" and merged.count == 12


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1"}, "RANK=1 and WORLD_SIZE=1 need 0 <= RANK < WORLD_SIZE"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 and WORLD_SIZE=2 need 0 <= RANK < WORLD_SIZE"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "environment variable RANK must be an integer, got "
                                       "RANK='x'"),
])
def test_a_bad_rank_is_said_by_the_process_that_has_it(tmp_path, capsys, monkeypatch, env,
                                                       message):
    """Only rank 0 printed one-line errors: RANK=1 (alone, or of 2) exited 2 without a word."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    write_corpus(tmp_path / "c.txt", 5, jsonl=False)
    argv = ["embed", "--model", "hash:16", "--input", str(tmp_path / "c.txt"), "--out",
            str(tmp_path / "s"), "--quiet"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_rank_that_starts_after_the_merge_has_nothing_to_do(tmp_path, capsys, monkeypatch):
    """A resumed torchrun job whose rank 0 merged before rank 1 started: rank 1 failed ("a
    store already exists", silently) or made the parts folder again and re-encoded."""
    write_corpus(tmp_path / "c.txt", 12, jsonl=False)
    out = tmp_path / "s"
    argv = ["embed", "--model", "hash:16", "--input", str(tmp_path / "c.txt"), "--out",
            str(out), "--quiet", "--shard-size", "5"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):  # rank 0 waits for rank 1's shard, then merges
        monkeypatch.setenv("RANK", rank)
        assert main(argv + (["--no-merge"] if rank == "1" else [])) == 0
    assert EmbeddingStore.open(out).count == 12 and not (tmp_path / "s.parts").exists()
    monkeypatch.setenv("RANK", "1")
    capsys.readouterr()
    assert main(argv) == 0
    assert "is already merged; nothing to do" in capsys.readouterr().out
    assert not (tmp_path / "s.parts").exists()
    report = embed_corpus(HashEncoder(16), tmp_path / "c.txt", out, shard_size=5, rank=1,
                          world_size=2, show_progress=False)  # fmt: skip
    assert report.already and report.encoded == [] and not (tmp_path / "s.parts").exists()


def test_out_dot_small_hash_models_and_an_empty_nesting(tmp_path, capsys, monkeypatch):
    """--out . failed ("PosixPath('.') has an empty name"); hash:4 was refused by its own default
    nesting (doubling from 8); --nesting= was ignored for hash models."""
    write_corpus(tmp_path / "c.txt", 3, jsonl=False)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["embed", "--model", "hash:16", "--input", "../c.txt", "--out", ".",
                 "--quiet"]) == 0  # fmt: skip
    assert EmbeddingStore.open(tmp_path / "here").count == 3
    assert main(["embed", "--model", "hash:4", "--input", "../c.txt", "--out", "../s4",
                 "--quiet"]) == 0  # fmt: skip
    assert EmbeddingStore.open(tmp_path / "s4").nesting.sizes == (4,)
    capsys.readouterr()
    assert main(["embed", "--model", "hash:16", "--nesting=", "--input", "../c.txt", "--out",
                 "../s5", "--quiet"]) == 2  # fmt: skip
    assert "nesting spec '' is not a comma-separated list" in capsys.readouterr().err
