"""The normalisation layer of the small encoders (`SmallCNN`, `MLPEncoder`), chosen by name."""

from __future__ import annotations

import math

from torch import nn

__all__ = ["make_norm"]


def make_norm(kind: str, channels: int, batch_norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    """``"batch"`` (``batch_norm``: BatchNorm2d on ``[B, C, H, W]``, BatchNorm1d on ``[B, C]``),
    ``"group"`` or ``"none"``.

    ``"group"`` on images ``[B, C, H, W]``: GroupNorm with min(8, C) groups, or gcd(8, C) when
    that does not divide C (e.g. 4 groups for 12 channels). On features ``[B, C]`` (an MLP, told
    by ``batch_norm=nn.BatchNorm1d``) a group has no spatial positions, only its channels: one
    channel per group normalised every value to 0 (a width-8 MLP's embedding was constant) and
    two to about +-1, so groups hold at least 16 channels there (gcd(8, C), halved until they
    do; 1 group, a LayerNorm, below 32 channels)."""
    if kind == "batch":
        return batch_norm(channels)
    if kind == "group":
        groups = min(8, channels)
        if channels % groups:  # e.g. 12 or 100 channels: the largest divisor of 8 that fits
            groups = math.gcd(8, channels)
        if batch_norm is nn.BatchNorm1d:  # features [B, C]: statistics over channels only
            groups = math.gcd(8, channels)
            while groups > 1 and channels // groups < 16:
                groups //= 2
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got norm={kind!r}")
