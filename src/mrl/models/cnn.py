"""A small, fast CNN encoder for CPU runs on small grey or colour images (28x28 Fashion-MNIST).

Three 3x3 conv blocks (the first and third with stride 2), a 1x1 conv block to D channels, then
global average pooling: ``[B, C, H, W] -> [B, D]``. The last block ends with a ReLU, so the
embedding is non-negative (which is why evaluation offers centring before cosine search). About
2.7 M multiply-adds per 28x28 image at width 16, D = 256: roughly 2 minutes per Fashion-MNIST epoch
on one busy CPU core.
"""

from __future__ import annotations

import torch
from torch import nn

from mrl.models.norm import make_norm

__all__ = ["SmallCNN"]


def _block(cin: int, cout: int, stride: int, norm: str, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=norm == "none"),
        make_norm(norm, cout, nn.BatchNorm2d),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Images ``[B, C, H, W]`` (already normalised) -> embeddings ``[B, dim]``.

    Args:
        dim: embedding size D (channels of the last conv block).
        in_channels: image channels C.
        width: channels of the first block; the next two have 2x and 4x (default 16).
        norm: "batch", "group" or "none" (use "group"/"none" where per-process batch statistics
            would make DDP differ from one process).
    """

    def __init__(self, dim: int = 256, in_channels: int = 1, width: int = 16, norm: str = "batch"):
        super().__init__()
        if dim <= 0 or width <= 0 or in_channels <= 0:
            raise ValueError(
                f"dim, width and in_channels must be positive, got dim={dim}, width={width}, "
                f"in_channels={in_channels}"
            )
        self.dim = dim
        self.features = nn.Sequential(
            _block(in_channels, width, 2, norm),  # [B, w, H/2, W/2]
            _block(width, 2 * width, 1, norm),  # [B, 2w, H/2, W/2]
            _block(2 * width, 4 * width, 2, norm),  # [B, 4w, H/4, W/4]
            _block(4 * width, dim, 1, norm, kernel=1),  # [B, D, H/4, W/4]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))  # [B, D]
