"""Core functions given inputs users pass: a centre computed from a model's output, options as
strings, weights as a string, int32 labels, soft targets that are not distributions, bf16
autocast weights, integer embeddings, and numpy / list arguments named by their parameter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrl import Nesting
from mrl.baselines import random_permutation
from mrl.evaluate import evaluate_labelled
from mrl.heads import MRLEHead, MRLHead, make_head, nested_linear
from mrl.losses import (
    MatryoshkaLoss,
    contrastive_loss,
    matryoshka_contrastive_loss,
    matryoshka_contrastive_loss_reference,
    nested_cross_entropy,
)
from mrl.metrics import precision_at_k
from mrl.probe import fit_linear_probe, probe_top1
from mrl.similarity import prefix_scores, prefix_topk

NEST = Nesting((4, 8))


def test_a_centre_that_requires_grad_is_detached():
    """center=db.mean(0) of a model's output failed cosine scoring ("out= arguments don't
    support automatic differentiation") and left dot scores attached to autograd."""
    torch.manual_seed(0)
    db = torch.randn(10, 8, requires_grad=True) * 1.0
    q = torch.randn(3, 8)
    c = db.mean(0)
    plain = prefix_scores(q, db.detach(), NEST, center=c.detach())
    np.testing.assert_allclose(prefix_scores(q, db, NEST, center=c), plain, rtol=1e-6)
    scores, idx = prefix_topk(q, db, NEST, 2, metric="dot", center=c)
    assert not scores.requires_grad
    y = torch.arange(10) % 2
    recs = evaluate_labelled(db, y, db, y, NEST, k=5, center=c, exclude_self=True)
    assert recs and all(np.isfinite(r["value"]) for r in recs)


def test_true_false_options_are_not_read_from_strings():
    torch.manual_seed(1)
    q, p = torch.randn(6, 8), torch.randn(6, 8)
    y = torch.arange(6) % 2
    for call, name in (
        (lambda: evaluate_labelled(q, y, q, y, NEST, exclude_self="no"), "exclude_self"),
        (lambda: contrastive_loss(q, p, symmetric="no"), "symmetric"),
        (lambda: matryoshka_contrastive_loss(q, p, NEST, symmetric="False"), "symmetric"),
        (lambda: MatryoshkaLoss(contrastive_loss, NEST, normalize="no"), "normalize"),
        (lambda: MRLHead(NEST, 3, bias="no"), "bias"),
        (lambda: MRLHead(NEST, 3, fused="no"), "fused"),
        (lambda: MRLEHead(NEST, 3, bias="no"), "bias"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be True or False"):
            call()


def test_weights_given_as_a_string_are_refused():
    logits, t = torch.randn(2, 4, 3), torch.tensor([0, 1, 2, 0])
    for bad in ("12", b"12"):  # read as (1, 2) and (49, 50)
        with pytest.raises(ValueError, match="weights must be a sequence of numbers"):
            nested_cross_entropy(logits, t, bad)


def test_soft_targets_must_be_distributions():
    logits = torch.randn(2, 4, 3)
    good = torch.softmax(torch.randn(4, 3), -1)
    nested_cross_entropy(logits, good)
    for bad, says in ((good * 2, "must sum to 1 per row"),
                      (good - 0.5, "finite and non-negative"),
                      (torch.full((4, 3), float("nan")), "finite and non-negative")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            nested_cross_entropy(logits, bad)


def test_bf16_autocast_keeps_the_weights_exact():
    """The weights were built in the logits' bf16: 2.6 became 2.594 (1.7e-3 relative error)."""
    torch.manual_seed(2)
    logits = torch.randn(3, 16, 5).bfloat16()
    t = torch.randint(0, 5, (16,))
    w = (0.1, 0.3, 2.6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nested_cross_entropy(logits, t, w)
    per = torch.stack([torch.nn.functional.cross_entropy(g.float(), t) for g in logits])
    want = (torch.tensor(w, dtype=torch.float32) * per).sum()
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_integer_embeddings_are_refused_by_the_loss_and_its_reference_alike():
    q, p = torch.randint(0, 5, (4, 6)), torch.randint(0, 5, (4, 6))
    for fn in (matryoshka_contrastive_loss, matryoshka_contrastive_loss_reference):
        with pytest.raises(ValueError, match="must be floating point, got dtype torch.int64"):
            fn(q, p, [2, 6])


def test_probe_takes_int32_labels_numpy_and_lists():
    torch.manual_seed(3)
    x = torch.randn(60, 8)
    y = (x[:, 0] > 0).long()
    a = fit_linear_probe(x, y, 2, max_iter=20)
    b = fit_linear_probe(x, y.int(), 2, max_iter=20)  # "expected target dtype to be Long"
    np.testing.assert_allclose(a.weight, b.weight, atol=1e-6)
    c = fit_linear_probe(x.numpy(), y.numpy(), 2, max_iter=20)
    np.testing.assert_allclose(a.weight, c.weight, atol=1e-6)
    acc = probe_top1(x, y.int(), x, y.int(), [4, 8], 2, max_iter=20)
    assert acc.shape == (2,)
    for bad in ("0.1", float("nan"), -1.0):
        with pytest.raises(ValueError, match="l2 must be a number >= 0"):
            fit_linear_probe(x, y, 2, l2=bad)


def test_other_arguments_are_named():
    with pytest.raises(ValueError, match="seed must be an integer"):
        random_permutation(4, "a")
    with pytest.raises(ValueError, match="weight must be a torch.Tensor, got ndarray"):
        nested_linear(torch.randn(2, 8), np.zeros((3, 8)), NEST)
    with pytest.raises(ValueError, match="bias must be a torch.Tensor, got list"):
        nested_linear(torch.randn(2, 8), torch.zeros(3, 8), NEST, bias=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"ff_dim must be <= the nesting's full size \(8\)"):
        make_head("ff", NEST, 3, ff_dim=16)
    with pytest.raises(ValueError, match="nesting"):
        MatryoshkaLoss(contrastive_loss, 5)
    rel = torch.tensor([[1, 0, 1, 1]], dtype=torch.bfloat16)  # numpy has no bfloat16
    assert precision_at_k(rel, 4) == pytest.approx(0.75)
