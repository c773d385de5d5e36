"""ResNet-18/34/50 (He et al., 2016) written here, with two stems and a width D embedding.

- ``stem="small"``: one 3x3 stride-1 conv, no max-pool (28-64 px images: CIFAR-style);
- ``stem="imagenet"``: 7x7 stride-2 conv + 3x3 max-pool (224 px images).

The embedding is the globally pooled output of the last stage (``512`` channels for ResNet-18/34,
``2048`` for ResNet-50, as in the paper). When ``dim`` differs, a 1x1 conv + BN + ReLU before the
pooling maps the last stage to ``dim`` channels, so the embedding is still a pooled, non-negative
feature map (no extra bottleneck that FF-m would not have).
"""

from __future__ import annotations

import torch
from torch import nn

from mrl.params import check_int

__all__ = ["ResNet", "resnet18", "resnet34", "resnet50"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """Images ``[B, C, H, W]`` -> embeddings ``[B, dim]`` (pooled last stage)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        dim: int | None = None,
        in_channels: int = 3,
        stem: str = "small",
        width: int = 64,
    ) -> None:
        super().__init__()
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        width = check_int(width, "width", minimum=1)
        if dim is not None:  # dim=0 was the last stage's width (dim or cin), not an error
            dim = check_int(dim, "dim", minimum=1)
        if stem == "small":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
            )
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            raise ValueError(f"stem must be 'small' or 'imagenet', got stem={stem!r}")
        stages, cin = [], width
        for i, n in enumerate(layers):
            planes = width * 2**i
            for j in range(n):
                stages.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.dim = cin if dim is None else dim
        self.project = (
            nn.Identity()
            if self.dim == cin
            else nn.Sequential(
                nn.Conv2d(cin, self.dim, 1, bias=False), nn.BatchNorm2d(self.dim), nn.ReLU()
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.stages(self.stem(x))).mean(dim=(2, 3))  # [B, D]


def resnet18(
    dim: int | None = None, in_channels: int = 3, stem: str = "small", width: int = 64
) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), dim, in_channels, stem, width)


def resnet34(
    dim: int | None = None, in_channels: int = 3, stem: str = "small", width: int = 64
) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), dim, in_channels, stem, width)


def resnet50(
    dim: int | None = None, in_channels: int = 3, stem: str = "small", width: int = 64
) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), dim, in_channels, stem, width)
