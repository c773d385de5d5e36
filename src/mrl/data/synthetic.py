"""A tiny deterministic image dataset for tests: class prototypes plus noise.

Each class c has a fixed random grey-level prototype ``[C, H, W]``; an item is its class prototype
plus Gaussian noise, clipped to uint8. A small CNN separates the classes in a few steps, and the
same ``seed`` always gives the same tensors.
"""

from __future__ import annotations

import math

import torch

from mrl.data.tensors import ImageTensors
from mrl.params import check_int

__all__ = ["make_synthetic"]


def make_synthetic(
    n: int = 256,
    num_classes: int = 4,
    size: int = 12,
    channels: int = 1,
    noise: float = 40.0,
    seed: int = 0,
    split: str = "train",
) -> ImageTensors:
    """``n`` images uint8 ``[n, channels, size, size]`` with balanced labels.

    The prototypes depend on ``seed`` only; the noise also on ``split`` so train and test differ.
    """
    for name, value in (
        ("n", n),
        ("num_classes", num_classes),
        ("size", size),
        ("channels", channels),
    ):
        check_int(value, name, minimum=1)  # True was 1 (bool is an int)
    check_int(seed, "seed")  # 1.5 was a foreign RuntimeError from manual_seed
    if not math.isfinite(noise):  # NaN: every image all zeros
        raise ValueError(f"noise must be a finite number, got noise={noise!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got split={split!r}")
    protos = torch.rand(
        num_classes, channels, size, size, generator=torch.Generator().manual_seed(seed)
    )
    g = torch.Generator().manual_seed(seed * 2 + (split == "test") + 1)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    pixels = protos[labels] * 255 + noise * torch.randn(n, channels, size, size, generator=g)
    images = pixels.round().clamp(0, 255).to(torch.uint8)
    return ImageTensors(
        images,
        labels.long(),
        num_classes,
        (0.5,) * channels,
        (0.3,) * channels,
        f"synthetic/{split}",
    )
