"""The normalisation layer of the small encoders (`SmallCNN`, `MLPEncoder`), chosen by name."""

from __future__ import annotations

import math

from torch import nn

__all__ = ["make_norm"]


def make_norm(kind: str, channels: int, batch_norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    """``"batch"`` (``batch_norm``: BatchNorm2d on ``[B, C, H, W]``, BatchNorm1d on ``[B, C]``),
    ``"group"`` (GroupNorm with min(8, channels) groups, or gcd(8, channels) when that does not
    divide ``channels``, e.g. 4 groups for 12 channels; works on either shape) or ``"none"``."""
    if kind == "batch":
        return batch_norm(channels)
    if kind == "group":
        groups = min(8, channels)
        if channels % groups:  # e.g. 12 or 100 channels: the largest divisor of 8 that fits
            groups = math.gcd(8, channels)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got norm={kind!r}")
