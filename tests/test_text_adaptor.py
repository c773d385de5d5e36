"""Post-hoc Matryoshka adaptor: rotation, prefix cosines, listwise loss, fit, save/load, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrl.cli import main
from mrl.nesting import Nesting
from mrl.text.adaptor import (
    AdaptorConfig,
    OrthogonalAdaptor,
    full_neighbours,
    listwise_prefix_loss,
    pca_rotation,
    prefix_cosine,
    prefix_cosine_rows,
)

NEST = Nesting((4, 8, 16))


def _corpus(n=200, d=16, seed=0):
    # Clustered data whose energy is spread over all coordinates by a random rotation.
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, d, generator=g) * torch.linspace(3, 0.2, d)
    z = centres[torch.randint(10, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return (z @ q.T).numpy()


def test_pca_rotation_is_orthogonal_and_sorted():
    x = torch.from_numpy(_corpus())
    r = pca_rotation(x)
    torch.testing.assert_close(r.T @ r, torch.eye(16), atol=1e-5, rtol=0)
    energy = (x @ r).pow(2).mean(0)
    assert torch.all(energy[:-1] >= energy[1:] - 1e-5)


def test_prefix_cosine_matches_loop():
    g = torch.Generator().manual_seed(1)
    q, c = torch.randn(3, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    got = prefix_cosine(q, c, NEST)
    for gi, m in enumerate(NEST.sizes):
        for b in range(3):
            for k in range(5):
                want = F.cosine_similarity(q[b, :m], c[b, k, :m], dim=0)
                assert abs(got[gi, b, k] - want) < 1e-5


def test_prefix_cosine_rows_matches_reference():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(9, 16, generator=g, requires_grad=True)
    q_pos = torch.tensor([0, 4, 8])
    cand = torch.randint(9, (3, 5), generator=g)
    fast = prefix_cosine_rows(y, q_pos, cand, NEST)
    ref = prefix_cosine(y[q_pos], y[cand], NEST)
    torch.testing.assert_close(fast, ref)
    w = torch.randn(fast.shape, generator=g)
    g1 = torch.autograd.grad((fast * w).sum(), y)[0]
    g2 = torch.autograd.grad((ref * w).sum(), y)[0]
    torch.testing.assert_close(g1, g2)


def test_listwise_loss_reference_and_mask():
    g = torch.Generator().manual_seed(2)
    full = torch.rand(4, 6, generator=g)
    pre = torch.rand(2, 4, 6, generator=g, requires_grad=True)
    nest = Nesting((2, 4), weights=(1.0, 0.5))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 3] = True
    got = listwise_prefix_loss(full, pre, nest, 0.1, 0.2, mask)
    want = 0.0
    for gi, w in enumerate(nest.weights):
        for b in range(4):
            keep = ~mask[b]
            p = F.softmax(full[b, keep] / 0.2, -1)
            logq = F.log_softmax(pre[gi, b, keep] / 0.1, -1)
            want = want + w * (p * (p.log() - logq)).sum() / 4
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got, pre)[0]
    g2 = torch.autograd.grad(want, pre)[0]
    torch.testing.assert_close(g1, g2)
    assert g1[:, 0, 3].abs().max() == 0  # a masked candidate gets no gradient
    # Same scores and temperatures: the distributions agree, the loss is 0.
    same = listwise_prefix_loss(full, full.expand(2, 4, 6), nest, 0.1, 0.1)
    assert abs(same.item()) < 1e-6


def test_full_neighbours_excludes_self():
    x = torch.from_numpy(_corpus(50))
    nb = full_neighbours(x, 5, block=7)
    assert not (nb == torch.arange(50)[:, None]).any()
    xn = F.normalize(x, dim=-1)
    sims = xn @ xn.T
    sims.fill_diagonal_(-2)
    ref = sims.topk(5, dim=-1).indices
    assert torch.equal(nb, ref)
    with pytest.raises(ValueError, match="neighbours must be < number of documents"):
        full_neighbours(x, 50)


def cos(a):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    return a @ a.T


def _objective(adaptor, x, nbrs):
    xt = torch.from_numpy(x)
    y = torch.from_numpy(adaptor.transform(x))
    xn = F.normalize(xt, dim=-1)
    full = torch.einsum("bd,bkd->bk", xn, xn[nbrs])
    return listwise_prefix_loss(full, prefix_cosine(y, y[nbrs], NEST), NEST, 0.05, 0.05).item()


def test_fit_keeps_full_size_and_improves_objective():
    x = _corpus()
    cfg = dict(nesting="4,8,16", neighbours=10, random_negatives=20, batch_size=64)
    pca = OrthogonalAdaptor.fit(x, AdaptorConfig(steps=0, **cfg))
    learned = OrthogonalAdaptor.fit(x, AdaptorConfig(steps=60, lr=5e-3, **cfg))
    r = learned.rotation
    torch.testing.assert_close(r.T @ r, torch.eye(16), atol=1e-5, rtol=0)
    y = learned.transform(x)
    np.testing.assert_allclose(cos(y), cos(x), atol=1e-5)  # full-size search is unchanged
    nbrs = full_neighbours(torch.from_numpy(x), 10)
    assert _objective(learned, x, nbrs) < _objective(pca, x, nbrs)
    assert learned.info["final_loss"] is not None


def test_save_load_roundtrip(tmp_path):
    a = OrthogonalAdaptor.fit(_corpus(), AdaptorConfig(steps=0, nesting="4,8,16"))
    a.save(tmp_path / "ad.pt")
    for name in ("ad.pt", "ad.npy"):
        b = OrthogonalAdaptor.load(tmp_path / name)
        assert b.nesting == a.nesting
        torch.testing.assert_close(b.rotation, a.rotation)
        assert b.info == a.info  # the .npy route lost the info the .json beside it holds
    assert json.loads((tmp_path / "ad.json").read_text())["nesting"]["sizes"] == [4, 8, 16]
    for bad in ("x.npy", "x.json"):  # the sibling of that name overwrote the main file
        with pytest.raises(ValueError, match=rf"must not end in {bad[1:]}"):
            a.save(tmp_path / bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rotation must be orthogonal"):
        OrthogonalAdaptor(np.ones((4, 4)), Nesting((2, 4)))
    with pytest.raises(ValueError, match="rotation must be square"):
        OrthogonalAdaptor(np.ones((4, 3)), Nesting((2, 4)))
    with pytest.raises(ValueError, match="corpus must be 2-D"):
        OrthogonalAdaptor.fit(np.ones(5))
    bad = _corpus(20)
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="corpus contain NaN"):
        OrthogonalAdaptor.fit(bad)
    with pytest.raises(ValueError, match="init must be 'pca' or 'identity', got 'svd'"):
        AdaptorConfig(init="svd")
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        AdaptorConfig(temperature=0)
    a = OrthogonalAdaptor(np.eye(4), Nesting((2, 4)))
    with pytest.raises(ValueError, match=r"x must be \[N, 4\]"):
        a.transform(np.ones((3, 5)))
    with pytest.raises(ValueError, match="ends at 8, but the embedding dim is 16"):
        OrthogonalAdaptor.fit(_corpus(), AdaptorConfig(nesting="4,8"))


def test_cli_adapt_embeddings(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _corpus(60))
    out = tmp_path / "ad"
    rc = main(
        [
            "text",
            "adapt",
            "--embeddings",
            str(tmp_path / "x.npy"),
            "--out",
            str(out),
            "--nesting",
            "4,8,16",
            "--steps",
            "3",
            "--neighbours",
            "5",
        ]
    )
    assert rc == 0
    b = OrthogonalAdaptor.load(out / "adaptor.npy")
    assert b.nesting.sizes == (4, 8, 16)
    capsys.readouterr()
    rc = main(["text", "adapt", "--embeddings", str(tmp_path / "nope.npy"), "--out",
               str(tmp_path / "new")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    # an existing folder (e.g. a fine-tuned model) is refused before fitting, untouched
    before = sorted(p.name for p in out.iterdir())
    rc = main(["text", "adapt", "--embeddings", str(tmp_path / "nope.npy"), "--out", str(out)])
    assert rc == 2 and "already exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_cli_transform_applies_the_adaptor_to_corpus_and_queries(tmp_path, capsys):
    """API embeddings: the adaptor was only usable by hand (x @ adaptor.npy); searching an
    index of rotated rows with raw queries gave recall 0 without a word."""
    x, q = _corpus(60), _corpus(70)[60:]  # [60, 16] corpus, [10, 16] queries
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q)
    ad = tmp_path / "ad"
    assert main(["text", "adapt", "--embeddings", str(tmp_path / "x.npy"), "--out", str(ad),
                 "--nesting", "4,8,16", "--steps", "3", "--neighbours", "5"]) == 0  # fmt: skip
    assert "mrl text transform --adaptor" in capsys.readouterr().out  # the hint
    rot = np.load(ad / "adaptor.npy")
    for name, v in (("x", x), ("q", q)):
        out = tmp_path / f"{name}-adapted.npy"
        assert main(["text", "transform", "--adaptor", str(ad), "--embeddings",
                     str(tmp_path / f"{name}.npy"), "--out", str(out)]) == 0  # fmt: skip
        np.testing.assert_allclose(np.load(out), v @ rot, rtol=1e-5, atol=1e-6)
        side = json.loads(out.with_suffix(".json").read_text())
        assert side["nesting"]["sizes"] == [4, 8, 16]  # what `mrl index build` reads
    capsys.readouterr()
    assert main(["text", "transform", "--adaptor", str(ad), "--embeddings",
                 str(tmp_path / "x.npy"), "--out", str(tmp_path / "x-adapted.npy")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    np.save(tmp_path / "w.npy", np.ones((3, 8), np.float32))
    assert main(["text", "transform", "--adaptor", str(ad / "adaptor.npy"), "--embeddings",
                 str(tmp_path / "w.npy"), "--out", str(tmp_path / "w2.npy")]) == 2
    assert "are 8-d, but --adaptor" in capsys.readouterr().err
    assert main(["text", "transform", "--adaptor", str(tmp_path), "--embeddings",
                 str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.npy")]) == 2
    assert "not an adaptor file or a folder holding adaptor.pt" in capsys.readouterr().err


# ---------------------------------------------------------- sample queries as pseudo-queries
def test_query_neighbours_match_brute_force():
    from mrl.text.adaptor import query_neighbours

    x, q = torch.from_numpy(_corpus(50)), torch.from_numpy(_corpus(9, seed=4))
    got = query_neighbours(q, x, 6, block=4)
    ref = (F.normalize(q, dim=-1) @ F.normalize(x, dim=-1).T).topk(6, dim=-1).indices
    assert torch.equal(got, ref)
    with pytest.raises(ValueError, match=r"neighbours must be <= number of documents \(50\)"):
        query_neighbours(q, x, 51)


def test_sample_candidates_in_query_mode():
    from mrl.text.adaptor import sample_candidates

    g = torch.Generator().manual_seed(0)
    nbrs = torch.randint(30, (7, 4), generator=g)  # 7 queries' neighbours among 30 documents
    q, cand, rows, inv = sample_candidates(nbrs, 5, 6, torch.Generator().manual_seed(1), 30)
    assert q.shape == (5,) and cand.shape == (5, 10)
    assert bool((q >= 30).all() and (q < 37).all()) and bool((cand < 30).all())
    assert torch.equal(cand[:, :4], nbrs[q - 30])
    assert torch.equal(rows[inv], torch.cat([q[:, None], cand], 1))


def _query_objective(adaptor, x, queries, nbrs):
    xn = F.normalize(torch.from_numpy(x), dim=-1)  # [N, D]
    qn = F.normalize(torch.from_numpy(queries), dim=-1)  # [Nq, D]
    full = torch.einsum("bd,bkd->bk", qn, xn[nbrs])
    y, yq = torch.from_numpy(adaptor.transform(x)), torch.from_numpy(adaptor.transform(queries))
    return listwise_prefix_loss(full, prefix_cosine(yq, y[nbrs], NEST), NEST, 0.05, 0.05).item()


def test_fit_on_sample_queries_improves_their_objective():
    from mrl.text.adaptor import query_neighbours

    x, queries = _corpus(), _corpus(80, seed=0)[::-1].copy() + 0.1 * _corpus(80, seed=7)
    cfg = dict(nesting="4,8,16", neighbours=10, random_negatives=20, batch_size=64)
    pca = OrthogonalAdaptor.fit(x, AdaptorConfig(steps=0, **cfg))
    learned = OrthogonalAdaptor.fit(x, AdaptorConfig(steps=60, lr=5e-3, **cfg), queries=queries)
    np.testing.assert_allclose(cos(learned.transform(x)), cos(x), atol=1e-5)
    torch.testing.assert_close(pca.rotation, pca_rotation(torch.from_numpy(x)))  # PCA of docs
    nbrs = query_neighbours(torch.from_numpy(queries), torch.from_numpy(x), 10)
    assert _query_objective(learned, x, queries, nbrs) < _query_objective(pca, x, queries, nbrs)
    assert learned.info["pseudo_queries"] == 80 and pca.info["pseudo_queries"] == "documents"
    with pytest.raises(ValueError, match=r"queries must be \[Nq, 16\] with Nq >= 1, got shape"):
        OrthogonalAdaptor.fit(x, AdaptorConfig(steps=1), queries=np.ones((3, 5)))
    bad = queries.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="queries contain NaN or inf"):
        OrthogonalAdaptor.fit(x, AdaptorConfig(steps=1), queries=bad)


def test_cli_adapt_with_sample_queries(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _corpus(60))
    np.save(tmp_path / "q.npy", _corpus(12, seed=3))
    (tmp_path / "q.txt").write_text("wing lift\n")
    out = tmp_path / "ad"
    args = ["text", "adapt", "--embeddings", str(tmp_path / "x.npy"), "--out", str(out)]
    args += ["--nesting", "4,8,16", "--steps", "2", "--neighbours", "5"]
    assert main(args + ["--queries", str(tmp_path / "q.npy")]) == 0
    assert json.loads((out / "adaptor.json").read_text())["pseudo_queries"] == 12
    args[args.index(str(out))] = str(tmp_path / "ad2")  # a new folder: ad is refused now
    assert main(args + ["--queries", str(tmp_path / "q.txt")]) == 2
    assert "is text: it needs --model" in capsys.readouterr().err
    assert main(args + ["--queries", str(tmp_path / "none.npy")]) == 2
    assert "--queries file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n  \n")  # checked before any encoding
    model_args = ["text", "adapt", "--model", "default", "--corpus", "cranfield", "--out",
                  str(tmp_path / "ad3"), "--queries", str(tmp_path / "empty.txt")]
    assert main(model_args) == 2
    assert "has no non-empty line" in capsys.readouterr().err


def test_more_neighbours_than_the_corpus_has_is_said():
    x = _corpus()[:12]
    with pytest.warns(UserWarning, match=r"neighbours=32 is more than the corpus offers "
                      r"\(11 per pseudo-query\); using 11"):
        OrthogonalAdaptor.fit(x, AdaptorConfig(steps=2, nesting="4,8,16", neighbours=32,
                                               random_negatives=4, batch_size=8))


def test_listwise_loss_stays_on_its_inputs_device():
    """The prefix weights are made on the loss's device (a CPU tensor broke CUDA training with
    --distill); meta tensors stand in for a GPU here."""
    full, pre = torch.randn(3, 5, device="meta"), torch.randn(3, 3, 5, device="meta")
    assert listwise_prefix_loss(full, pre, NEST, 0.05, 0.05).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_candidates_on_cuda_draw_what_cpu_draws():
    from mrl.text.adaptor import sample_candidates

    nbrs = full_neighbours(torch.from_numpy(_corpus()), 4)  # [200, 4]
    cpu = sample_candidates(nbrs, 8, 6, torch.Generator().manual_seed(1))
    gpu = sample_candidates(nbrs.cuda(), 8, 6, torch.Generator().manual_seed(1))
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and torch.equal(a, b.cpu())


def test_queries_jsonl_are_read_by_their_text_field(tmp_path):
    """--queries q.jsonl (BEIR's queries.jsonl): the 'text' fields, not the raw JSON lines."""
    from mrl.commands.text import _read_queries

    q = tmp_path / "queries.jsonl"
    q.write_text('{"_id": "q1", "text": "wing lift"}\n\n{"_id": "q2", "text": " heat  "}\n')
    assert _read_queries(str(q), None) == ["wing lift", "heat"]
    q.write_text('{"_id": "q1", "query": "wing lift"}\n')
    with pytest.raises(ValueError, match=r"queries.jsonl:1: missing field 'text'"):
        _read_queries(str(q), None)
    q.write_text('{"_id": "q1", "text": " "}\n')
    with pytest.raises(ValueError, match="has no query with a non-empty 'text'"):
        _read_queries(str(q), None)


def test_zero_rows_are_refused_or_named():
    x = _corpus(40)
    with pytest.raises(ValueError, match="corpus: every row is all zeros; nothing to fit"):
        OrthogonalAdaptor.fit(np.zeros_like(x), AdaptorConfig(steps=1))
    x[:3] = 0
    with pytest.warns(UserWarning, match=r"corpus: 3 of 40 rows are all zeros"):
        OrthogonalAdaptor.fit(x, AdaptorConfig(steps=1, neighbours=4))
