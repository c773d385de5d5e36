"""Baselines for nested embeddings: PCA (project, then truncate) and random feature subsets.

The MRL paper compares a Matryoshka prefix ``z[:m]`` with what post-hoc compression of a plain
embedding gives at the same size m:

- `PCA`: fit on the database, project onto the principal directions sorted by variance, keep the
  first m coordinates (``centered=False`` is the uncentred variant, i.e. an SVD of the raw data);
- random features: a seeded random permutation of the coordinates, then keep the first m
  (`random_permutation` / `random_features`).

Both give a [rows, D] array whose prefixes are evaluated exactly like Matryoshka prefixes.
Inputs may be numpy arrays or torch tensors; outputs are the same kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mrl.arrays import torch_shareable
from mrl.params import check_flag, check_int

__all__ = ["PCA", "random_features", "random_permutation"]


def _as_tensor(x: Any, name: str) -> tuple[torch.Tensor, bool]:
    is_numpy = isinstance(x, np.ndarray)
    t = torch.from_numpy(torch_shareable(x)) if is_numpy else x
    if not isinstance(t, torch.Tensor) or t.ndim != 2:
        shape = getattr(x, "shape", None)
        raise ValueError(f"{name} must be a 2-D tensor or array [rows, dim], got shape {shape}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (no NaN/inf)")
    return (t if t.is_floating_point() else t.float()), is_numpy


class PCA:
    """Principal component projection, scikit-learn style (``fit`` / ``transform``).

    All D components are kept (sorted by decreasing variance), so every prefix size up to D can be
    evaluated; with fewer rows than dims the trailing components have zero variance.

    Args:
        centered: subtract the database mean before the decomposition (standard PCA); False gives
            the uncentred variant (directions of the raw second moment, an SVD of the data).
        max_samples: fit on a seeded random subset of at most this many rows (None: all).
        seed: for the subset.

    Attributes (after fit): ``mean_`` [D] (zeros if not centred), ``components_`` [D, D] (rows are
    directions), ``explained_variance_`` [D].
    """

    def __init__(self, centered: bool = True, max_samples: int | None = None, seed: int = 0):
        if max_samples is not None:  # 2.5 was a slice TypeError in fit
            max_samples = check_int(max_samples, "max_samples", minimum=1)
        self.centered = check_flag(centered, "centered")  # "no" was read as centred
        self.max_samples = max_samples
        self.seed = seed
        self.mean_: torch.Tensor | None = None
        self.components_: torch.Tensor | None = None
        self.explained_variance_: torch.Tensor | None = None

    def fit(self, db: Any) -> PCA:
        x, _ = _as_tensor(db, "db")
        if self.max_samples is not None and x.shape[0] > self.max_samples:
            g = torch.Generator().manual_seed(self.seed)
            x = x[torch.randperm(x.shape[0], generator=g)[: self.max_samples]]
        x = x.double()  # D x D second moment in float64: eigenvectors of small-variance dims
        mean = x.mean(0) if self.centered else torch.zeros(x.shape[1], dtype=x.dtype)
        xc = x - mean
        cov = xc.T @ xc / max(x.shape[0] - (1 if self.centered else 0), 1)  # [D, D]
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(evals, descending=True)
        comps = evecs[:, order].T  # [D, D], row i = i-th direction
        # Deterministic signs: the largest-magnitude entry of each direction is positive.
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        signs[signs == 0] = 1
        self.mean_, self.components_ = mean, comps * signs
        self.explained_variance_ = evals[order].clamp_min(0)
        return self

    def transform(self, x: Any) -> Any:
        """Project ``x [rows, D]`` onto the components: [rows, D], most variance first."""
        if self.components_ is None or self.mean_ is None:
            raise ValueError("PCA.transform called before fit")
        t, is_numpy = _as_tensor(x, "x")
        if t.shape[1] != self.components_.shape[1]:
            raise ValueError(
                f"x must have dimension {self.components_.shape[1]} (as the fitted data), "
                f"got shape {tuple(t.shape)}"
            )
        out = (t.double() - self.mean_) @ self.components_.T
        out = out.to(t.dtype)
        return out.numpy() if is_numpy else out

    def fit_transform(self, db: Any) -> Any:
        return self.fit(db).transform(db)


def random_permutation(dim: int, seed: int = 0) -> np.ndarray:
    """A seeded random order of the ``dim`` coordinates (int64 [dim])."""
    dim = check_int(dim, "dim", minimum=1)
    seed = check_int(seed, "seed", minimum=0)  # "a" was numpy's TypeError
    return np.random.default_rng(seed).permutation(dim)


def random_features(x: Any, seed: int = 0) -> Any:
    """``x`` with its coordinates in a seeded random order: its prefixes are random feature subsets.

    Use the same seed for the database and the queries.
    """
    if len(getattr(x, "shape", ())) != 2:  # a 1-D vector was an IndexError
        raise ValueError(f"x must be 2-D [rows, dim], got shape {getattr(x, 'shape', None)}")
    perm = random_permutation(x.shape[1], seed)
    if isinstance(x, torch.Tensor):
        return x[:, torch.from_numpy(perm)]
    return np.asarray(x)[:, perm]
