"""Inputs a library user passes naturally: tensors attached to the graph or in bfloat16, nestings
as lists / strings / arrays, one-row inputs. Each case failed (or passed silently) before."""

import re

import numpy as np
import pytest
import torch

from mrl import Nesting
from mrl.arrays import as_numpy
from mrl.cascade import Cascade, fit_cascade
from mrl.heads import make_head
from mrl.retrieval.store import validate_vectors
from mrl.text.adaptor import OrthogonalAdaptor


def test_as_numpy_detaches_and_widens_bfloat16():
    t = torch.randn(3, 4, requires_grad=True)
    assert np.array_equal(as_numpy(t), t.detach().numpy())
    b = torch.randn(3, 4).bfloat16()
    out = as_numpy(b)
    assert out.dtype == np.float32 and np.array_equal(out, b.float().numpy())
    assert as_numpy(torch.ones(2, dtype=torch.float16)).dtype == np.float16
    arr = np.ones((2, 2))
    assert as_numpy(arr) is arr and as_numpy([[1.0]]).shape == (1, 1)


def test_validate_vectors_takes_graph_and_bfloat16_tensors():
    emb = torch.nn.Linear(4, 8)(torch.randn(5, 4))  # requires grad
    assert validate_vectors(emb, 8).shape == (5, 8)
    assert validate_vectors(emb.detach().bfloat16(), 8).dtype == np.float32


def test_nesting_coerce():
    assert Nesting.coerce(np.array([8, 16])) == Nesting((8, 16))
    assert Nesting.coerce(torch.tensor([4, 8])) == Nesting((4, 8))
    assert Nesting.coerce("8,16,32") == Nesting((8, 16, 32))
    with pytest.raises(ValueError, match="nesting must be a Nesting.*got nesting=3"):
        Nesting.coerce(3)
    assert make_head("mrl", np.array([8, 16]), 5).nesting == Nesting((8, 16))


def test_truncated_never_grows_a_nesting():
    with pytest.raises(ValueError, match="at most the nesting's largest prefix 64, got dim=100"):
        Nesting.doubling(8, 64).truncated(100)
    assert Nesting.doubling(8, 64).truncated(64) == Nesting.doubling(8, 64)


def test_cascade_accepts_list_nesting_and_bfloat16_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, 4, generator=g)
    y = torch.randint(0, 4, (50,), generator=g)
    c = fit_cascade(logits, y, [8, 16, 32], tolerance=0.0)
    assert c.nesting == Nesting((8, 16, 32))
    pred, _ = c.predict(logits.bfloat16())
    assert pred.shape == (50,)
    assert Cascade([8, 16, 32], (1.0, 1.0)).nesting == Nesting((8, 16, 32))


def test_adaptor_list_nesting_and_one_row_checks():
    ad = OrthogonalAdaptor(np.eye(8), [4, 8])
    assert ad.nesting == Nesting((4, 8))
    with pytest.raises(ValueError, match="x contain NaN"):
        ad.transform(np.full((1, 8), np.nan))  # one row was not checked
    x = torch.randn(2, 8, requires_grad=True)
    assert np.allclose(ad.transform(x), x.detach().numpy())
    assert ad.transform(np.zeros((0, 8))).shape == (0, 8)


def test_hash_encoder_nesting_spec():
    from mrl.serve.encoders import HashEncoder

    assert HashEncoder(dim=32, nesting="8,16,32").nesting == Nesting((8, 16, 32))


class _FakeST(torch.nn.Module):
    """What the loss reads of a SentenceTransformer: its dimension (truncated when truncate_dim
    is set, as sentence-transformers reports it) and forward's full-size embeddings."""

    def __init__(self, truncate_dim=None):
        super().__init__()
        self.truncate_dim = truncate_dim

    def get_sentence_embedding_dimension(self):
        return self.truncate_dim or 32

    def forward(self, features):
        return {"sentence_embedding": features["x"]}


def test_st_loss_checks_temperature_and_reads_untruncated_dim():
    from mrl.text.st_loss import MatryoshkaContrastiveLoss

    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        MatryoshkaContrastiveLoss(_FakeST(), [8, 32], temperature=float("nan"))
    model = _FakeST(truncate_dim=8)
    loss = MatryoshkaContrastiveLoss(model, "8,16,32")  # forward gives 32 dims, not 8
    assert model.truncate_dim == 8  # restored
    x = {"x": torch.randn(4, 32)}
    assert torch.isfinite(loss([x, {"x": torch.randn(4, 32)}]))
    t = torch.tensor(0.05, requires_grad=True)
    MatryoshkaContrastiveLoss(_FakeST(), [8, 32], temperature=t)([x, x]).backward()
    assert t.grad is not None  # a learned temperature keeps its gradient


def test_normalize_refuses_non_images():
    from mrl.models import Normalize

    norm = Normalize([0.5] * 3, [0.25] * 3)
    assert norm(torch.rand(2, 3, 4, 4)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"expects images \[B, 3, H, W\], got shape \(4, 3\)"):
        norm(torch.rand(4, 3))  # broadcast to [1, 3, 4, 3] before
    with pytest.raises(ValueError, match="got shape"):
        norm(torch.rand(2, 1, 4, 4))


@pytest.mark.parametrize("kw, message", [
    (dict(hnsw_m=0), "hnsw_m must be >= 2, got hnsw_m=0"),  # FAISS aborted the process
    (dict(hnsw_m=1), "hnsw_m must be >= 2, got hnsw_m=1"),  # ... segfaulted
    (dict(hnsw_m=-3), "hnsw_m must be >= 2, got hnsw_m=-3"),  # ... hung
    (dict(ef_construction=0), "ef_construction must be >= 1, got ef_construction=0"),
])
def test_hnsw_build_settings_are_checked_before_faiss(kw, message):
    pytest.importorskip("faiss")
    from mrl.retrieval import MatryoshkaIndex

    x = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    ix = MatryoshkaIndex(Nesting((4, 8, 16)))
    ix.add(x)
    with pytest.raises(ValueError, match=re.escape(message)):
        ix.search(x[:3], k=5, backend="hnsw", **kw)


@pytest.mark.parametrize("threads, message", [
    (-1, "threads must be >= 1, got threads=-1"),
    (2.5, "threads must be an integer, got threads=2.5"),
])
def test_index_threads_are_checked(threads, message):
    from mrl.retrieval import MatryoshkaIndex

    with pytest.raises(ValueError, match=re.escape(message)):
        MatryoshkaIndex(Nesting((4, 8, 16)), threads=threads)


def test_fixed_feature_head_names_a_dtype_mismatch():
    head = make_head("plain", Nesting((4, 8, 16)), 5)
    with pytest.raises(ValueError, match="z has dtype torch.float64 but the head's parameters "
                       "are torch.float32"):  # fmt: skip
        head(torch.randn(3, 16, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts both: fine
        assert head(torch.randn(3, 16)).shape == (1, 3, 5)


def test_a_nan_rotation_is_not_orthogonal():
    with pytest.raises(ValueError, match=r"rotation must be orthogonal, got max \|R\^T R - I\| = "
                       r"nan"):  # fmt: skip
        OrthogonalAdaptor(np.full((16, 16), np.nan), [4, 8, 16])


def test_exact_search_checks_what_it_scans():
    """The reference every backend is tested against refuses what it cannot rank."""
    from mrl.retrieval import exact_search

    rng = np.random.default_rng(0)
    db, q = rng.normal(size=(50, 16)).astype(np.float32), rng.normal(size=(3, 16))
    bad = db.copy()
    bad[7, 3] = np.nan  # ranked arbitrarily before
    with pytest.raises(ValueError, match="db must be finite, row 7 has NaN or inf"):
        exact_search(bad, q, 5)
    with pytest.raises(ValueError, match="db must hold real numbers, got dtype complex64"):
        exact_search(db.astype(np.complex64), q, 5)
    for block in (0, -1, 2.5):  # -1 returned empty results, 0 a range() error
        with pytest.raises(ValueError, match=r"block must be (>= 1|an integer), got block="):
            exact_search(db, q, 5, block=block)
    with pytest.raises(ValueError, match=r"column_scale must be a finite \[D=16\] vector"):
        exact_search(db, q, 5, column_scale=np.ones(3))
    binary = db > 0  # bool codes (binary embeddings) are numbers: searched as before
    assert exact_search(binary, q, 5)[1].shape == (3, 5)
    s, i = exact_search(db, q, 5, block=7)  # blocks of any size give the one-block answer
    s1, i1 = exact_search(db, q, 5)
    assert (i == i1).all() and np.allclose(s, s1)


def test_small_api_misuses_are_named():
    from mrl.similarity import prefix_scores

    with pytest.raises(ValueError, match=r"sizes must be a sequence of ints such as \(8, 16, 32\)"):
        Nesting(8)  # was "'int' object is not iterable"
    with pytest.raises(ValueError, match=r"weights must be numbers, one per prefix, got "
                       r"weights=\('a', 1\)"):  # fmt: skip
        Nesting((4, 8), weights=("a", 1))
    x = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="queries must hold real numbers, got dtype "
                       "torch.complex64"):  # fmt: skip
        prefix_scores(x[:2].astype(np.complex64), x, Nesting((4, 8)))
    with pytest.raises(ValueError, match=r"center must be a \[8\] vector, True or None, got "
                       r"center='mean'"):  # fmt: skip
        prefix_scores(x[:2], x, Nesting((4, 8)), center="mean")


def test_row_positions_are_integers_in_range(tmp_path):
    from mrl.retrieval import EmbeddingStore, MatryoshkaIndex

    x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    store = EmbeddingStore.create(tmp_path / "s", Nesting((4, 8)))
    store.append(x)
    with pytest.raises(ValueError, match="rows must be integer row positions, got dtype float64"):
        store.take([1.7])  # read row 1 before
    assert np.allclose(store.take([5, 0]), x[[5, 0]])
    ix = MatryoshkaIndex(Nesting((4, 8)))
    ix.add(x)
    with pytest.raises(ValueError, match=r"rows must be in \[0, 6\), got -1..-1"):
        ix.vectors(rows=[-1])  # the last row before
    with pytest.raises(ValueError, match=r"dims must be an int in \[1, 8\], got dims=100"):
        ix.vectors(dims=100)
    assert ix.vectors(rows=[2], dims=4).shape == (1, 4)


def test_complex_and_untyped_inputs_are_named():
    from mrl.cascade.core import check_scores
    from mrl.losses import nested_cross_entropy

    with pytest.raises(ValueError, match="logits must be real numbers, got dtype complex128"):
        check_scores(np.ones((2, 4, 3), dtype=complex), Nesting((4, 8)))
    with pytest.raises(ValueError, match="corpus must hold real numbers, got dtype complex64"):
        OrthogonalAdaptor.fit(np.ones((20, 8), dtype=np.complex64))
    logits, y = torch.randn(2, 4, 3), torch.tensor([0, 1, 2, 0])
    for bad in (None, "0.1"):  # a comparison TypeError before
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            nested_cross_entropy(logits, y, label_smoothing=bad)
    assert nested_cross_entropy(logits, y, label_smoothing=np.float32(0.1)).ndim == 0


def test_more_misuses_are_named():
    from mrl.losses import nested_cross_entropy
    from mrl.metrics import ndcg_at_k
    from mrl.retrieval import MatryoshkaIndex

    with pytest.raises(ValueError, match=r"ideal_gains must hold one sequence .* \(k is the next "
                       r"argument\), got ideal_gains=3"):  # fmt: skip
        ndcg_at_k(np.ones((2, 5)), 3)
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="logits must be floating point, got dtype torch.int64"):
        nested_cross_entropy(torch.randint(0, 5, (2, 4, 3)), y)
    with pytest.raises(ValueError, match=r"logits must have a prefix and a batch .* \(0, 4, 3\)"):
        nested_cross_entropy(torch.randn(0, 4, 3), y)  # a loss of 0 that trains nothing
    with pytest.raises(ValueError, match="config must be a SearchConfig .* got dict"):
        MatryoshkaIndex(Nesting((4, 8, 16)), {"shortlist_dim": 4})


def test_stages_are_pairs_of_ints():
    from mrl.retrieval import MatryoshkaIndex

    x = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    ix = MatryoshkaIndex(Nesting((4, 8, 16)))
    ix.add(x)
    kw = dict(k=5, shortlist_dim=4, shortlist=20)
    with pytest.raises(ValueError, match=r"stages\[0\] must be a \(dim, keep\) pair, got 8"):
        ix.search(x[:2], stages=[8, 16], **kw)  # was "'int' object is not iterable"
    with pytest.raises(ValueError, match=r"stages\[0\] keep must be an integer, got .*=10.5"):
        ix.search(x[:2], stages=((8, 10.5), (16, 5)), **kw)  # was a torch.topk TypeError
    assert ix.search(x[:2], stages=((8, 10), (16, 5)), **kw).ids.shape == (2, 5)
