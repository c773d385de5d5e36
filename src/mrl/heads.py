"""Nested classification heads: the logits of every prefix as one ``[G, B, C]`` tensor.

Shapes: B batch, D full embedding dim, m prefix dim, G number of prefixes, C classes.

* `MRLHead`: an independent linear classifier per prefix (``z[:, :m] -> C``), the paper's MRL.
* `MRLEHead`: one weight ``W [C, D]`` shared by all prefixes (MRL-E, "efficient"): the logits at
  prefix m are ``z[:, :m] @ W[:, :m].T + b``. All G prefixes come from one pass over D: a partial
  product per chunk ``[m_{g-1}, m_g)``, accumulated into the previous prefix's logits (a cumulative
  sum fused into the matrix products), so the cost is about that of one full-size classifier.
* `FixedFeatureHead`: the paper's FF-m baseline (a full-size network whose classifier reads only the
  first m features); also the "plain" head when m = D.

The fast paths are custom autograd functions whose backward writes gradients straight into their
final buffers (no zero-filled slice gradients, no stacked copies). `mrl_head_reference` and
`mrl_e_head_reference` are plain per-prefix loops kept for tests and benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrl.nesting import Nesting
from mrl.params import check_flag, check_int, is_int

__all__ = [
    "FixedFeatureHead",
    "MRLEHead",
    "MRLHead",
    "HEAD_MODES",
    "make_head",
    "mrl_e_head_reference",
    "mrl_head_reference",
    "nested_linear",
]

HEAD_MODES = ("mrl", "mrl-e", "ff", "plain")


# --------------------------------------------------------------------------- validation helpers
def _check_positive_int(name: str, value: object) -> int:
    return check_int(value, name, minimum=1)  # numpy ints too (e.g. labels.max() + 1)


def _check_input(z: Tensor, dim: int, name: str = "z") -> None:
    """``z`` must be a floating ``[B, D]`` tensor with D = ``dim``."""
    if not isinstance(z, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, D], got shape {tuple(z.shape)}")
    if z.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} features (the head's in_dim), got shape "
                         f"{tuple(z.shape)}")


# Below this many output columns, CPU BLAS (MKL in torch 2.13) takes a slow path: a [256, 8]
# output cost ~1.5 ms where its transpose [8, 256] cost 0.15 ms (measured, 1 thread).
_NARROW = 16


def _addmm_into_(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` in place, for ``out`` a (possibly strided) view ``[n, w]``.

    Narrow outputs are computed transposed (``b.T @ a.T``, ``[w, n]``) and copied/added back.
    """
    if out.shape[1] >= _NARROW:
        out.addmm_(a, b, beta=1 if accumulate else 0)
    elif accumulate:
        out.add_(torch.mm(b.t(), a.t()).t())
    else:
        out.copy_(torch.mm(b.t(), a.t()).t())


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None. torch >= 2.4 takes the device
    type; older releases (a GPU machine may have one) only have per-device functions."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _autocast_inputs(tensors: list[Tensor | None], device_type: str) -> list[Tensor | None]:
    """Under autocast, cast the operands as ``F.linear`` would (custom Functions are not cast)."""
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return [None if t is None else t.to(dtype) for t in tensors]


def _functorch_active() -> bool:
    """True inside torch.func transforms (grad, vmap, jacrev, ...). The fused autograd Functions
    have no vmap rule, so the heads take their per-prefix reference path there (same values)."""
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check()) if check is not None else False


def _init_linear_(weight: Tensor, bias: Tensor | None, fan_in: int) -> None:
    # Same distribution as nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both.
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


# --------------------------------------------------------------------------- MRL-E: tied weights
class _NestedLinearFn(torch.autograd.Function):
    """``out[g] = z[:, :m_g] @ W[:, :m_g].T + b`` for every prefix g, in one pass over D.

    Forward: ``out[0] = b + z[:, c_0] @ W[:, c_0].T`` and
    ``out[g] = out[g-1] + z[:, c_g] @ W[:, c_g].T`` where ``c_g = [m_{g-1}, m_g)``; each addmm
    writes straight into ``out[g]`` (the cumulative sum is fused into the products).
    Backward: chunk g feeds every prefix h >= g, so its upstream gradient is the reverse
    cumulative sum ``R_g = sum_{h>=g} grad_out[h]``, kept in one ``[B, C]`` accumulator;
    each chunk's slice of dz and dW is written in place by one addmm.
    """

    @staticmethod
    def forward(ctx, z: Tensor, weight: Tensor, bias: Tensor | None, chunks: tuple) -> Tensor:
        B, C, G = z.shape[0], weight.shape[0], len(chunks)
        out = z.new_empty(G, B, C)
        for g, (s, e) in enumerate(chunks):
            zc, wct = z[:, s:e], weight[:, s:e].t()  # [B, w], [w, C]
            if g > 0:
                torch.addmm(out[g - 1], zc, wct, out=out[g])
            elif bias is not None:
                torch.addmm(bias, zc, wct, out=out[0])
            else:
                torch.mm(zc, wct, out=out[0])
        ctx.save_for_backward(z, weight)
        ctx.chunks = chunks
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, weight = ctx.saved_tensors
        need_z, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: out-of-place ops autograd can follow
            return _nested_linear_grads(grad_out, z, weight, ctx.chunks, ctx.needs_input_grad,
                                        ctx.has_bias)
        grad_z = torch.empty_like(z, memory_format=torch.contiguous_format) if need_z else None
        grad_w = (torch.empty_like(weight, memory_format=torch.contiguous_format)
                  if need_w else None)
        acc = None  # [B, C]: sum of grad_out[h] for h >= g
        for g in range(len(ctx.chunks) - 1, -1, -1):
            s, e = ctx.chunks[g]
            acc = grad_out[g].clone() if acc is None else acc.add_(grad_out[g])
            if need_z:  # dz[:, c_g] = R_g @ W[:, c_g]   [B, w] (overwrites the empty memory)
                _addmm_into_(grad_z[:, s:e], acc, weight[:, s:e], accumulate=False)
            if need_w:  # dW[:, c_g] = R_g.T @ z[:, c_g]  [C, w]
                _addmm_into_(grad_w[:, s:e], acc.t(), z[:, s:e], accumulate=False)
        grad_b = acc.sum(0) if (ctx.has_bias and need_b) else None  # R_0 = sum over all prefixes
        return grad_z, grad_w, grad_b, None


def _nested_linear_grads(grad_out: Tensor, z: Tensor, weight: Tensor, chunks: tuple,
                         need: tuple, has_bias: bool) -> tuple:
    """`_NestedLinearFn.backward` in differentiable out-of-place ops (double backward, e.g. a
    gradient penalty): the same chunk products, with ``R [G, B, C]`` materialised."""
    R = grad_out.flip(0).cumsum(0).flip(0)  # R[g] = sum_{h>=g} grad_out[h]
    grad_z = torch.cat([R[g] @ weight[:, s:e] for g, (s, e) in enumerate(chunks)], 1) \
        if need[0] else None
    grad_w = torch.cat([R[g].t() @ z[:, s:e] for g, (s, e) in enumerate(chunks)], 1) \
        if need[1] else None
    grad_b = R[0].sum(0) if (has_bias and need[2]) else None
    return grad_z, grad_w, grad_b, None


def nested_linear(
    z: Tensor, weight: Tensor, nesting: Nesting | Sequence[int], bias: Tensor | None = None
) -> Tensor:
    """Logits of the tied-weight (MRL-E) head at every prefix: ``[G, B, C]``.

    ``out[g] = z[:, :m_g] @ weight[:, :m_g].T + bias``. Cost about one ``z @ weight.T``. Also the
    engine of cosine scores at every prefix (``weight`` = the candidate embeddings, no bias).

    Args:
        z: ``[B, D]`` inputs.
        weight: ``[C, D]`` shared weight.
        nesting: prefix sizes; ``nesting.dim`` must equal D.
        bias: optional ``[C]`` bias, added at every prefix.
    """
    nesting = Nesting.coerce(nesting)  # a list or "8,16,32" too
    _check_input(z, nesting.dim, "z")
    for name, t in (("weight", weight), ("bias", bias)):  # numpy: an AttributeError below
        if t is not None and not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2 or weight.shape[1] != nesting.dim:
        raise ValueError(f"weight must be [C, {nesting.dim}], got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    device_type = z.device.type
    z, weight, bias = _autocast_inputs([z, weight, bias], device_type)
    if z.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"z, weight and bias must share a dtype, got z={z.dtype}, "
                         f"weight={weight.dtype}, bias={None if bias is None else bias.dtype}")
    with torch.autocast(device_type, enabled=False):
        if _functorch_active():
            return mrl_e_head_reference(z, weight, nesting, bias)
        return _NestedLinearFn.apply(z, weight, bias, nesting.chunks)


def mrl_e_head_reference(
    z: Tensor, weight: Tensor, nesting: Nesting, bias: Tensor | None = None
) -> Tensor:
    """Plain per-prefix loop: G separate products ``z[:, :m] @ weight[:, :m].T`` (for tests)."""
    return torch.stack([F.linear(z[:, :m], weight[:, :m], bias) for m in nesting.sizes])


class MRLEHead(nn.Module):
    """MRL-E: one linear classifier ``W [C, D]``, ``b [C]`` shared by every prefix.

    ``forward(z [B, D]) -> logits [G, B, C]`` with ``logits[g] = z[:, :m_g] @ W[:, :m_g].T + b``.

    Example:
        >>> head = MRLEHead(Nesting((8, 16, 32)), num_classes=10)
        >>> head(torch.randn(4, 32)).shape
        torch.Size([3, 4, 10])
    """

    def __init__(self, nesting: Nesting | Sequence[int], num_classes: int, bias: bool = True):
        super().__init__()
        self.nesting = Nesting.coerce(nesting)
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.in_dim = self.nesting.dim
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_dim))
        bias = check_flag(bias, "bias")  # "no" was truthy
        self.bias = nn.Parameter(torch.empty(self.num_classes)) if bias else None
        _init_linear_(self.weight, self.bias, self.in_dim)

    def forward(self, z: Tensor) -> Tensor:
        return nested_linear(z, self.weight, self.nesting, self.bias)

    def extra_repr(self) -> str:
        return f"nesting={list(self.nesting.sizes)}, num_classes={self.num_classes}, " \
               f"bias={self.bias is not None}"


# ----------------------------------------------------------------------- MRL: a head per prefix
class _PrefixLinearsFn(torch.autograd.Function):
    """``out[g] = z[:, :m_g] @ W_g.T + b_g`` with independent ``W_g [C, m_g]``, ``b_g [C]``.

    Same products as a loop of ``F.linear``, but written straight into the ``[G, B, C]`` output
    (no stack copy), and the input gradient is accumulated in place in one ``[B, D]`` buffer
    (autograd's loop would zero-fill a ``[B, D]`` tensor per prefix for the slice gradients).
    """

    @staticmethod
    def forward(ctx, z: Tensor, sizes: tuple, has_bias: bool, *params: Tensor) -> Tensor:
        G = len(sizes)
        weights, biases = params[:G], (params[G:] if has_bias else (None,) * G)
        out = z.new_empty(G, z.shape[0], weights[0].shape[0])
        for g, (m, w, b) in enumerate(zip(sizes, weights, biases)):
            if b is None:
                torch.mm(z[:, :m], w.t(), out=out[g])
            else:
                torch.addmm(b, z[:, :m], w.t(), out=out[g])
        ctx.save_for_backward(z, *weights)
        ctx.sizes, ctx.has_bias = sizes, has_bias
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, *weights = ctx.saved_tensors
        sizes, G = ctx.sizes, len(ctx.sizes)
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: out-of-place ops autograd can follow
            return _prefix_linears_grads(grad_out, z, weights, sizes, need, ctx.has_bias)
        grad_z = None
        if need[0]:
            # Largest prefix first: it covers all of D, so its write initialises the whole buffer.
            grad_z = torch.empty_like(z, memory_format=torch.contiguous_format)
            for g in range(G - 1, -1, -1):
                _addmm_into_(grad_z[:, : sizes[g]], grad_out[g], weights[g], accumulate=g < G - 1)
        grad_w = [None] * G
        for g in range(G):
            if need[3 + g]:  # dW_g = grad_out[g].T @ z[:, :m_g]   [C, m_g]
                grad_w[g] = z.new_empty(weights[g].shape)
                _addmm_into_(grad_w[g], grad_out[g].t(), z[:, : sizes[g]], accumulate=False)
        grad_b = []
        if ctx.has_bias:
            grad_b = [grad_out[g].sum(0) if need[3 + G + g] else None for g in range(G)]
        return (grad_z, None, None, *grad_w, *grad_b)


def _prefix_linears_grads(grad_out: Tensor, z: Tensor, weights: Sequence[Tensor], sizes: tuple,
                          need: tuple, has_bias: bool) -> tuple:
    """`_PrefixLinearsFn.backward` in differentiable out-of-place ops (double backward)."""
    G, D = len(sizes), z.shape[1]
    grad_z = None
    if need[0]:  # sum over g of grad_out[g] @ W_g, zero-padded from m_g to D
        grad_z = sum(F.pad(grad_out[g] @ weights[g], (0, D - sizes[g])) for g in range(G))
    grad_w = [grad_out[g].t() @ z[:, : sizes[g]] if need[3 + g] else None for g in range(G)]
    grad_b = [grad_out[g].sum(0) if need[3 + G + g] else None for g in range(G)] \
        if has_bias else []
    return (grad_z, None, None, *grad_w, *grad_b)


def mrl_head_reference(
    z: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None = None
) -> Tensor:
    """Plain per-prefix loop of ``F.linear(z[:, :m_g], W_g, b_g)`` stacked to ``[G, B, C]``."""
    biases = [None] * len(weights) if biases is None else list(biases)
    return torch.stack([F.linear(z[:, : w.shape[1]], w, b) for w, b in zip(weights, biases)])


class MRLHead(nn.Module):
    """MRL: an independent linear classifier per prefix, ``z[:, :m_g] -> C``.

    Parameters: ``weights[g]`` of shape ``[C, m_g]`` and ``biases[g]`` of shape ``[C]``.
    ``forward(z [B, D]) -> logits [G, B, C]``. ``fused=False`` runs the reference loop instead.

    Example:
        >>> head = MRLHead(Nesting((8, 16, 32)), num_classes=10)
        >>> head(torch.randn(4, 32)).shape
        torch.Size([3, 4, 10])
    """

    def __init__(
        self,
        nesting: Nesting | Sequence[int],
        num_classes: int,
        bias: bool = True,
        fused: bool = True,
    ):
        super().__init__()
        self.nesting = Nesting.coerce(nesting)
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.in_dim = self.nesting.dim
        self.fused = check_flag(fused, "fused")  # "no" was truthy
        bias = check_flag(bias, "bias")
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(self.num_classes, m)) for m in self.nesting.sizes]
        )
        self.biases = (
            nn.ParameterList([nn.Parameter(torch.empty(self.num_classes))
                              for _ in self.nesting.sizes])
            if bias
            else None
        )
        for g, m in enumerate(self.nesting.sizes):
            _init_linear_(self.weights[g], None if self.biases is None else self.biases[g], m)

    def forward(self, z: Tensor) -> Tensor:
        _check_input(z, self.in_dim)
        weights = list(self.weights)
        biases = [] if self.biases is None else list(self.biases)
        if not self.fused or _functorch_active():
            return mrl_head_reference(z, weights, biases or None)
        device_type = z.device.type
        z, *params = _autocast_inputs([z, *weights, *biases], device_type)
        if any(p.dtype != z.dtype for p in params):
            raise ValueError(f"z has dtype {z.dtype} but the head's parameters are "
                             f"{params[0].dtype}")
        with torch.autocast(device_type, enabled=False):
            return _PrefixLinearsFn.apply(z, self.nesting.sizes, bool(biases), *params)

    def extra_repr(self) -> str:
        return f"nesting={list(self.nesting.sizes)}, num_classes={self.num_classes}, " \
               f"bias={self.biases is not None}, fused={self.fused}"


# --------------------------------------------------------------------------- FF-m and plain
class FixedFeatureHead(nn.Module):
    """FF-m: a linear classifier reading only the first ``dim`` of ``in_dim`` features.

    ``forward(z [B, in_dim]) -> logits [1, B, C]``; ``.nesting`` is ``Nesting((dim,))``, the one
    prefix its output belongs to. With ``dim == in_dim`` it is the plain full-size head.
    """

    def __init__(self, dim: int, num_classes: int, in_dim: int, bias: bool = True):
        super().__init__()
        self.dim = _check_positive_int("dim", dim)
        self.in_dim = _check_positive_int("in_dim", in_dim)
        self.num_classes = _check_positive_int("num_classes", num_classes)
        if dim > in_dim:
            raise ValueError(f"dim must be <= in_dim ({in_dim}), got dim={dim}")
        self.nesting = Nesting((dim,))
        self.linear = nn.Linear(dim, self.num_classes, bias=check_flag(bias, "bias"))

    def forward(self, z: Tensor) -> Tensor:
        _check_input(z, self.in_dim)
        w = self.linear.weight
        if z.dtype != w.dtype and _autocast_dtype(z.device.type) is None:  # autocast casts both
            raise ValueError(f"z has dtype {z.dtype} but the head's parameters are {w.dtype}")
        return self.linear(z[:, : self.dim]).unsqueeze(0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, in_dim={self.in_dim}, num_classes={self.num_classes}"


def make_head(
    mode: str,
    nesting: Nesting | Sequence[int],
    num_classes: int,
    ff_dim: int | None = None,
    bias: bool = True,
) -> nn.Module:
    """Build the classification head of a training mode.

    * ``"mrl"``: `MRLHead`, outputs ``[G, B, C]`` for ``nesting``.
    * ``"mrl-e"``: `MRLEHead`, outputs ``[G, B, C]``.
    * ``"ff"``: `FixedFeatureHead` reading ``z[:, :ff_dim]`` of ``nesting.dim`` features;
      outputs ``[1, B, C]``, ``.nesting == Nesting((ff_dim,))``.
    * ``"plain"``: one full-size linear head, ``[1, B, C]``, ``.nesting == Nesting((D,))``.

    Every head has ``.nesting`` (the prefixes of its G outputs) and ``.in_dim`` (D).
    """
    nesting = Nesting.coerce(nesting)
    if mode not in HEAD_MODES:
        raise ValueError(f"mode must be one of {list(HEAD_MODES)}, got mode={mode!r}")
    if mode != "ff" and ff_dim is not None:
        raise ValueError(f"ff_dim is only used with mode='ff', got ff_dim={ff_dim} with "
                         f"mode={mode!r}")
    if mode == "mrl":
        return MRLHead(nesting, num_classes, bias=bias)
    if mode == "mrl-e":
        return MRLEHead(nesting, num_classes, bias=bias)
    if mode == "plain":
        return FixedFeatureHead(nesting.dim, num_classes, nesting.dim, bias=bias)
    if ff_dim is None:
        raise ValueError("mode='ff' needs ff_dim (the number of features the classifier reads)")
    if is_int(ff_dim) and ff_dim > nesting.dim:  # FixedFeatureHead's error named "dim"
        raise ValueError(f"ff_dim must be <= the nesting's full size ({nesting.dim}), got "
                         f"ff_dim={ff_dim}")
    return FixedFeatureHead(ff_dim, num_classes, nesting.dim, bias=bias)
