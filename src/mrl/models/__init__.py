"""Encoders and the classifier that wraps them: `Normalize` -> encoder -> nested head.

Encoders map images ``[B, C, H, W]`` to embeddings ``[B, D]``. Built-in ones are in a registry
(`build_encoder(name, dim, in_channels, **options)`, `ENCODERS`); any other `nn.Module` with that
contract (e.g. a torchvision model with its classifier removed) can be wrapped by
`MatryoshkaClassifier` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mrl.models.cnn import SmallCNN
from mrl.models.mlp import MLPEncoder
from mrl.models.resnet import resnet18, resnet34, resnet50
from mrl.nesting import Nesting
from mrl.params import check_int

__all__ = [
    "ENCODERS",
    "MLPEncoder",
    "MatryoshkaClassifier",
    "Normalize",
    "SmallCNN",
    "build_encoder",
    "register_encoder",
]

ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "cnn": lambda dim, in_channels, **kw: SmallCNN(dim, in_channels, **kw),
    "mlp": lambda dim, in_channels, **kw: MLPEncoder(dim, in_channels, **kw),
    "resnet18": lambda dim, in_channels, **kw: resnet18(dim, in_channels, **kw),
    "resnet34": lambda dim, in_channels, **kw: resnet34(dim, in_channels, **kw),
    "resnet50": lambda dim, in_channels, **kw: resnet50(dim, in_channels, **kw),
}


def register_encoder(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add an encoder factory ``factory(dim, in_channels, **options) -> nn.Module``."""
    if name in ENCODERS:
        raise ValueError(f"encoder name={name!r} is already registered")
    ENCODERS[name] = factory


def build_encoder(name: str, dim: int, in_channels: int, **options) -> nn.Module:
    """A registered encoder mapping ``[B, in_channels, H, W]`` to ``[B, dim]``."""
    if name not in ENCODERS:
        raise ValueError(f"model.name must be one of {sorted(ENCODERS)}, got {name!r} (an encoder "
                         "you register with register_encoder exists only in the process that "
                         "registers it: for the mrl command name its module in MRL_PLUGINS)")
    dim = check_int(dim, "dim", minimum=1)  # dim=True was a 1-d embedding
    in_channels = check_int(in_channels, "in_channels", minimum=1)  # 0 built a model
    return ENCODERS[name](dim, in_channels, **options)


class Normalize(nn.Module):
    """uint8 (0..255) or float (0..1) images -> ``(x/255 - mean) / std`` per channel (float32).

    Part of the model so that a checkpoint always carries its input statistics.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, H, W] only: anything else would broadcast against the [1, C, 1, 1] statistics
        # into a silently wrong shape (e.g. [4, 3] -> [1, 3, 4, 3])
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"Normalize expects images [B, {self.mean.shape[1]}, H, W], got "
                             f"shape {tuple(x.shape)} (for other inputs pass normalize=None)")
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std


class MatryoshkaClassifier(nn.Module):
    """``normalize -> encoder -> head``: ``forward(x) -> (z [B, D], logits [G, B, C])``.

    ``head`` is one of `mrl.heads` (`make_head`); its ``.nesting`` names the G prefixes of the
    logits. `embed` returns only the embeddings (what evaluation stores).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, normalize: nn.Module | None = None):
        super().__init__()
        self.normalize = normalize or nn.Identity()
        self.encoder = encoder
        self.head = head

    @property
    def nesting(self) -> Nesting:
        return self.head.nesting

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(x))  # [B, D]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.embed(x)
        return z, self.head(z)  # [B, D], [G, B, C]
