"""MRL-like synthetic embeddings for benchmarks and tests (no model, no download).

How they are made (``mrl_like``): C cluster centres and per-row noise are both drawn with a
decaying per-coordinate scale ``s_i = i ** -decay`` (i = 1..D), so variance is concentrated in the
leading coordinates like a trained Matryoshka embedding (a prefix keeps a large share of the
energy: with decay=0.5 and D=2048, the first 16 coordinates hold ~36% of it, the first 256 ~73%).
A row is ``centre[label] + noise_scale * noise``; rows are L2-normalised. Cluster structure makes
neighbours meaningful (labels for mAP@10 / top-1), the noise makes within-cluster ranking depend on
all D coordinates, so a small prefix is informative but not exact, as with real MRL embeddings.
"""

from __future__ import annotations

import numpy as np

from mrl.params import check_int

__all__ = ["mrl_like", "coordinate_scale"]


def coordinate_scale(dim: int, decay: float) -> np.ndarray:
    """Per-coordinate standard deviation ``i ** -decay`` for i = 1..dim, float32 [D]."""
    return (np.arange(1, dim + 1, dtype=np.float64) ** -float(decay)).astype(np.float32)


def mrl_like(
    n: int,
    dim: int,
    *,
    clusters: int = 1000,
    decay: float = 0.5,
    noise: float = 0.6,
    seed: int = 0,
    out: np.ndarray | None = None,
    centres_seed: int = 12345,
    block: int = 50_000,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` normalised rows [n, dim] float32 and their cluster labels [n].

    Rows with the same ``centres_seed`` share cluster centres (use a different ``seed`` for queries
    than for the database). ``out`` may be a preallocated (memory-mapped) [n, dim] array; rows are
    written in blocks of ``block`` so memory stays bounded.
    """
    n, dim = check_int(n, "n", minimum=1), check_int(dim, "dim", minimum=1)
    clusters = check_int(clusters, "clusters", minimum=1)
    block = check_int(block, "block", minimum=1)  # -1 skipped the loop: uninitialised rows
    for name, v in (("decay", decay), ("noise", noise)):
        if not np.isfinite(v):  # NaN rows, silently
            raise ValueError(f"{name} must be a finite number, got {name}={v!r}")
    if out is not None and (tuple(out.shape) != (n, dim) or out.dtype != np.float32):
        raise ValueError(f"out must be a float32 [n={n}, dim={dim}] array, got shape "
                         f"{tuple(out.shape)} dtype {out.dtype}")
    scale = coordinate_scale(dim, decay)  # [D]
    centres = np.random.default_rng(centres_seed).standard_normal((clusters, dim), np.float32)
    centres *= scale
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    x = np.empty((n, dim), np.float32) if out is None else out
    for s in range(0, n, block):
        lab = labels[s : s + block]
        z = rng.standard_normal((len(lab), dim), np.float32)
        z *= scale * np.float32(noise)
        z += centres[lab]
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        x[s : s + block] = z
    return x, labels
