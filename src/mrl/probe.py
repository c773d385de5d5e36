"""Linear probes and the PCA / random-coordinate baselines, at every prefix size.

Recipe of `fit_linear_probe` (used for every method's "top1" that does not come from a trained
head): features standardised with the training mean and std, multinomial logistic regression with
an L2 penalty ``l2 / 2 * ||W||^2`` on the weights (not the bias) added to the mean cross-entropy,
optimised full-batch with L-BFGS (strong-Wolfe line search) for up to ``max_iter`` iterations, until
the gradient's max-norm is below ``tol``. Deterministic (zero initialisation, full batch).

Baselines turn the full-size model's features ``[N, D]`` into another nested embedding ``[N, D]``
whose first m columns are the baseline's m-dimensional features:

- ``pca``: principal components of the database features (fit on the database only);
- ``random``: a seeded random order of the D coordinates (m random coordinates at prefix m);

both from `mrl.baselines`, the same transforms `mrl.evaluate` uses for its retrieval baselines.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from mrl.arrays import as_numpy
from mrl.devices import default_device
from mrl.nesting import Nesting
from mrl.params import check_int

__all__ = ["LinearProbe", "baseline_features", "fit_linear_probe", "probe_top1"]


@dataclass
class LinearProbe:
    """``predict(x) = argmax((x - mean) / std @ weight.T + bias)``; weight ``[C, m]``."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.to(self.mean) - self.mean) / self.std) @ self.weight.T + self.bias  # [N, C]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(-1)


def fit_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    l2: float = 1e-4,
    max_iter: int = 200,
    tol: float = 1e-5,
    device: str | torch.device | None = None,
) -> LinearProbe:
    """Multinomial logistic regression on ``x`` [N, m] with labels ``y`` [N]."""
    # numpy too (an AttributeError); tensors stay where they are (a GPU's are not copied)
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(as_numpy(x))
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(as_numpy(y))
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be [N, m] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    if isinstance(l2, (bool, str)) or not isinstance(l2, numbers.Real) or not l2 >= 0:
        # "0.1" was a TypeError, NaN an L-BFGS error
        raise ValueError(f"l2 must be a number >= 0, got l2={l2!r}")
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one row, got shape (0, ...)")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if int(y.min()) < 0:
        raise ValueError(f"y must hold class labels in [0, num_classes), got {int(y.min())}")
    if num_classes <= int(y.max()):
        raise ValueError(f"num_classes={num_classes} but labels go up to {int(y.max())}")
    # Full-batch L-BFGS: on a GPU when there is one (1000 classes x 50k rows is slow on a CPU).
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite, got NaN or inf features")
    dev = torch.device(default_device(device))
    x, y = x.float().to(dev), y.long().to(dev)  # int32 labels: cross_entropy wants int64
    mean = x.mean(0)
    # one row has no spread: its sample std (n - 1) was NaN, and so was every prediction
    std = x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(mean)
    xs = (x - mean) / std  # [N, m]
    w = torch.zeros(num_classes, x.shape[1], device=dev, requires_grad=True)
    b = torch.zeros(num_classes, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe(w.detach().cpu(), b.detach().cpu(), mean.cpu(), std.cpu())


def probe_top1(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    nesting: Nesting,
    num_classes: int,
    **probe_options,
) -> torch.Tensor:
    """Top-1 accuracy (%) of a linear probe fit on ``train_x[:, :m]``, for every m: ``[G]``."""
    nesting = Nesting.coerce(nesting)  # [2, 4] was an AttributeError
    nesting.check_dim(train_x.shape[1], "train features")
    if test_x.dim() != 2 or test_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"test_x must be [Q, {train_x.shape[1]}] (as train_x), got shape "
                         f"{tuple(test_x.shape)}")
    if test_y.shape != (test_x.shape[0],):  # [1] or [Q, 1] broadcast against [Q]: a wrong %
        raise ValueError(f"test_y must be [{test_x.shape[0]}] (one label per row of test_x), "
                         f"got shape {tuple(test_y.shape)}")
    accs = []
    for m in nesting.sizes:
        probe = fit_linear_probe(train_x[:, :m], train_y, num_classes, **probe_options)
        accs.append(100.0 * (probe.predict(test_x[:, :m]) == test_y).float().mean())
    return torch.stack(accs)


def baseline_features(
    db: torch.Tensor, queries: torch.Tensor, kind: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(db [N, D], queries [Q, D]) re-expressed so that the first m columns are the baseline."""
    from mrl.baselines import PCA, random_features

    if kind == "pca":  # fit on the database only; components sorted by explained variance
        pca = PCA().fit(db)
        return pca.transform(db), pca.transform(queries)
    if kind == "random":
        return random_features(db, seed), random_features(queries, seed)
    raise ValueError(f"kind must be 'pca' or 'random', got kind={kind!r}")
