"""Fast paths against plain loops written here, on the inputs their own tests did not cover:
non-contiguous and transposed tensors, soft targets with every reduction, empty negatives,
half-precision gradients (values AND gradients, as the project's standard asks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mrl import Nesting
from mrl.heads import MRLEHead, MRLHead, nested_linear
from mrl.losses import matryoshka_contrastive_loss, nested_cross_entropy

NEST = Nesting((2, 4, 12, 20))  # chunks of width 2, 2, 8, 8 (and 20 > 16: both backward paths)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Gradients of <out, R> for a fixed random R (every output element weighted differently)."""
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return list(torch.autograd.grad((out * r).sum(), inputs))


def _layouts(b: int, d: int) -> dict[str, torch.Tensor]:
    """The same [b, d] values as contiguous, transposed-then-back and strided tensors."""
    base = torch.randn(b, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    wide = torch.zeros(b, 2 * d, dtype=torch.float64)
    wide[:, ::2] = base
    return {"contiguous": base.clone(), "transposed": base.t().contiguous().t(),
            "strided": wide[:, ::2]}  # fmt: skip


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_mrl_e_head_on_any_layout_matches_a_loop(layout):
    head = MRLEHead(NEST, num_classes=5).double()
    z = _layouts(6, 20)[layout].requires_grad_(True)
    w = head.weight.detach().t().contiguous().t().requires_grad_(True)  # a transposed weight
    b = head.bias.detach().clone().requires_grad_(True)
    fast = nested_linear(z, w, NEST, b)  # [G, B, C]
    loop = torch.stack([z[:, :m] @ w[:, :m].T + b for m in NEST.sizes])
    torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)
    for gf, gl in zip(_grads(fast, [z, w, b]), _grads(loop, [z, w, b])):
        torch.testing.assert_close(gf, gl, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_mrl_head_on_any_layout_matches_a_loop(layout):
    head = MRLHead(NEST, num_classes=5).double()
    z = _layouts(6, 20)[layout].requires_grad_(True)
    params = [z, *head.weights, *head.biases]
    fast = head(z)
    loop = torch.stack([z[:, :m] @ w.T + b
                        for m, w, b in zip(NEST.sizes, head.weights, head.biases)])  # fmt: skip
    torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)
    for gf, gl in zip(_grads(fast, params), _grads(loop, params)):
        torch.testing.assert_close(gf, gl, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_nested_cross_entropy_soft_targets_values_and_gradients(reduction, smoothing):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    soft = torch.softmax(torch.randn(7, 4, dtype=torch.float64, generator=g), -1)
    weights = [0.5, 1.0, 2.0]
    fast = nested_cross_entropy(logits, soft, weights, label_smoothing=smoothing,
                                reduction=reduction)  # fmt: skip
    smooth = soft * (1 - smoothing) + smoothing / 4  # what label smoothing does to targets
    per = torch.stack([-(smooth * torch.log_softmax(logits[i], -1)).sum(-1) for i in range(3)])
    per = (torch.tensor(weights, dtype=torch.float64)[:, None] * per)  # [G, B]
    loop = {"mean": per.mean(1).sum(), "sum": per.sum(), "none": per.sum(0)}[reduction]
    torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grads(fast, [logits])[0], _grads(loop, [logits])[0],
                               rtol=1e-10, atol=1e-12)  # fmt: skip


def _contrastive_loop(q, p, negatives, nesting, tau):
    """InfoNCE per prefix by hand: each query against every positive (and shared negatives)."""
    total = q.new_zeros(())
    for m in nesting.sizes:
        cands = p if negatives is None else torch.cat([p, negatives.reshape(-1, q.shape[1])])
        qs, cs = F.normalize(q[:, :m], dim=-1), F.normalize(cands[:, :m], dim=-1)
        logits = qs @ cs.T / tau  # [B, B + extra]
        total = total + (-torch.log_softmax(logits, -1).diagonal()).mean()
    return total


@pytest.mark.parametrize("negatives", ["none", "empty", "per-query"])
def test_contrastive_loss_with_empty_negatives_and_views(negatives):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 20, dtype=torch.float64, generator=g).requires_grad_(True)
    base = torch.randn(5, 40, dtype=torch.float64, generator=g)
    p = base[:, ::2].requires_grad_(True)  # a strided view
    neg = {"none": None, "empty": torch.zeros(5, 0, 20, dtype=torch.float64),
           "per-query": torch.randn(5, 2, 20, dtype=torch.float64, generator=g)}[negatives]
    fast = matryoshka_contrastive_loss(q, p, NEST, negatives=neg, temperature=0.1)
    loop = _contrastive_loop(q, p, neg, NEST, 0.1)
    torch.testing.assert_close(fast, loop, rtol=1e-12, atol=1e-12)
    for gf, gl in zip(_grads(fast, [q, p]), _grads(loop, [q, p])):
        torch.testing.assert_close(gf, gl, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_contrastive_loss_half_precision_gradients_follow_float64(dtype):
    """Half-precision gradients were only checked to be finite."""
    g = torch.Generator().manual_seed(4)
    q64 = torch.randn(8, 20, dtype=torch.float64, generator=g)
    p64 = q64 + 0.5 * torch.randn(8, 20, dtype=torch.float64, generator=g)
    qh, ph = q64.to(dtype).requires_grad_(True), p64.to(dtype).requires_grad_(True)
    q, p = qh.detach().double().requires_grad_(True), ph.detach().double().requires_grad_(True)
    gh = torch.autograd.grad(matryoshka_contrastive_loss(qh, ph, NEST, temperature=0.1), [qh, ph])
    gl = torch.autograd.grad(_contrastive_loop(q, p, None, NEST, 0.1), [q, p])
    for a, b in zip(gh, gl):
        scale = b.abs().max()
        assert ((a.double() - b).abs().max() / scale) < (0.02 if dtype == torch.float16 else 0.06)
