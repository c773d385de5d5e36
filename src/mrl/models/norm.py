"""The normalisation layer of the small encoders (`SmallCNN`, `MLPEncoder`), chosen by name."""

from __future__ import annotations

from torch import nn

__all__ = ["make_norm"]


def make_norm(kind: str, channels: int, batch_norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
    """``"batch"`` (``batch_norm``: BatchNorm2d on ``[B, C, H, W]``, BatchNorm1d on ``[B, C]``),
    ``"group"`` (GroupNorm, at most 8 groups; works on either shape) or ``"none"``."""
    if kind == "batch":
        return batch_norm(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got norm={kind!r}")
