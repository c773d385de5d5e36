"""Nested heads: fast paths against plain per-prefix loops (values and gradients), and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mrl import Nesting
from mrl.heads import (
    FixedFeatureHead,
    MRLEHead,
    MRLHead,
    make_head,
    mrl_e_head_reference,
    mrl_head_reference,
    nested_linear,
)

# (nesting sizes): powers of two, D not a power of two with narrow (< 16) and wide chunks, G = 1.
NESTINGS = [(8, 16, 32, 64), (3, 7, 10), (5, 13, 37, 70), (6,), (40,)]
DTYPE_BIAS = [(torch.float64, True), (torch.float64, False), (torch.float32, True)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    return list(torch.autograd.grad(out, inputs, upstream))


def _close(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **TOL[dtype])


# --------------------------------------------------------------------------- MRL-E
@pytest.mark.parametrize("sizes", NESTINGS)
@pytest.mark.parametrize("dtype, bias", DTYPE_BIAS)
def test_mrl_e_matches_loop_values_and_gradients(sizes, dtype, bias):
    torch.manual_seed(0)
    nesting = Nesting(sizes)
    head = MRLEHead(nesting, num_classes=11, bias=bias).to(dtype)
    z = torch.randn(9, nesting.dim, dtype=dtype, requires_grad=True)
    out = head(z)
    ref = mrl_e_head_reference(z, head.weight, nesting, head.bias)
    assert out.shape == (len(sizes), 9, 11)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    params = [z, *head.parameters()]
    _close(_grads(out, params), _grads(ref, params), dtype)


def test_mrl_e_each_prefix_is_the_truncated_linear():
    torch.manual_seed(0)
    nesting = Nesting((3, 7, 10))
    head = MRLEHead(nesting, 4).double()
    z = torch.randn(5, 10, dtype=torch.float64)
    out = head(z)
    for g, m in enumerate(nesting.sizes):
        expected = z[:, :m] @ head.weight[:, :m].T + head.bias
        torch.testing.assert_close(out[g], expected)


def test_mrl_e_gradcheck():
    torch.manual_seed(0)
    nesting = Nesting((3, 7, 20))  # narrow and wide chunks: both backward paths
    z = torch.randn(2, 20, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, w, b: nested_linear(z, w, nesting, b), (z, w, b))


@pytest.mark.parametrize("which", ["z", "params"])
def test_mrl_e_partial_requires_grad(which):
    torch.manual_seed(0)
    nesting = Nesting((4, 8, 24))
    head = MRLEHead(nesting, 6).double()
    z = torch.randn(3, 24, dtype=torch.float64, requires_grad=which == "z")
    inputs = [z] if which == "z" else list(head.parameters())
    out = head(z)
    ref = mrl_e_head_reference(z, head.weight, nesting, head.bias)
    _close(_grads(out, inputs), _grads(ref, inputs), torch.float64)


def test_mrl_e_non_contiguous_input_and_empty_batch():
    torch.manual_seed(0)
    nesting = Nesting((5, 13, 37))
    head = MRLEHead(nesting, 7).double()
    z = torch.randn(37, 6, dtype=torch.float64).T.requires_grad_()  # [6, 37], column-major
    _close([head(z)], [mrl_e_head_reference(z, head.weight, nesting, head.bias)], torch.float64)
    empty = head(torch.zeros(0, 37, dtype=torch.float64))
    assert empty.shape == (3, 0, 7)


@settings(max_examples=10, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5, unique=True).map(sorted),
    batch=st.integers(1, 7),
    classes=st.integers(1, 9),
    bias=st.booleans(),
)
def test_mrl_e_random_shapes(sizes, batch, classes, bias):
    torch.manual_seed(len(sizes) + batch)
    nesting = Nesting(tuple(sizes))
    head = MRLEHead(nesting, classes, bias=bias).double()
    z = torch.randn(batch, nesting.dim, dtype=torch.float64, requires_grad=True)
    out, ref = head(z), mrl_e_head_reference(z, head.weight, nesting, head.bias)
    torch.testing.assert_close(out, ref)
    params = [z, *head.parameters()]
    _close(_grads(out, params), _grads(ref, params), torch.float64)


# --------------------------------------------------------------------------- MRL
@pytest.mark.parametrize("sizes", NESTINGS)
@pytest.mark.parametrize("dtype, bias", DTYPE_BIAS)
def test_mrl_fused_matches_loop_values_and_gradients(sizes, dtype, bias):
    torch.manual_seed(0)
    nesting = Nesting(sizes)
    head = MRLHead(nesting, num_classes=11, bias=bias).to(dtype)
    z = torch.randn(9, nesting.dim, dtype=dtype, requires_grad=True)
    out = head(z)
    biases = None if head.biases is None else list(head.biases)
    ref = mrl_head_reference(z, list(head.weights), biases)
    assert out.shape == (len(sizes), 9, 11)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    params = [z, *head.parameters()]
    _close(_grads(out, params), _grads(ref, params), dtype)


def test_mrl_heads_are_independent_and_sized_per_prefix():
    torch.manual_seed(0)
    nesting = Nesting((3, 7, 10))
    head = MRLHead(nesting, 4).double()
    assert [tuple(w.shape) for w in head.weights] == [(4, 3), (4, 7), (4, 10)]
    z = torch.randn(5, 10, dtype=torch.float64)
    out = head(z)
    for g, m in enumerate(nesting.sizes):
        torch.testing.assert_close(out[g], F.linear(z[:, :m], head.weights[g], head.biases[g]))
    loop = MRLHead(nesting, 4, fused=False).double()
    loop.load_state_dict(head.state_dict())
    torch.testing.assert_close(loop(z), out)


def test_mrl_gradcheck_and_partial_requires_grad():
    torch.manual_seed(0)
    nesting = Nesting((3, 7, 20))  # narrow and wide chunks: both backward paths
    head = MRLHead(nesting, 3).double()
    z = torch.randn(2, 20, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in head.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in head.parameters()]

    def fused(z, *params):  # the fused Function, with every weight and bias as an input
        return torch.func.functional_call(head, dict(zip(names, params)), (z,))

    assert len(params) == 6 and head.fused
    assert torch.autograd.gradcheck(fused, (z, *params))
    only_first = [head.weights[0], head.biases[2]]
    out = head(z.detach())
    ref = mrl_head_reference(z.detach(), list(head.weights), list(head.biases))
    _close(_grads(out, only_first), _grads(ref, only_first), torch.float64)


@settings(max_examples=10, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5, unique=True).map(sorted),
    batch=st.integers(1, 7),
    classes=st.integers(1, 9),
)
def test_mrl_random_shapes(sizes, batch, classes):
    torch.manual_seed(batch)
    head = MRLHead(Nesting(tuple(sizes)), classes).double()
    z = torch.randn(batch, sizes[-1], dtype=torch.float64, requires_grad=True)
    out, ref = head(z), mrl_head_reference(z, list(head.weights), list(head.biases))
    torch.testing.assert_close(out, ref)
    params = [z, *head.parameters()]
    _close(_grads(out, params), _grads(ref, params), torch.float64)


# --------------------------------------------------------------------------- FF-m, plain, make_head
def test_fixed_feature_head_reads_only_the_prefix():
    torch.manual_seed(0)
    head = FixedFeatureHead(dim=6, num_classes=3, in_dim=10).double()
    z = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    out = head(z)
    assert out.shape == (1, 4, 3) and head.nesting == Nesting((6,)) and head.in_dim == 10
    torch.testing.assert_close(out[0], head.linear(z[:, :6]))
    (grad,) = torch.autograd.grad(out.sum(), z)
    assert torch.all(grad[:, 6:] == 0) and torch.any(grad[:, :6] != 0)


@pytest.mark.parametrize(
    "mode, ff_dim, cls, G, prefixes",
    [
        ("mrl", None, MRLHead, 3, (4, 8, 12)),
        ("mrl-e", None, MRLEHead, 3, (4, 8, 12)),
        ("ff", 8, FixedFeatureHead, 1, (8,)),
        ("plain", None, FixedFeatureHead, 1, (12,)),
    ],
)
def test_make_head_modes(mode, ff_dim, cls, G, prefixes):
    head = make_head(mode, Nesting((4, 8, 12)), 5, ff_dim=ff_dim)
    assert isinstance(head, cls)
    assert head.nesting.sizes == prefixes and head.in_dim == 12
    assert head(torch.randn(2, 12)).shape == (G, 2, 5)


def test_make_head_accepts_a_sequence():
    assert make_head("mrl-e", [2, 4], 3).nesting == Nesting((2, 4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="mrle"), r"mode must be one of \[.*'plain'\], got mode='mrle'"),
        (dict(mode="ff"), "mode='ff' needs ff_dim"),
        (dict(mode="ff", ff_dim=13),
         r"ff_dim must be <= the nesting.s full size \(12\), got ff_dim=13"),
        (dict(mode="ff", ff_dim=0), "dim must be >= 1, got dim=0"),
        (dict(mode="mrl", ff_dim=4), "ff_dim is only used with mode='ff', got ff_dim=4"),
        (dict(mode="mrl", num_classes=0), "num_classes must be >= 1, got num_classes=0"),
    ],
)
def test_make_head_errors(kwargs, message):
    kwargs = {"nesting": Nesting((4, 8, 12)), "num_classes": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_head(**kwargs)


@pytest.mark.parametrize("head_cls", [MRLHead, MRLEHead])
def test_heads_reject_bad_inputs(head_cls):
    head = head_cls(Nesting((4, 8)), 3)
    with pytest.raises(ValueError, match=r"z must be 2-D \[B, D\], got shape \(2, 3, 8\)"):
        head(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"z must have 8 features \(the head's in_dim\)"):
        head(torch.randn(2, 9))
    with pytest.raises(ValueError, match="dtype"):
        head(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="z must be a torch.Tensor, got list"):
        head([[0.0] * 8])


def test_nested_linear_rejects_bad_weight_and_bias():
    n = Nesting((2, 4))
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"weight must be \[C, 4\], got shape \(5, 3\)"):
        nested_linear(z, torch.randn(5, 3), n)
    with pytest.raises(ValueError, match=r"bias must be \[5\], got shape \(4,\)"):
        nested_linear(z, torch.randn(5, 4), n, torch.randn(4))


def test_double_backward_matches_the_reference_loops():
    # A gradient penalty through the heads: second-order gradients must equal those of the plain
    # F.linear loops (the fast backward switches to differentiable ops under create_graph=True).
    n = Nesting((2, 5, 8))
    z = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda z, w, b: nested_linear(z, w, n, b), (z, w, b))
    mrl = MRLHead(n, 4).double()
    params = [*mrl.weights, *mrl.biases]

    def penalty(logits_fn):
        (gz,) = torch.autograd.grad(logits_fn().square().sum(), z, create_graph=True)
        return torch.autograd.grad(gz.square().sum(), [z, *params])

    fast = penalty(lambda: mrl(z))
    ref = penalty(lambda: mrl_head_reference(z, list(mrl.weights), list(mrl.biases)))
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r)
    fast = torch.autograd.grad(
        torch.autograd.grad(nested_linear(z, w, n, b).square().sum(), z, create_graph=True)[0]
        .square().sum(), [z, w, b])
    ref = torch.autograd.grad(
        torch.autograd.grad(mrl_e_head_reference(z, w, n, b).square().sum(), z,
                            create_graph=True)[0].square().sum(), [z, w, b])
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r)


def test_heads_have_nesting_and_state_dict_roundtrip():
    head = MRLEHead((8, 16), 4)
    clone = MRLEHead(Nesting((8, 16)), 4)
    clone.load_state_dict(head.state_dict())
    z = torch.randn(3, 16)
    torch.testing.assert_close(clone(z), head(z))
    assert "nesting=[8, 16]" in repr(head)


# bfloat16 keeps 8 significant bits: one rounding is <= 2**-9 relative (~2e-3). The fused MRL-E
# path rounds each prefix's partial sum (G = 3 roundings where the loop rounds once) and the
# gradients sum G bf16 products: a few roundings of values up to ~8 here, so rtol 1.6e-2 (torch's
# bf16 default) with atol 2e-2 for entries near 0 that come from cancelling terms.
BF16 = dict(rtol=1.6e-2, atol=2e-2)


@pytest.mark.parametrize("head_cls", [MRLHead, MRLEHead])
def test_heads_follow_autocast_like_linear(head_cls):
    torch.manual_seed(0)
    nesting = Nesting((4, 8, 16))
    head = head_cls(nesting, 5)
    z = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(z)
        expected = torch.nn.functional.linear(z[:, :4], torch.randn(5, 4))
        # the per-prefix F.linear loop, cast by autocast itself
        if head_cls is MRLHead:
            ref = mrl_head_reference(z, list(head.weights), list(head.biases))
        else:
            ref = mrl_e_head_reference(z, head.weight, nesting, head.bias)
    assert out.dtype == expected.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, **BF16)
    params = [z, *head.parameters()]
    fast, slow = _grads(out, params), _grads(ref, params)  # the same bf16 upstream gradient
    for f, r in zip(fast, slow, strict=True):
        assert f.dtype == r.dtype == torch.float32  # back to the float32 leaves
        torch.testing.assert_close(f, r, **BF16)


def test_numpy_integer_sizes_are_accepted():
    import numpy as np

    labels = np.array([0, 2, 1])
    for head in (MRLHead((2, 4), labels.max() + 1), MRLEHead((2, 4), np.int64(3)),
                 FixedFeatureHead(np.int32(2), np.int64(3), np.int64(4))):
        assert type(head.num_classes) is int and head(torch.randn(5, 4)).shape[-1] == 3
    with pytest.raises(ValueError, match="num_classes must be an integer, got num_classes=2.0"):
        MRLHead((2, 4), 2.0)


def test_nested_linear_takes_a_list_nesting():
    z, w = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(nested_linear(z, w, [4, 8]), nested_linear(z, w, Nesting((4, 8))))
