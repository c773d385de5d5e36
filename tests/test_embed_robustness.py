"""`mrl embed` inputs no encoder can take, a kill while the parts folder is removed, damaged
bookkeeping files, the Python API's argument types, and text files written as UTF-8."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mrl.embed as me
from mrl import Nesting
from mrl.cli import main
from mrl.embed import embed_corpus
from mrl.records import make_record
from mrl.retrieval import EmbeddingStore
from mrl.serve.encoders import HashEncoder


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("bad", [{"id": 3, "text": "broken \ud800 surrogate"},
                                 {"id": "a\ud800", "text": "fine"}])  # fmt: skip
def test_an_unpaired_surrogate_is_refused_before_encoding(tmp_path, capsys, bad):
    """A JSON "\\ud800" escape passed every check and failed shard 3 in the tokenizer (a
    TypeError without a line), or the Qdrant export after the collection was set up."""
    rows = [{"id": i if isinstance(bad["id"], int) else f"d{i}", "text": f"text {i}"}
            for i in range(4)]  # fmt: skip
    rows[3] = bad
    _jsonl(tmp_path / "c.jsonl", rows)
    code = main(["embed", "--model", "hash:16", "--input", str(tmp_path / "c.jsonl"), "--out",
                 str(tmp_path / "s"), "--shard-size", "1", "--quiet"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "c.jsonl line 4:" in err and "unpaired UTF-16 surrogate" in err
    assert not (tmp_path / "s.parts").exists()  # nothing encoded


def test_a_kill_while_the_parts_are_removed_leaves_a_whole_store(tmp_path, monkeypatch):
    """rmtree deletes file by file: a kill midway left a whole store beside a parts folder
    missing shards; --merge-only failed ("shards [0, 1] are still missing") and a rerun
    encoded them again. The folder is renamed first now."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"text {i}\n" for i in range(40)))
    out = tmp_path / "store"
    real = shutil.rmtree

    def killed(path, *args, **kwargs):
        for name in sorted(os.listdir(path))[:4]:
            os.unlink(os.path.join(path, name))
        raise KeyboardInterrupt

    monkeypatch.setattr(me.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(HashEncoder(16), corpus, out, shard_size=10, show_progress=False)
    monkeypatch.setattr(me.shutil, "rmtree", real)
    assert not (tmp_path / "store.parts").exists()
    assert me.already_merged(out)
    assert main(["embed", "--out", str(out), "--merge-only"]) == 0
    assert EmbeddingStore.open(out).count == 40
    assert [p.name for p in tmp_path.iterdir() if ".removing-" in p.name] == []  # cleaned


def test_damaged_bookkeeping_files_are_named_or_redone(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"text {i}\n" for i in range(30)))
    out = tmp_path / "s"
    args = ["embed", "--model", "hash:16", "--input", str(corpus), "--out", str(out),
            "--shard-size", "10", "--no-merge", "--quiet"]  # fmt: skip
    assert main(args) == 0
    parts = tmp_path / "s.parts"
    (parts / "shard-00001.json").write_text("")  # an empty commit point: that shard again
    capsys.readouterr()
    assert main(args) == 0
    assert "encoded 1, skipped 2" in capsys.readouterr().out
    (parts / "manifest.json").write_text('{"rows": 3')
    assert main(args) == 2
    assert f"{parts / 'manifest.json'} is damaged" in capsys.readouterr().err
    (parts / "manifest.json").unlink()
    store = tmp_path / "st"
    EmbeddingStore.from_array(store, np.eye(16, dtype=np.float32), Nesting((8, 16)))
    (store / "store.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"store\.json is truncated or not valid JSON"):
        EmbeddingStore.open(store)


def test_api_arguments_of_the_wrong_type_are_named(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a\nb\n")
    for name, value in (("shard_size", 2.5), ("batch_size", 2.5), ("shard_size", "10")):
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            embed_corpus(HashEncoder(16), corpus, tmp_path / "s", show_progress=False,
                         **{name: value})  # fmt: skip
    with pytest.raises(ValueError, match="wait_timeout_s must be a number of seconds"):
        embed_corpus(HashEncoder(16), corpus, tmp_path / "s", wait_timeout_s="5")
    assert not (tmp_path / "s.parts").exists()
    for prefix in (float("nan"), float("inf"), 2.5):
        with pytest.raises(ValueError, match="prefix must be a positive whole number"):
            make_record("mrl", prefix, "top1", 0.5)
    for value in ("abc", None):
        with pytest.raises(ValueError, match="value must be a number, got value="):
            make_record("mrl", 8, "top1", value)
    assert make_record("mrl", 8.0, "top1", np.float32(0.5))["prefix"] == 8


def test_qdrant_plan_sizes_are_not_truncated():
    from mrl.qdrant import FunnelPlan, QdrantLayout

    layout = QdrantLayout((16, 32))
    with pytest.raises(ValueError, match="shortlist_dim must be an integer"):
        FunnelPlan.build(layout, 5, shortlist_dim=16.7)
    with pytest.raises(ValueError, match="shortlist must be an integer"):
        FunnelPlan.build(layout, 5, shortlist=20.9)
    assert FunnelPlan.build(layout, 5, shortlist=np.int64(20)).shortlist == 20


def test_a_missing_qdrant_collection_is_named(tmp_path):
    pytest.importorskip("qdrant_edge")
    from mrl.qdrant import QdrantIndex, open_target

    target = open_target("dcos", path=tmp_path / "qd")
    with pytest.raises(FileNotFoundError, match="collection at .*dcos does not exist"):
        QdrantIndex(target)


def test_text_files_are_written_as_utf8_whatever_the_locale(tmp_path):
    """atomic_open(path, "w") used the locale's encoding: a "±" row failed under LC_ALL=C."""
    code = ("import sys; from mrl.io import atomic_open\n"
            "with atomic_open(sys.argv[1], 'w') as f: f.write('88.0 \\u00b1 0.2')\n")  # fmt: skip
    env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "LANG": "C",
           "PYTHONCOERCECLOCALE": "0"}  # fmt: skip
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.md")], env=env, check=True)
    assert (tmp_path / "t.md").read_bytes().decode("utf-8") == "88.0 ± 0.2"
