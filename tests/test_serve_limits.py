"""Service limits and checks from an audit: bounded shortlists, search parameters checked before
any text is embedded, structures a request may not build, named configurations that really
apply, extreme query scales, over-large images, and images not held to the text character cap."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mrl import Nesting  # noqa: E402
from mrl.retrieval import MatryoshkaIndex, SearchConfig, exact_search  # noqa: E402
from mrl.serve import HashEncoder, IndexBackend, ServeConfig, create_app  # noqa: E402

DIM = 32


def _index(backend="flat", n=400):
    db = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    idx = MatryoshkaIndex(Nesting.doubling(8, DIM), SearchConfig(shortlist_dim=8, shortlist=50,
                                                                  backend=backend), threads=1)
    idx.add(db)
    return idx


def _client(index, encoder=None, **config):
    app = create_app(encoder or HashEncoder(DIM), index, ServeConfig(**config))
    return TestClient(app, raise_server_exceptions=False)


def _error(r):
    return r.status_code, r.json()["error"]["param"], r.json()["error"]["message"]


def test_shortlist_and_stage_keeps_are_bounded():
    q = np.ones(DIM).tolist()
    with _client(IndexBackend(_index()), max_shortlist=300) as c:
        status, param, msg = _error(c.post("/v1/search", json={"vector": q, "shortlist": 10**9}))
        assert (status, param) == (400, "shortlist") and "[1, 300]" in msg
        r = c.post("/v1/search", json={"vector": q, "shortlist": 300, "stages": [[16, 10**6]]})
        assert _error(r)[:2] == (400, "stages") and "stages[0] keep" in _error(r)[2]
        r = c.post("/v1/search", json={"vector": q, "stages": [[16]]})
        assert _error(r) == (400, "stages", "stages[0] must be a [dim, keep] pair, got [16]")
        assert c.post("/v1/search", json={"vector": q, "shortlist": 300}).status_code == 200


def test_search_parameters_are_checked_before_the_queries_are_embedded():
    enc = HashEncoder(DIM)
    with _client(IndexBackend(_index()), encoder=enc) as c:
        for body, param in (({"k": 0}, "k"), ({"shortlist_dim": 12}, "shortlist_dim"),
                            ({"config": "nope"}, "config"), ({"shortlist": 0}, "shortlist")):
            r = c.post("/v1/search", json={"query": ["a text"], **body})
            assert _error(r)[:2] == (400, param), r.text
        assert enc.calls == 0  # no encoder call was spent on a request that fails anyway
        assert c.post("/v1/search", json={"query": ["a text"]}).status_code == 200
        assert enc.calls == 1


def test_a_request_may_not_build_a_graph_but_may_pick_a_flat_prefix():
    pytest.importorskip("faiss")
    hnsw = _index("hnsw")
    q = np.ones(DIM).tolist()
    with _client(IndexBackend(hnsw)) as c:
        r = c.post("/v1/search", json={"vector": q, "shortlist_dim": 16})
        assert _error(r)[:2] == (400, "shortlist_dim") and "built: [8]" in _error(r)[2]
        assert c.post("/v1/search", json={"vector": q}).status_code == 200
    assert not any(key[0] == 16 for key in hnsw._hnsw)  # nothing was built for the request
    with _client(IndexBackend(_index("flat"))) as c:
        assert c.post("/v1/search", json={"vector": q, "shortlist_dim": 16}).status_code == 200


def test_a_named_configuration_is_what_runs():
    """Before, every test used a named config equal to the default, so one that was ignored
    passed."""
    idx = _index()
    q = np.random.default_rng(3).standard_normal(DIM).astype(np.float32)
    wide = {"shortlist_dim": 16, "shortlist": 300}
    with _client(IndexBackend(idx, configs={"wide": wide})) as c:
        got = c.post("/v1/search", json={"vector": q.tolist(), "k": 20, "config": "wide"}).json()
        plain = c.post("/v1/search", json={"vector": q.tolist(), "k": 20}).json()
    assert got["params"]["shortlist_dim"] == 16 and got["params"]["shortlist"] == 300
    assert plain["params"]["shortlist_dim"] == 8 and plain["params"]["shortlist"] == 50
    want = idx.search(q, 20, shortlist_dim=16, shortlist=300)
    assert got["data"][0]["ids"] == want.ids[0].tolist()
    assert got["data"][0]["ids"] != plain["data"][0]["ids"]


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_extreme_query_scales_give_the_same_cosine_hits(scale):
    idx = _index()
    q = np.random.default_rng(4).standard_normal((3, DIM)).astype(np.float32)
    ref = idx.search(q, 5, shortlist=400)
    far = idx.search(q * np.float32(scale), 5, shortlist=400)
    np.testing.assert_array_equal(far.indices, ref.indices)
    np.testing.assert_allclose(far.scores, ref.scores, rtol=1e-5)
    db = idx.vectors()
    np.testing.assert_array_equal(exact_search(db, q * np.float32(scale), 5)[1],
                                  exact_search(db, q, 5)[1])


def _png(w, h, mode="1") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_an_over_large_image_is_an_input_error(monkeypatch):
    PIL = pytest.importorskip("PIL.Image")
    from mrl.serve.encoders import VisionEncoder

    enc = VisionEncoder.__new__(VisionEncoder)  # _decode needs no model
    enc.shape, enc.channels = (12, 12), 1
    monkeypatch.setattr(PIL, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 100):  # over the limit (Pillow warns) and over twice it (Pillow raises)
        with pytest.raises(ValueError, match=r"input\[3\] is too large an image"):
            enc._decode(3, _png(side, side))
    assert enc._decode(0, _png(30, 30)).shape == (1, 12, 12)


def test_images_are_not_held_to_the_text_character_cap():
    from mrl.serve.app import APIError, _texts_from_input

    config = ServeConfig(max_input_chars=100)
    long = "A" * 400
    assert _texts_from_input([long], config, images=True) == [long]
    with pytest.raises(APIError, match="has 400 characters; at most 100"):
        _texts_from_input([long], config)


def test_a_named_configuration_under_the_requests_own_shortlist_is_fitted():
    """A named config's stages were passed on as if the client had sent them: with the
    request's own shortlist they failed ("stages[0] keep must be in [k=10, 60]")."""
    idx = _index()
    idx.config = SearchConfig(shortlist_dim=8, shortlist=200, stages=((16, 100), (32, 50)))
    q = np.ones(DIM).tolist()
    with _client(IndexBackend(idx)) as c:
        r = c.post("/v1/search", json={"vector": q, "shortlist": 60, "config": "default"})
        assert r.status_code == 200, r.text
        assert r.json()["params"]["stages"] == [[16, 60], [32, 10]]


def test_not_built_names_only_the_prefixes_built_for_that_backend():
    pytest.importorskip("faiss")
    idx = _index("hnsw")
    backend = IndexBackend(idx, configs={"flat16": {"backend": "flat", "shortlist_dim": 16},
                                         "g32": {"backend": "hnsw", "shortlist_dim": 32,
                                                 "hnsw_m": 16}})
    with pytest.raises(ValueError, match=r"not built on this server for the hnsw backend "
                                         r"\(built: \[8\]\)"):
        backend.check(shortlist_dim=16)
