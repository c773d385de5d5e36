"""torch.func transforms (per-sample gradients, Jacobians) through the fused heads and losses,
the autocast query on torch < 2.4, and the per-step prefix weights (no host work after the
first step)."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from mrl import Nesting
from mrl.heads import MRLEHead, MRLHead, _autocast_dtype
from mrl.losses import matryoshka_contrastive_loss, nested_cross_entropy, prefix_weights

N = Nesting((4, 8, 16))


@pytest.mark.parametrize("head_cls", [MRLHead, MRLEHead])
def test_per_sample_gradients_match_a_loop(head_cls):
    torch.manual_seed(0)
    head = head_cls(N, 3)
    z, y = torch.randn(5, 16), torch.randint(0, 3, (5,))
    params = {k: v.detach() for k, v in head.named_parameters()}

    def loss_fn(p, x, t):
        return nested_cross_entropy(functional_call(head, p, (x[None],)), t[None], N)

    per_sample = vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, z, y)
    for i in range(5):
        head.zero_grad()
        nested_cross_entropy(head(z[i : i + 1]), y[i : i + 1], N).backward()
        for name, p in head.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-5, atol=1e-6)


def test_vmap_of_heads_and_grad_of_contrastive_loss():
    torch.manual_seed(1)
    head = MRLEHead(N, 3)
    z = torch.randn(5, 16)
    torch.testing.assert_close(vmap(lambda x: head(x[None])[:, 0])(z), head(z).transpose(0, 1))
    q, p = torch.randn(6, 16), torch.randn(6, 16)
    g = grad(lambda q: matryoshka_contrastive_loss(q, p, N))(q)
    q2 = q.clone().requires_grad_()
    matryoshka_contrastive_loss(q2, p, N).backward()
    torch.testing.assert_close(g, q2.grad)


def test_autocast_dtype_on_torch_before_2_4():
    """torch < 2.4: is_autocast_enabled() takes no device type, get_autocast_dtype is missing."""
    real = torch.is_autocast_enabled

    def old_is_enabled(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments")
        return real("cuda")

    def old_api():  # torch.autocast itself uses the new API: patch inside its context
        m = pytest.MonkeyPatch()
        m.setattr(torch, "is_autocast_enabled", old_is_enabled)
        m.delattr(torch, "get_autocast_dtype")
        return m

    m = old_api()
    assert _autocast_dtype("cpu") is None
    m.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = old_api()
        try:
            assert _autocast_dtype("cpu") == torch.bfloat16
        finally:
            m.undo()


def test_prefix_weights_checked_once_and_cached():
    like = torch.zeros(1)
    a = prefix_weights([1, 2, 3], 3, like)
    assert a is prefix_weights((1.0, 2.0, 3.0), 3, like)  # built once, then reused
    assert a.tolist() == [1.0, 2.0, 3.0]
    for bad, msg in (([1, 2], "one entry per prefix"), ([1, float("nan"), 1], "finite"),
                     ([0, 0, 0], "all be zero"), ("abc", "sequence of numbers")):
        with pytest.raises(ValueError, match=msg):
            prefix_weights(bad, 3, like)
    with pytest.raises(ValueError, match="non-negative"):
        prefix_weights(torch.tensor([1.0, -1.0, 1.0]), 3, like)
    assert prefix_weights(N.with_weights([1, 1, 2]), 3, like).tolist() == [1.0, 1.0, 2.0]


def test_contrastive_input_errors_name_the_inputs():
    from mrl.losses import contrastive_loss

    q = torch.randn(4, 16)
    with pytest.raises(ValueError, match="positives must have the dtype of queries"):
        matryoshka_contrastive_loss(q, q.double(), N)
    with pytest.raises(ValueError, match="negatives must have the dtype of queries"):
        matryoshka_contrastive_loss(q, q, N, negatives=torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="negatives have dimension 15.*queries' shape expects 16"):
        contrastive_loss(q, q, negatives=torch.randn(2, 15))


def test_soft_targets_follow_the_logits_dtype():
    logits = torch.randn(3, 4, 5, requires_grad=True)
    soft = torch.softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    loss = nested_cross_entropy(logits, soft, N)
    assert loss.dtype == torch.float32
    ref = sum(torch.nn.functional.cross_entropy(logits[g], soft.float()) for g in range(3))
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("weights", [None, (1.0, 0.5, 2.0)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_targets_with_label_smoothing_match_a_per_prefix_loop(
    weights, label_smoothing, reduction
):
    """One cross-entropy call over all prefixes vs a loop of F.cross_entropy per prefix with
    the same soft targets and smoothing: values and gradients (logits and the targets)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    soft = torch.softmax(torch.randn(4, 5, dtype=torch.float64, generator=gen), -1)
    soft.requires_grad_()
    w = weights or (1.0, 1.0, 1.0)
    got = nested_cross_entropy(logits, soft, weights, label_smoothing=label_smoothing,
                               reduction=reduction)
    per = [F.cross_entropy(logits[g], soft, label_smoothing=label_smoothing, reduction="none")
           for g in range(3)]  # [B] each
    ref = sum(wg * p for wg, p in zip(w, per))  # [B]
    ref = {"mean": ref.mean(), "sum": ref.sum(), "none": ref}[reduction]
    torch.testing.assert_close(got, ref)
    up = torch.randn(got.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(got, [logits, soft], up),
                    torch.autograd.grad(ref, [logits, soft], up), strict=True):
        torch.testing.assert_close(a, b)


def test_weights_first_used_under_inference_mode_still_train():
    """The cached weights tensor must not be an inference tensor (validation loss first)."""
    weights = [1.0, 1.0, 3.0]  # a combination no other test caches first
    with torch.inference_mode():
        nested_cross_entropy(torch.randn(3, 4, 5), torch.randint(0, 5, (4,)), weights)
    logits = torch.randn(3, 4, 5, requires_grad=True)
    nested_cross_entropy(logits, torch.randint(0, 5, (4,)), weights).backward()
    assert logits.grad is not None


def test_contrastive_loss_takes_mixed_dtypes_under_autocast():
    gen = torch.Generator().manual_seed(0)
    q32, p = torch.randn(4, 16, generator=gen), torch.randn(4, 16, generator=gen)
    q = q32.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = matryoshka_contrastive_loss(q, p, N)  # fp32 cached positives
    assert loss.dtype == torch.float32
    # bf16 keeps 8 significant bits: rounding the queries moves the loss by ~4e-4 relative here,
    # within torch's bf16 tolerance (rtol 1.6e-2)
    torch.testing.assert_close(loss, matryoshka_contrastive_loss(q32, p, N), rtol=1.6e-2,
                               atol=1e-5)
    # the scores are computed in float32 (bf16 widens exactly): the float32 value of the
    # bf16-rounded queries, and its gradient rounded once to bf16 (<= 2**-9 relative)
    qf = q.detach().float().requires_grad_()
    ref = matryoshka_contrastive_loss(qf, p, N)
    torch.testing.assert_close(loss, ref)
    (g,), (g_ref,) = torch.autograd.grad(loss, q), torch.autograd.grad(ref, qf)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), g_ref, rtol=2**-8, atol=1e-6)


def test_nesting_coerce_refuses_bytes():
    with pytest.raises(ValueError, match="got bytes"):
        Nesting.coerce(b"\x08\x10")
