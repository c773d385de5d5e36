"""Matryoshka losses against hand-written weighted sums (values and gradients), and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mrl import Nesting
from mrl.heads import MRLEHead, mrl_e_head_reference
from mrl.losses import (
    MatryoshkaLoss,
    contrastive_loss,
    matryoshka_contrastive_loss,
    matryoshka_contrastive_loss_reference,
    nested_cross_entropy,
)

F64 = torch.float64


def _rand(*shape, seed=0, dtype=F64, grad=True):
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


def _assert_same(a, b, inputs, **tol):
    torch.testing.assert_close(a, b, **tol)
    ga = torch.autograd.grad(a, inputs, retain_graph=True)
    gb = torch.autograd.grad(b, inputs, retain_graph=True)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, **tol)


# --------------------------------------------------------------------------- nested cross-entropy
def _ce_by_hand(logits, targets, weights, eps=0.0):
    """sum_g w_g * mean_b [ -(1-eps) log p(y_b) - eps/C sum_c log p(c) ], written out."""
    G, B, C = logits.shape
    total = logits.new_zeros(())
    for g in range(G):
        logp = logits[g] - torch.logsumexp(logits[g], dim=1, keepdim=True)
        nll = -logp[torch.arange(B), targets]
        smooth = -logp.mean(1)
        total = total + weights[g] * ((1 - eps) * nll + eps * smooth).mean()
    return total


@pytest.mark.parametrize("weights", [None, (1.0, 0.5, 2.0), Nesting((2, 3, 5), (0.0, 1.0, 3.0))])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_nested_cross_entropy_is_the_weighted_sum(weights, eps):
    logits = _rand(3, 6, 4)
    targets = torch.tensor([0, 3, 1, 1, 2, 0])
    w = [1.0] * 3 if weights is None else getattr(weights, "weights", weights)
    got = nested_cross_entropy(logits, targets, weights, label_smoothing=eps)
    _assert_same(got, _ce_by_hand(logits, targets, w, eps), [logits])


def test_nested_cross_entropy_reductions_and_soft_targets():
    logits = _rand(2, 5, 3)
    targets = torch.tensor([0, 2, 1, 1, 0])
    per = nested_cross_entropy(logits, targets, (1.0, 2.0), reduction="none")
    expected = F.cross_entropy(logits[0], targets, reduction="none") + 2 * F.cross_entropy(
        logits[1], targets, reduction="none")
    torch.testing.assert_close(per, expected)
    torch.testing.assert_close(nested_cross_entropy(logits, targets, (1.0, 2.0), reduction="sum"),
                               expected.sum())
    soft = F.one_hot(targets, 3).to(F64)
    torch.testing.assert_close(nested_cross_entropy(logits, soft),
                               nested_cross_entropy(logits, targets))


def test_nested_cross_entropy_on_mrl_e_head_gradients_match_reference():
    torch.manual_seed(0)
    nesting = Nesting((3, 8, 19))
    head = MRLEHead(nesting, 5).double()
    z = _rand(7, 19)
    y = torch.randint(0, 5, (7,))
    fast = nested_cross_entropy(head(z), y, nesting, label_smoothing=0.1)
    ref = nested_cross_entropy(mrl_e_head_reference(z, head.weight, nesting, head.bias), y, nesting,
                               label_smoothing=0.1)
    _assert_same(fast, ref, [z, head.weight, head.bias])


@pytest.mark.parametrize(
    "logits, targets, kwargs, message",
    [
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), {},
         r"logits must be 3-D \[G, B, C\], got \(4, 3\)"),
        (torch.zeros(2, 4, 3), torch.zeros(5, dtype=torch.long), {},
         r"targets \(class indices\) must have shape \[4\] to match logits \[2, 4, 3\], got \[5\]"),
        (torch.zeros(2, 4, 3), torch.zeros(4, 2), {},
         r"targets \(class probabilities\) must have shape \[4, 3\]"),
        (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long), {"weights": (1.0, 2.0, 3.0)},
         r"weights must have one entry per prefix \(G=2\), got 3"),
        (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long), {"weights": (1.0, -1.0)},
         "weights must be finite and non-negative"),
        (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long), {"label_smoothing": 1.0},
         r"label_smoothing must be in \[0, 1\), got label_smoothing=1.0"),
        (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long), {"label_smoothing": -0.1},
         r"label_smoothing must be in \[0, 1\), got label_smoothing=-0.1"),
        (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long), {"reduction": "avg"},
         r"reduction must be one of \['mean', 'sum', 'none'\], got 'avg'"),
        (torch.zeros(2, 0, 3), torch.zeros(0, dtype=torch.long), {},
         r"logits must have a prefix and a batch \(G, B >= 1\), got shape \(2, 0, 3\)"),
        (torch.zeros(2, 4, 3), torch.tensor([0, 1, 3, 2]), {},
         r"targets must be class indices in \[0, 3\), got values in \[0, 3\]"),
        (torch.zeros(2, 4, 3), torch.tensor([0, -1, 1, 2]), {},
         r"targets must be class indices in \[0, 3\), got values in \[-1, 2\]"),
        (torch.zeros(2, 4, 3), [0, 1, 2, 0], {}, "targets must be a torch.Tensor, got list"),
        (torch.zeros(2, 4, 3), torch.ones(4, dtype=torch.bool), {},
         "targets must be integer class indices or float probabilities, got dtype torch.bool"),
        (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long), {"weights": (0.0, 0.0)},
         r"weights must not all be zero, got \[0.0, 0.0\]"),
        (torch.zeros(2, 4, 1), torch.zeros(4, dtype=torch.long), {},
         r"logits must have C >= 2 classes, got shape \(2, 4, 1\)"),
    ],
)
def test_nested_cross_entropy_errors(logits, targets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        nested_cross_entropy(logits, targets, **kwargs)


def test_nested_cross_entropy_takes_any_integer_dtype():
    logits = torch.randn(2, 5, 4)
    y = torch.tensor([0, 3, 1, 2, 3])
    ref = nested_cross_entropy(logits, y)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(nested_cross_entropy(logits, y.to(dtype)), ref)


# --------------------------------------------------------------------------- contrastive
def _infonce_by_hand(q, p, negs, tau, symmetric):
    """Row by row: -log softmax(cos(q_i, [p_1..p_B, negs]) / tau)[i]; symmetric adds p -> q."""
    cands = p if negs is None else torch.cat([p, negs.reshape(-1, q.shape[1])])
    B = q.shape[0]

    def cos(a, b):
        return (a @ b) / (a.norm() * b.norm())

    fwd = 0.0
    for i in range(B):
        s = torch.stack([cos(q[i], c) for c in cands]) / tau
        fwd = fwd - (s[i] - torch.logsumexp(s, 0))
    fwd = fwd / B
    if not symmetric:
        return fwd
    back = 0.0
    for i in range(B):
        s = torch.stack([cos(p[i], q[j]) for j in range(B)]) / tau
        back = back - (s[i] - torch.logsumexp(s, 0))
    return 0.5 * (fwd + back / B)


@pytest.mark.parametrize("neg_shape", [None, (4, 2, 6), (3, 6)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_contrastive_loss_matches_hand_written(neg_shape, symmetric):
    q, p = _rand(4, 6, seed=1), _rand(4, 6, seed=2)
    negs = None if neg_shape is None else _rand(*neg_shape, seed=3)
    inputs = [q, p] + ([] if negs is None else [negs])
    got = contrastive_loss(q, p, negs, temperature=0.1, symmetric=symmetric)
    _assert_same(got, _infonce_by_hand(q, p, negs, 0.1, symmetric), inputs)


def test_contrastive_loss_is_scale_invariant_and_low_for_matching_pairs():
    q = _rand(5, 8, grad=False)
    assert torch.allclose(contrastive_loss(q, 3 * q), contrastive_loss(q, q))
    assert float(contrastive_loss(q, q, temperature=0.01)) < 1e-3


@pytest.mark.parametrize("sizes", [(4, 8, 16), (3, 7, 10), (5,), (6, 13, 37)])
@pytest.mark.parametrize("neg_shape", [None, "per-query", "shared"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matryoshka_contrastive_matches_loop(sizes, neg_shape, symmetric):
    D = sizes[-1]
    nesting = Nesting(sizes, tuple(float(i + 1) for i in range(len(sizes))))
    q, p = _rand(5, D, seed=1), _rand(5, D, seed=2)
    negs = {None: None, "per-query": _rand(5, 2, D, seed=3), "shared": _rand(3, D, seed=4)}
    negs = negs[neg_shape]
    inputs = [q, p] + ([] if negs is None else [negs])
    got = matryoshka_contrastive_loss(q, p, nesting, negs, temperature=0.07, symmetric=symmetric)
    ref = matryoshka_contrastive_loss_reference(q, p, nesting, negs, 0.07, symmetric)
    _assert_same(got, ref, inputs)
    by_hand = sum(w * contrastive_loss(q[:, :m], p[:, :m], None if negs is None else negs[..., :m],
                                       0.07, symmetric)
                  for m, w in zip(nesting.sizes, nesting.weights))
    torch.testing.assert_close(got, by_hand)


def test_matryoshka_contrastive_zero_prefix_is_finite_like_f_normalize():
    nesting = Nesting((4, 8, 12))
    q, p = _rand(3, 12, seed=1, grad=False), _rand(3, 12, seed=2)
    q[0, :8] = 0.0  # row 0 is all zeros at prefixes 4 and 8
    q.requires_grad_()
    got = matryoshka_contrastive_loss(q, p, nesting)
    ref = matryoshka_contrastive_loss_reference(q, p, nesting)
    assert torch.isfinite(got)
    _assert_same(got, ref, [q, p])


def test_matryoshka_contrastive_float32():
    nesting = Nesting.doubling(8, 96)
    q, p = _rand(16, 96, seed=1, dtype=torch.float32), _rand(16, 96, seed=2, dtype=torch.float32)
    got = matryoshka_contrastive_loss(q, p, nesting)
    ref = matryoshka_contrastive_loss_reference(q, p, nesting)
    _assert_same(got, ref, [q, p], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matryoshka_contrastive_half_precision_large_norms(dtype):
    # Embeddings of norm ~320 (unnormalised model outputs): sums of squares overflow float16, and
    # a zero prefix's eps**2 underflows to 0; both used to give a NaN loss or NaN gradients.
    nesting = Nesting.doubling(8, 256)
    q64, p64 = 20 * _rand(8, 256, seed=1, grad=False), 20 * _rand(8, 256, seed=2, grad=False)
    zero = q64.clone()
    zero[0, :16] = 0.0  # (its gradient is ~1/eps, as F.normalize's: not representable in half)
    assert torch.isfinite(matryoshka_contrastive_loss(zero.to(dtype), p64.to(dtype), nesting))
    q, p = q64.to(dtype).requires_grad_(), p64.to(dtype).requires_grad_()
    got = matryoshka_contrastive_loss(q, p, nesting)
    ref = matryoshka_contrastive_loss_reference(q.double(), p.double(), nesting)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    got.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(p.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast cannot push it back to half
        again = matryoshka_contrastive_loss(q, p, nesting)
    torch.testing.assert_close(again, got)
    plain = contrastive_loss(q, p)
    torch.testing.assert_close(plain.double(), contrastive_loss(q.double(), p.double()),
                               rtol=1e-4, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4, unique=True).map(sorted),
    batch=st.integers(1, 6),
    symmetric=st.booleans(),
    n_neg=st.integers(0, 2),
)
def test_matryoshka_contrastive_random_shapes(sizes, batch, symmetric, n_neg):
    D = sizes[-1]
    q, p = _rand(batch, D, seed=batch), _rand(batch, D, seed=batch + 1)
    negs = _rand(batch, n_neg, D, seed=7) if n_neg else None
    inputs = [q, p] + ([negs] if negs is not None else [])
    got = matryoshka_contrastive_loss(q, p, sizes, negs, symmetric=symmetric)
    ref = matryoshka_contrastive_loss_reference(q, p, sizes, negs, symmetric=symmetric)
    _assert_same(got, ref, inputs)


def test_contrastive_errors():
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature must be a positive finite number, got "
                                         "temperature=0"):
        contrastive_loss(q, p, temperature=0)
    with pytest.raises(ValueError, match="temperature=-1.0"):
        matryoshka_contrastive_loss(q, p, (4, 8), temperature=-1.0)
    with pytest.raises(ValueError, match=r"positives must have the shape of queries \(4, 8\), got "
                                         r"\(3, 8\)"):
        contrastive_loss(q, p[:3])
    with pytest.raises(ValueError, match=r"queries must be 2-D \[B, D\], got shape \(4, 2, 4\)"):
        contrastive_loss(q.view(4, 2, 4), p.view(4, 2, 4))
    with pytest.raises(ValueError, match=r"queries have dimension 8 \(shape \(4, 8\)\), but the "
                                         r"nesting expects 16"):
        matryoshka_contrastive_loss(q, p, (4, 16))
    with pytest.raises(ValueError, match=r"negatives \[B, n, D\] must have B=4 rows like queries"):
        contrastive_loss(q, p, torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match=r"negatives must be \[B, n, D\] or \[M, D\]"):
        contrastive_loss(q, p, torch.randn(8))
    with pytest.raises(ValueError, match=r"queries must not be empty, got shape \(0, 8\)"):
        contrastive_loss(q[:0], p[:0])
    bad = q.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"queries contain NaN or inf values \(shape \(4, 8\)\)"):
        matryoshka_contrastive_loss(bad, p, (4, 8))
    p_inf = p.clone()
    p_inf[0, 0] = math.inf
    with pytest.raises(ValueError, match="positives contain NaN or inf"):
        contrastive_loss(q, p_inf)
    assert not torch.isfinite(contrastive_loss(bad, p, check_finite=False))


# --------------------------------------------------------------------------- MatryoshkaLoss
def _pair_mse(a, b, target_scale):
    """A user loss of two embeddings and one target."""
    return ((a - target_scale * b) ** 2).mean()


@pytest.mark.parametrize("normalize", [False, True])
def test_matryoshka_loss_wraps_any_loss(normalize):
    nesting = Nesting((2, 5, 9), (1.0, 0.25, 2.0))
    a, b = _rand(3, 4, 9, seed=1), _rand(3, 4, 9, seed=2)  # leading dims are kept: [..., D]
    got = MatryoshkaLoss(_pair_mse, nesting, normalize=normalize)([a, b], 0.5)
    by_hand = 0.0
    for m, w in zip(nesting.sizes, nesting.weights):
        x, y = a[..., :m], b[..., :m]
        if normalize:
            x, y = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
        by_hand = by_hand + w * _pair_mse(x, y, 0.5)
    _assert_same(got, by_hand, [a, b])


def test_matryoshka_loss_single_tensor_targets_and_per_prefix():
    nesting = Nesting((3, 6))
    z = _rand(5, 6)
    y = torch.tensor([0, 1, 0, 1, 1])

    def center_loss(emb, labels, margin=0.0):
        return (emb.pow(2).sum(-1) * (labels + 1) + margin).mean()

    loss = MatryoshkaLoss(center_loss, nesting)
    per = loss.per_prefix(z, y, margin=1.0)
    assert per.shape == (2,)
    torch.testing.assert_close(per[0], center_loss(z[:, :3], y, margin=1.0))
    torch.testing.assert_close(loss(z, y, margin=1.0), per.sum())


def test_matryoshka_loss_with_contrastive_equals_one_pass_version():
    nesting = Nesting((4, 8, 16))
    q, p = _rand(6, 16, seed=1), _rand(6, 16, seed=2)
    wrapped = MatryoshkaLoss(contrastive_loss, nesting)([q, p], None, 0.05, True)
    _assert_same(wrapped, matryoshka_contrastive_loss(q, p, nesting, symmetric=True), [q, p])


@pytest.mark.parametrize("symmetric", [False, True])
def test_learned_temperature_gradient_matches_the_reference(symmetric):
    """d loss / d temperature (and the embeddings' gradients) through the one-pass loss equal
    those through the per-prefix loop of `contrastive_loss`, with hard negatives."""
    q, p, neg = _rand(5, 8, seed=1), _rand(5, 8, seed=2), _rand(5, 2, 8, seed=3)
    nesting = Nesting((2, 4, 8), (1.0, 0.5, 2.0))
    t = torch.tensor(0.07, dtype=F64, requires_grad=True)
    got = matryoshka_contrastive_loss(q, p, nesting, neg, temperature=t, symmetric=symmetric)
    ref = matryoshka_contrastive_loss_reference(q, p, nesting, neg, temperature=t,
                                                symmetric=symmetric)
    _assert_same(got, ref, [t, q, p, neg])
    # and the reference's d loss / d t against a central difference (float64)
    (gt,) = torch.autograd.grad(ref, t)
    h = 1e-6
    with torch.no_grad():
        up, down = (matryoshka_contrastive_loss_reference(
            q, p, nesting, neg, temperature=t + d, symmetric=symmetric) for d in (h, -h))
    torch.testing.assert_close(gt, (up - down) / (2 * h), rtol=1e-6, atol=1e-8)


def test_matryoshka_loss_errors():
    nesting = Nesting((4, 8))
    loss = MatryoshkaLoss(_pair_mse, nesting)
    a = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"embeddings\[1\] have dimension 7 \(shape \(3, 7\)\), "
                                         r"but the nesting expects 8"):
        loss([a, torch.randn(3, 7)], 1.0)
    with pytest.raises(ValueError, match="embeddings must be a tensor or a non-empty sequence"):
        loss([], 1.0)
    with pytest.raises(ValueError, match=r"embeddings must not be empty, got shape \(0, 8\)"):
        MatryoshkaLoss(lambda e: e.sum(), nesting)(a[:0])
    bad = a.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"embeddings\[0\] contain NaN or inf"):
        loss([bad, a], 1.0)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor, got \(3,\) at "
                                         r"prefix 4"):
        MatryoshkaLoss(lambda e: e.sum(-1), nesting)(a)
    with pytest.raises(ValueError, match="loss_fn must be callable, got 3"):
        MatryoshkaLoss(3, nesting)


def test_temperature_as_numpy_scalar_or_learned_tensor():
    import numpy as np

    q, p = _rand(4, 8, seed=1), _rand(4, 8, seed=2)
    want = matryoshka_contrastive_loss(q, p, [4, 8], temperature=0.05)
    torch.testing.assert_close(
        matryoshka_contrastive_loss(q, p, [4, 8], temperature=np.float32(0.05)), want)
    t = torch.tensor(0.05, dtype=F64, requires_grad=True)  # a learned temperature
    got = matryoshka_contrastive_loss(q, p, [4, 8], temperature=t)
    torch.testing.assert_close(got, want)
    got.backward()
    assert t.grad is not None and torch.isfinite(t.grad)
    for bad in (torch.tensor(-1.0), torch.tensor([0.1, 0.2]), True, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            contrastive_loss(q, p, temperature=bad)
