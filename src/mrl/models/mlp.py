"""A multilayer perceptron encoder: the fast CPU choice for small, position-coded images.

``[B, C, H, W] -> flatten [B, C*H*W] -> (Linear -> norm -> ReLU) x depth -> Linear -> [B, D]``.

Why it exists: on ``fashion-mnist-1k`` (three 28x28 images side by side, label 100a + 10b + c) the
label depends on *where* each item is. `SmallCNN` averages its last feature map over the whole
28x84 image, so it cannot tell the panels apart (4.9% top-1 after 2 CPU epochs); a ResNet-18 can,
but needs a GPU. An MLP sees every pixel at its position and its matrix products run well on a CPU
core (~40 s per epoch of 60k triples at width 1024 on this project's machine). The embedding is the
last linear layer's output: signed, not a ReLU output, so cosine search needs no centring.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from mrl.models.norm import make_norm, narrow_feature_groups

__all__ = ["MLPEncoder"]


class MLPEncoder(nn.Module):
    """Images ``[B, C, H, W]`` (already normalised) -> embeddings ``[B, dim]``.

    Args:
        dim: embedding size D.
        in_channels: image channels C.
        input_shape: ``(H, W)`` of the images (the first layer reads ``C*H*W`` values).
        width: units of each hidden layer (default 1024).
        depth: number of hidden layers (default 2; 0 = one linear map).
        norm: "batch", "group" or "none" after each hidden linear layer.
    """

    def __init__(
        self,
        dim: int = 256,
        in_channels: int = 1,
        *,
        input_shape: Sequence[int],
        width: int = 1024,
        depth: int = 2,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"input_shape must be (H, W) with H, W > 0, got input_shape={shape}")
        if dim <= 0 or width <= 0 or in_channels <= 0 or depth < 0:
            raise ValueError(
                f"dim, width and in_channels must be positive and depth >= 0, got dim={dim}, "
                f"width={width}, in_channels={in_channels}, depth={depth}"
            )
        if norm == "group" and depth > 0:
            _warn_narrow_groups(width)
        self.dim = dim
        self.input_shape = (in_channels, *shape)
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_channels * shape[0] * shape[1]
        for _ in range(depth):
            layers.append(nn.Linear(features, width, bias=norm == "none"))
            layers += [make_norm(norm, width, nn.BatchNorm1d), nn.ReLU(inplace=True)]
            features = width
        layers.append(nn.Linear(features, dim))  # [B, D], signed
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"MLPEncoder expects images of shape {self.input_shape}, got {tuple(x.shape[1:])}"
            )
        return self.layers(x)  # [B, D]


def _warn_narrow_groups(width: int) -> None:
    """New training configs refuse too few features per group (`mrl.config`); built directly
    (or a saved run loaded: it must keep computing what it computed) it is a warning."""
    narrow = narrow_feature_groups(width)
    if narrow is not None:
        warnings.warn(
            f"MLPEncoder(width={width}, norm='group') normalises {narrow[0]} groups of "
            f"{narrow[1]} feature(s): too few for useful statistics (1 gives a constant "
            "embedding); use width >= 128 or norm='batch'",
            stacklevel=3,
        )
