"""Linear probe against scikit-learn's logistic regression; PCA / random baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrl import Nesting
from mrl.probe import baseline_features, fit_linear_probe, probe_top1


def _blobs(n=300, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(c, d, generator=g)
    y = torch.arange(n) % c
    return centers[y] + torch.randn(n, d, generator=g), y


def test_probe_matches_sklearn_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs()
    l2 = 1e-2
    probe = fit_linear_probe(x, y, 3, l2=l2, max_iter=500, tol=1e-9)
    xs = ((x - probe.mean) / probe.std).numpy()
    # sklearn minimises C * sum(CE) + ||W||^2 / 2  <=>  mean(CE) + l2/2 ||W||^2 with C = 1/(N l2).
    ref = sklearn.LogisticRegression(C=1 / (len(x) * l2), tol=1e-10, max_iter=5000).fit(
        xs, y.numpy()
    )
    ours = torch.softmax(probe.logits(x), -1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(xs), atol=2e-3)


def test_probe_top1_per_prefix():
    x, y = _blobs(d=8)
    acc = probe_top1(x, y, x, y, Nesting((2, 4, 8)), 3)
    assert acc.shape == (3,) and acc[-1] > 90


def test_probe_errors():
    x, y = _blobs()
    with pytest.raises(ValueError, match="num_classes=2 but labels go up to 2"):
        fit_linear_probe(x, y, 2)
    with pytest.raises(ValueError, match="l2 must be a number >= 0"):
        fit_linear_probe(x, y, 3, l2=-1)
    with pytest.raises(ValueError, match="kind must be 'pca' or 'random'"):
        baseline_features(x, x, "svd")
    with pytest.raises(ValueError, match=r"y must hold class labels in \[0, num_classes\), got -1"):
        fit_linear_probe(x, y - 1, 3)  # was an IndexError deep in cross_entropy
    with pytest.raises(ValueError, match="y must hold integer class labels, got dtype"):
        fit_linear_probe(x, y.float(), 3)


def test_pca_baseline_orders_by_variance_and_random_permutes():
    x, _ = _blobs(d=6)
    x = x * torch.tensor([1.0, 5, 1, 1, 3, 1])
    db, q = baseline_features(x, x[:10], "pca")
    var = db.var(0)
    assert torch.all(var[:-1] >= var[1:] - 1e-4)
    assert torch.allclose(db[:10], q, atol=1e-5)
    rdb, rq = baseline_features(x, x[:10], "random", seed=3)
    assert sorted(rdb[0].tolist()) == sorted(x[0].tolist())
    assert torch.equal(rdb[:10], rq)


def test_a_probe_fit_on_one_row_predicts_its_class():
    """One row: its sample std was NaN, and so was every prediction (a RuntimeError in L-BFGS)."""
    probe = fit_linear_probe(torch.tensor([[1.0, 2.0]]), torch.tensor([1]), 3, device="cpu")
    assert probe.predict(torch.tensor([[1.0, 2.0], [0.0, 0.0]])).tolist() == [1, 1]
    with pytest.raises(ValueError, match="x must be finite"):
        fit_linear_probe(torch.tensor([[float("nan"), 2.0], [1.0, 1.0]]), torch.tensor([1, 0]),
                         3, device="cpu")


def test_random_coordinates_follow_the_runs_seed():
    """The random-coordinate baseline used permutation seed 0 for every seed, under records
    labelled with the run's seed."""
    from types import SimpleNamespace

    from mrl.baselines import random_features
    from mrl.commands.eval import RunEmbeddings, evaluate_embeddings

    g = torch.Generator().manual_seed(0)
    db, test = torch.randn(60, 8, generator=g), torch.randn(20, 8, generator=g)
    db_y, test_y = torch.arange(60) % 3, torch.arange(20) % 3
    nest = Nesting((2, 4, 8))

    def random_1nn(seed: int) -> list[float]:
        e = RunEmbeddings(None, "plain", nest, Nesting((8,)), 3, db, db_y, test, test_y,
                          torch.zeros(1, 20, 3), config=SimpleNamespace(seed=seed))
        recs = evaluate_embeddings(e, probe_iter=5, seed=seed)
        return [r["value"] for r in recs if r["method"] == "random" and r["metric"] == "1nn"]

    def by_hand(seed: int) -> list[float]:
        xd, xt = random_features(db, seed), random_features(test, seed)
        out = []
        for m in nest.sizes:
            a = torch.nn.functional.normalize(xt[:, :m], dim=1)
            b = torch.nn.functional.normalize(xd[:, :m], dim=1)
            out.append(100.0 * float((db_y[(a @ b.T).argmax(1)] == test_y).float().mean()))
        return out

    for seed in (0, 1, 5):
        assert random_1nn(seed) == pytest.approx(by_hand(seed))
    assert by_hand(0) != by_hand(1)  # the seeds really give other coordinates here
    # without a run config (an API caller's embeddings) the records' seed is the draw's
    e = RunEmbeddings(None, "plain", nest, Nesting((8,)), 3, db, db_y, test, test_y,
                      torch.zeros(1, 20, 3))
    recs = evaluate_embeddings(e, probe_iter=5, seed=1)
    rand = [r for r in recs if r["method"] == "random"]
    assert [r["value"] for r in rand if r["metric"] == "1nn"] == pytest.approx(by_hand(1))
    assert all(r["coords_seed"] == 1 for r in rand)  # recorded: a cache can tell the draws


def test_reproduce_re_evaluates_random_rows_cached_before_they_followed_the_seed():
    from mrl.commands.reproduce import _stale_random_rows

    old = [{"method": "random", "prefix": 2, "metric": "1nn", "value": 50.0, "seed": 1}]
    assert _stale_random_rows(old, seed=1)
    assert not _stale_random_rows(old, seed=0)  # seed 0 drew permutation 0
    assert not _stale_random_rows([{**old[0], "coords_seed": 1}], seed=1)
