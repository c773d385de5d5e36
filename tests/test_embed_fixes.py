"""Regression tests for reviewed `mrl embed` / embedding-file bugs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mrl.embed import embed_corpus
from mrl.serve.encoders import HashEncoder


def _corpus(path: Path, word: str) -> None:
    path.write_text("".join(f"{word} text number {i:03d}\n" for i in range(20)))


def test_resume_refuses_shards_of_an_input_edited_in_place(tmp_path):
    """`sed -i s/alpha/omega/` keeps the size: the manifest's byte count cannot see it."""
    corpus, out = tmp_path / "c.txt", tmp_path / "s"
    _corpus(corpus, "alpha")
    embed_corpus(HashEncoder(16), corpus, out, shard_size=5, merge=False, show_progress=False)
    _corpus(corpus, "omega")
    with pytest.raises(ValueError, match=r"shards of an earlier version of the input file \(it "
                                         r"has changed since\).*input_sha256.*another --out"):
        embed_corpus(HashEncoder(16), corpus, out, shard_size=5, show_progress=False)


def test_resume_of_parts_written_before_the_input_hash(tmp_path):
    """A parts folder from before the hash was recorded resumes (and gains the hash)."""
    import json

    corpus, out = tmp_path / "c.txt", tmp_path / "s"
    _corpus(corpus, "alpha")
    embed_corpus(HashEncoder(16), corpus, out, shard_size=5, merge=False, show_progress=False)
    manifest = out.with_name("s.parts") / "manifest.json"
    old = json.loads(manifest.read_text())
    old.pop("input_sha256")
    manifest.write_text(json.dumps(old))
    with pytest.warns(UserWarning, match=r"predates recording \[.input_sha256.\]"):
        report = embed_corpus(HashEncoder(16), corpus, out, shard_size=5, show_progress=False)
    assert report.skipped == [0, 1, 2, 3] and report.merged


def test_resume_accepts_an_unchanged_input_with_a_new_mtime(tmp_path):
    corpus, out = tmp_path / "c.txt", tmp_path / "s"
    _corpus(corpus, "alpha")
    embed_corpus(HashEncoder(16), corpus, out, shard_size=5, merge=False, show_progress=False)
    _corpus(corpus, "alpha")  # rewritten, same text
    report = embed_corpus(HashEncoder(16), corpus, out, shard_size=5, show_progress=False)
    assert report.skipped == [0, 1, 2, 3] and report.merged


def test_overwrite_killed_between_vectors_and_sidecar_is_refused_by_readers(tmp_path,
                                                                          monkeypatch):
    """A kill after the new vectors, before their sidecar: the old sidecar (same shape, another
    model's nesting) is recognised as someone else's by its fingerprint, never used silently."""
    import numpy as np

    import mrl.text.encoders as enc
    from mrl.retrieval.loading import load_embeddings

    out = tmp_path / "e.npy"
    enc.save_embeddings(out, np.ones((3, 16), np.float32), model="old", nesting={"sizes": [4, 16]})
    assert load_embeddings(out)[1].sizes == (4, 16)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(enc, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        enc.save_embeddings(out, np.zeros((3, 16), np.float32), model="new",
                            nesting={"sizes": [8, 16]})
    assert np.load(out).sum() == 0  # the new vectors, beside the old sidecar
    with pytest.raises(ValueError, match="was written for other vectors than .*interrupted"):
        load_embeddings(out)


def test_a_failed_vector_write_keeps_the_old_pair(tmp_path, monkeypatch):
    import numpy as np

    import mrl.text.encoders as enc
    from mrl.retrieval.loading import load_embeddings

    out = tmp_path / "e.npy"
    enc.save_embeddings(out, np.ones((3, 16), np.float32), model="old", nesting={"sizes": [4, 16]})
    monkeypatch.setattr(enc.np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        enc.save_embeddings(out, np.zeros((3, 16), np.float32), model="new",
                            nesting={"sizes": [8, 16]})
    monkeypatch.undo()
    x, nest, _ = load_embeddings(out)
    assert x.sum() == 48 and nest.sizes == (4, 16)  # the old pair, still usable


def test_a_sidecar_of_other_vectors_is_refused(tmp_path):
    import json

    import numpy as np

    from mrl.retrieval.loading import load_embeddings

    out = tmp_path / "e.npy"
    np.save(out, np.ones((5, 16), np.float32))
    side = {"shape": [3, 16], "nesting": {"sizes": [8, 16]}}
    out.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match=r"describes embeddings of shape \[3, 16\].*\[5, 16\]"):
        load_embeddings(out)


def test_a_second_merge_waits_then_finds_the_store_merged(tmp_path):
    """`mrl embed --merge-only` twice at once: the second waits for the first's lock, then
    returns the merged store instead of appending (or cleaning up) beside it."""
    import os
    import threading

    import numpy as np

    from mrl.embed import merge_shards
    from mrl.retrieval import EmbeddingStore

    corpus, out = tmp_path / "c.txt", tmp_path / "s"
    _corpus(corpus, "alpha")
    embed_corpus(HashEncoder(16), corpus, out, shard_size=3, merge=False, show_progress=False)
    import fcntl

    fd = os.open(tmp_path / "s.parts" / ".merge.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "the first merge"
    results = []
    t = threading.Thread(target=lambda: results.append(merge_shards(out)))
    t.start()
    t.join(0.5)
    assert t.is_alive() and not (out / "store.json").exists()
    from mrl.embed import _merge_locked

    _merge_locked(out, tmp_path / "s.parts", "float32", False)  # the first merge, under its lock
    os.close(fd)
    t.join(10)
    store = EmbeddingStore.open(out)
    assert results[0].count == store.count == 20
    assert store.ids.tolist() == list(range(20))
    assert np.isfinite(store.read()).all() and not (tmp_path / "s.parts").exists()


def test_a_read_only_cache_serves_its_entries_and_a_miss_encodes_uncached(tmp_path,
                                                                          monkeypatch):
    import numpy as np

    import mrl.io
    import mrl.text.encoders as enc

    monkeypatch.setattr(enc, "encode", lambda e, texts, **k: np.ones((len(texts), 4), np.float32))
    cache = tmp_path / "cache"
    first = enc.encode_cached("default", ["a", "b"], cache, encoder=object())
    assert len(list(cache.glob("*.npy"))) == 1

    def read_only(folder, param, path):
        raise PermissionError(f"{param} {str(path)!r} is not writable")

    monkeypatch.setattr(mrl.io, "_check_writable", read_only)
    assert np.array_equal(enc.encode_cached("default", ["a", "b"], cache, encoder=object()),
                          first)  # a hit: served (it failed before)  # fmt: skip
    with pytest.warns(UserWarning, match="not writable; encoding without caching"):
        enc.encode_cached("default", ["c"], cache, encoder=object())
    assert len(list(cache.glob("*.npy"))) == 1


@pytest.mark.parametrize("broken, message", [
    (lambda x: x[:-1], "returned shape (3, 16) for 4 texts; expected [4, 16]"),
    (lambda x: x[:, :8], "returned shape (4, 8) for 4 texts; expected [4, 16]"),
    (lambda x: x * np.nan, "returned NaN or inf (text 0 of the batch"),
])
def test_a_bad_encoder_output_is_refused_before_its_shard_is_written(tmp_path, broken, message):
    from mrl.serve.encoders import HashEncoder

    class Broken(HashEncoder):
        def encode(self, texts):
            return broken(np.asarray(super().encode(texts)))

    (tmp_path / "c.txt").write_text("".join(f"text {i}\n" for i in range(4)))
    with pytest.raises(ValueError, match=re.escape(message)):
        embed_corpus(Broken(16), tmp_path / "c.txt", tmp_path / "s", show_progress=False)
    assert not list((tmp_path / "s.parts").glob("shard-*.npy"))  # nothing bad on disk


def test_embed_arguments_checked_before_encoding(tmp_path):
    from mrl.serve.encoders import HashEncoder

    (tmp_path / "c.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'float16', 'int8'\], "
                       r"got dtype='bf16'"):  # fmt: skip
        embed_corpus(HashEncoder(16), tmp_path / "c.txt", tmp_path / "s", dtype="bf16")
    with pytest.raises(ValueError, match="wait_timeout_s must be positive"):
        embed_corpus(HashEncoder(16), tmp_path / "c.txt", tmp_path / "s", wait_timeout_s=0)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.parts").exists()
