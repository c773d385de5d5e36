"""prefix_scores / prefix_topk (one pass over D, tiled) agree with the per-prefix reference loop."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mrl import Nesting
from mrl.similarity import (
    prefix_scores,
    prefix_scores_reference,
    prefix_topk,
    prefix_topk_reference,
)


def _data(q=13, n=57, d=24, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("center", [False, True])
def test_prefix_scores_match_reference(metric, center):
    q, x = _data()
    c = x.mean(0) if center else None
    n = Nesting((3, 8, 13, 24))  # odd sizes, D not a power of two
    fast = prefix_scores(q, x, n, metric, center=c)
    ref = prefix_scores_reference(q, x, n, metric, center=c)
    assert fast.shape == (4, 13, 57)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)


def test_cosine_is_renormalised_per_prefix():
    q, x = _data(q=2, n=3, d=8)
    s = prefix_scores(q, x, [2, 8])
    # at prefix 2, cosine of the truncated vectors, by hand
    a, b = q[0, :2], x[1, :2]
    assert s[0, 0, 1].item() == pytest.approx((a @ b / a.norm() / b.norm()).item())
    assert s.abs().max() <= 1 + 1e-12


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("tile_size,query_block", [(7, 4), (1000, 1024), (1, 1)])
def test_prefix_topk_matches_reference(metric, tile_size, query_block):
    q, x = _data()
    c = x.mean(0)
    n = Nesting.doubling(3, 24)
    s, i = prefix_topk(q, x, n, 5, metric, tile_size=tile_size, center=c, query_block=query_block)
    rs, ri = prefix_topk_reference(q, x, n, 5, metric, center=c)
    torch.testing.assert_close(s, rs, rtol=1e-12, atol=1e-12)
    assert torch.equal(i, ri)  # continuous random data: no ties


def test_prefix_topk_float32_agrees_up_to_ties():
    q, x = _data(q=30, n=500, d=64, dtype=torch.float32)
    n = Nesting.doubling(8, 64)
    s, i = prefix_topk(q, x, n, 10, tile_size=64)
    rs, ri = prefix_topk_reference(q, x, n, 10)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-5)
    # indices may differ only where scores (nearly) tie: the reference scores of ours match
    ref_all = prefix_scores_reference(q, x, n)
    torch.testing.assert_close(ref_all.gather(2, i), rs, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    q=st.integers(1, 6),
    n=st.integers(1, 30),
    sizes=st.lists(st.integers(2, 20), min_size=1, max_size=4, unique=True),
    k=st.integers(1, 5),
    tile=st.integers(1, 12),
    metric=st.sampled_from(["cosine", "dot"]),
    seed=st.integers(0, 1000),
)
def test_prefix_topk_random_shapes(q, n, sizes, k, tile, metric, seed):
    # sizes >= 2: at m = 1 every cosine is +-1, so indices would only agree up to ties
    sizes = sorted(sizes)
    k = min(k, n)
    qs, xs = _data(q, n, sizes[-1], seed=seed)
    s, i = prefix_topk(qs, xs, sizes, k, metric, tile_size=tile, query_block=2)
    rs, ri = prefix_topk_reference(qs, xs, sizes, k, metric)
    assert s.shape == i.shape == (len(sizes), q, k)
    torch.testing.assert_close(s, rs, rtol=1e-10, atol=1e-10)
    assert torch.equal(i, ri)


def test_numpy_in_numpy_out_and_short_nesting():
    q, x = _data()
    s, i = prefix_topk(q.numpy(), x.numpy(), [4, 12], 3)  # nesting ends below D=24: first 12 cols
    assert isinstance(s, np.ndarray) and isinstance(i, np.ndarray)
    rs, ri = prefix_topk_reference(q[:, :12], x[:, :12], [4, 12], 3)
    np.testing.assert_allclose(s, rs.numpy())
    np.testing.assert_array_equal(i, ri.numpy())
    assert isinstance(prefix_scores(q.numpy(), x.numpy(), "doubling:8"), np.ndarray)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_exclude_self_leave_one_out(metric):
    _, x = _data(n=40)
    excl = torch.arange(40)
    s, i = prefix_topk(x, x, [6, 24], 4, metric, tile_size=9, exclude=excl)
    assert not (i == excl[None, :, None]).any()
    rs, ri = prefix_topk_reference(x, x, [6, 24], 4, metric, exclude=excl)
    torch.testing.assert_close(s, rs)
    assert torch.equal(i, ri)
    # without exclusion a vector is its own nearest neighbour under cosine
    if metric == "cosine":
        _, i0 = prefix_topk(x, x, [6, 24], 1)
        assert torch.equal(i0[:, :, 0], torch.arange(40).expand(2, 40))


def test_exclude_two_per_query_and_minus_one():
    q, x = _data(q=3, n=10)
    excl = torch.tensor([[0, 1], [-1, -1], [9, -1]])
    _, i = prefix_topk(q, x, [24], 8, exclude=excl, tile_size=3)
    _, ri = prefix_topk_reference(q, x, [24], 8, exclude=excl)
    assert torch.equal(i, ri)
    assert not set(i[0, 0].tolist()) & {0, 1} and 9 not in i[0, 2].tolist()


def test_zero_vectors_score_zero_not_nan():
    q, x = _data(q=2, n=5, d=8)
    x[0, :4] = 0
    s = prefix_scores(q, x, [4, 8])
    assert torch.isfinite(s).all() and (s[0, :, 0] == 0).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=58), r"k must be <= number of database items \(57\), got k=58"),
        (dict(k=0), r"k must be >= 1, got k=0"),
        (dict(k=57, exclude=np.arange(13)), r"minus 1 excluded for one query.*k=57"),
        (dict(k=2, metric="l2"), r"metric must be one of .*'l2'"),
        (dict(k=2, tile_size=0), r"tile_size must be >= 1, got tile_size=0"),
        (dict(k=2, exclude=np.arange(5)), r"exclude must have one row per query \(13\)"),
        (dict(k=2, exclude=np.full(13, 57)), r"exclude entries must be item indices in \[0, 57\)"),
        (dict(k=2, center=np.zeros(5)), r"center must have one entry per dimension \(24\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    q, x = _data()
    with pytest.raises(ValueError, match=match):
        prefix_topk(q, x, [8, 24], **kwargs)


def test_bad_inputs():
    q, x = _data()
    bad = q.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"queries must be finite, got nan at index \(2, 5\)"):
        prefix_scores(bad, x, [24])
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"items must be finite, got inf"):
        prefix_topk(q, bad, [24], 3)
    with pytest.raises(ValueError, match=r"same dimension.*\(13, 24\).*\(57, 10\)"):
        prefix_scores(q, x[:, :10], [8])
    with pytest.raises(
        ValueError, match=r"nesting prefix 32 is larger than the embedding dimension 24"
    ):
        prefix_scores(q, x, [8, 32])
    with pytest.raises(ValueError, match=r"items must not be empty, got shape \(0, 24\)"):
        prefix_topk(q, x[:0], [24], 1)
    with pytest.raises(ValueError, match=r"queries must be 2-D"):
        prefix_scores(q[0], x, [24])
    with pytest.raises(ValueError, match=r"strictly increasing"):
        prefix_scores(q, x, [8, 8, 24])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_scored_in_float32(dtype):
    # |x|^2 = 256 * 20^2 = 102400 overflows float16 (max 65504): accumulating in the input dtype
    # gave inf norms, zero cosines and an arbitrary ranking.
    q, x = _data(q=6, n=40, d=256, dtype=torch.float32)
    q, x = (20 * q).to(dtype), (20 * x).to(dtype)
    n = Nesting.doubling(8, 256)
    s, i = prefix_topk(q, x, n, 5, tile_size=16, center=x.float().mean(0))
    rs, ri = prefix_topk_reference(q.double(), x.double(), n, 5, center=x.double().mean(0))
    assert s.dtype == torch.float32
    torch.testing.assert_close(s.double(), rs, rtol=1e-5, atol=1e-5)
    assert torch.equal(i, ri)
    full = prefix_scores(q.numpy() if dtype == torch.float16 else q, x, n, "dot")
    assert np.isfinite(np.asarray(full)).all()


def test_tensors_that_require_grad_are_scored_without_autograd():
    q, x = _data(q=3, n=9, d=8)
    s, _ = prefix_topk(q.requires_grad_(), x.requires_grad_(), [4, 8], 2)
    assert not s.requires_grad
    assert not prefix_scores(q, x, [8]).requires_grad


def test_exclude_padding_and_repeats_do_not_count_against_k():
    # -1 is "nothing" and a repeated id excludes one item: k may be N minus the real exclusions.
    q, x = _data(q=3, n=10, d=8)
    exclude = np.array([[0, -1, -1], [4, 4, -1], [-1, -1, -1]])
    s, i = prefix_topk(q, x, [4, 8], 9, exclude=exclude, tile_size=3)
    rs, ri = prefix_topk_reference(q, x, [4, 8], 9, exclude=exclude)
    assert torch.equal(i, ri) and torch.isfinite(s).all()
    assert 0 not in i[:, 0].flatten().tolist() and 4 not in i[:, 1].flatten().tolist()
    with pytest.raises(ValueError, match=r"\(10 minus 2 excluded for one query\), got k=9"):
        prefix_topk(q, x, [8], 9, exclude=np.array([[0, 1], [2, -1], [-1, -1]]))


def test_float64_queries_against_float32_items_are_scored_in_float64():
    q, x = _data(q=5, n=40, d=16)
    x32 = x.float()
    s, _ = prefix_topk(q, x32, [4, 16], 3, tile_size=7)
    rs, _ = prefix_topk_reference(q, x32.double(), [4, 16], 3)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, rs, rtol=1e-12, atol=1e-12)
