"""The normalisation layer of the small encoders (`SmallCNN`, `MLPEncoder`), chosen by name."""

from __future__ import annotations

import math

from torch import nn

__all__ = ["group_count", "make_norm", "narrow_feature_groups"]


def group_count(channels: int) -> int:
    """GroupNorm's groups for ``channels``: min(8, channels), or gcd(8, channels) when that does
    not divide ``channels`` (e.g. 4 groups for 12 or 100 channels)."""
    groups = min(8, channels)
    return groups if channels % groups == 0 else math.gcd(8, channels)


def narrow_feature_groups(channels: int, least: int = 16) -> tuple[int, int] | None:
    """``(groups, channels per group)`` when GroupNorm on features ``[B, channels]`` (an MLP: no
    positions, a group's statistics come from its channels alone) has fewer than ``least`` per
    group (1: every output 0, a constant embedding); None when it has enough."""
    groups = group_count(channels)
    return (groups, channels // groups) if channels // groups < least else None


def make_norm(kind: str, channels: int, batch_norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    """``"batch"`` (``batch_norm``: BatchNorm2d on ``[B, C, H, W]``, BatchNorm1d on ``[B, C]``),
    ``"group"`` (GroupNorm with min(8, channels) groups, or gcd(8, channels) when that does not
    divide ``channels``, e.g. 4 groups for 12 channels; works on either shape) or ``"none"``."""
    if kind == "batch":
        return batch_norm(channels)
    if kind == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got norm={kind!r}")
