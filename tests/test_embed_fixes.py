"""Regression tests for reviewed `mrl embed` / embedding-file bugs."""

from __future__ import annotations

from pathlib import Path

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
    with pytest.raises(ValueError, match=r"the input file changed .*input_sha256.*another --out"):
        embed_corpus(HashEncoder(16), corpus, out, shard_size=5, show_progress=False)


def test_resume_accepts_an_unchanged_input_with_a_new_mtime(tmp_path):
    corpus, out = tmp_path / "c.txt", tmp_path / "s"
    _corpus(corpus, "alpha")
    embed_corpus(HashEncoder(16), corpus, out, shard_size=5, merge=False, show_progress=False)
    _corpus(corpus, "alpha")  # rewritten, same text
    report = embed_corpus(HashEncoder(16), corpus, out, shard_size=5, show_progress=False)
    assert report.skipped == [0, 1, 2, 3] and report.merged
