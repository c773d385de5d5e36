"""Image datasets held as tensors, and the batch iterator the training loop uses.

Small image datasets (Fashion-MNIST: 47 MB as uint8) fit in memory, even on the GPU. Keeping them
as one uint8 tensor ``[N, C, H, W]`` and indexing whole batches avoids the per-image Python work of
a `DataLoader` (which dominates at 28x28). Batches stay uint8 until the model's `Normalize` layer.

Every epoch's order and augmentation come from a generator seeded with ``(seed, epoch)``, so an
epoch is a pure function of the seed: a resumed run replays exactly the batches it would have seen,
and every DDP process computes the same global batch and takes its own slice of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["ImageTensors", "TripleSource", "augment", "epoch_generator", "iterate_batches"]


@dataclass
class ImageTensors:
    """A labelled image set: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean of pixel values in [0, 1]
    std: tuple[float, ...]  # per-channel std of pixel values in [0, 1]
    name: str = "images"

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be [N] with N={self.images.shape[0]}, got {tuple(self.labels.shape)}"
            )
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise ValueError(f"mean/std need one value per channel ({self.images.shape[1]})")
        if self.labels.is_floating_point() or self.labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got dtype {self.labels.dtype}")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < int(
            self.num_classes
        ):  # one check per data set, not per step
            raise ValueError(
                f"labels must be in [0, num_classes={self.num_classes}), got values in "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, n: int | None, seed: int = 0) -> ImageTensors:
        """The first ``n`` items of a seeded shuffle (the whole set when ``n`` is None or >= N)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise ValueError(f"subset size must be positive, got n={n}")
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageTensors(
            self.images[idx], self.labels[idx], self.num_classes, self.mean, self.std, self.name
        )

    def to(self, device: torch.device | str) -> ImageTensors:
        return ImageTensors(
            self.images.to(device),
            self.labels.to(device),
            self.num_classes,
            self.mean,
            self.std,
            self.name,
        )

    # The batch-source protocol used by `iterate_batches`.
    def epoch_indices(self, generator: torch.Generator) -> torch.Tensor:
        """A shuffled order of the items: ``[N]``."""
        return torch.randperm(len(self), generator=generator)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]


@dataclass
class TripleSource:
    """Training triples composed on the fly: three base images side by side, label 100a+10b+c.

    Each epoch draws ``length`` fresh random triples ``[L, 3]`` of base indices; `gather` places the
    three ``[C, H, W]`` images left to right (``[C, H, 3W]``).
    """

    base: ImageTensors
    length: int

    @property
    def num_classes(self) -> int:
        return self.base.num_classes**3

    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    def __len__(self) -> int:
        return self.length

    def to(self, device: torch.device | str) -> TripleSource:
        return TripleSource(self.base.to(device), self.length)

    def epoch_indices(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(len(self.base), (self.length, 3), generator=generator)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return compose_triples(self.base.images, self.base.labels, idx, self.base.num_classes)


def compose_triples(
    images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, base_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """images [N, C, H, W], idx [B, 3] -> x [B, C, H, 3W], y [B] = a*c^2 + b*c + c'."""
    x = torch.cat([images[idx[:, 0]], images[idx[:, 1]], images[idx[:, 2]]], dim=-1)
    la, lb, lc = labels[idx[:, 0]], labels[idx[:, 1]], labels[idx[:, 2]]
    return x, (la * base_classes + lb) * base_classes + lc


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, epoch)``."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


def iterate_batches(
    source: ImageTensors | TripleSource,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield this process's part of every global batch of one epoch.

    ``batch_size`` is the global batch; process ``rank`` takes rows ``[rank*b, (rank+1)*b)`` of
    each global batch, ``b = batch_size // world_size``. Indices are made on the CPU once per epoch
    and moved to the data's device in one copy. With ``drop_last=False`` the last, partial global
    batch is split as evenly as it goes (parts differ by at most one row); when it has fewer rows
    than processes it is dropped, so that every process yields the same number of batches (a
    process with an empty batch, or one batch more than the others, stalls an all-reduce).
    """
    if batch_size <= 0 or batch_size % world_size:
        raise ValueError(
            f"batch_size must be a positive multiple of the number of processes ({world_size}), "
            f"got batch_size={batch_size}"
        )
    order = source.epoch_indices(epoch_generator(seed, epoch))
    device = _device_of(source)
    order = order.to(device)
    n = order.shape[0]
    stop = n - n % batch_size if drop_last else n
    local = batch_size // world_size
    for start in range(0, stop, batch_size):
        chunk = order[start : min(start + batch_size, n)]
        if world_size > 1 and len(chunk) < world_size:
            break  # the partial last batch: not one row for each process
        if world_size > 1:  # a full batch: [rank*local, (rank+1)*local); a partial one: even
            chunk = chunk.tensor_split(world_size)[rank] if len(chunk) < batch_size else (
                chunk[rank * local : (rank + 1) * local])
        yield source.gather(chunk)


def _device_of(source: ImageTensors | TripleSource) -> torch.device:
    base = source.base if isinstance(source, TripleSource) else source
    return base.images.device


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    flip: bool = False,
    crop_pad: int = 0,
    total: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Random horizontal flips and random crops (zero-pad ``crop_pad`` pixels, crop back).

    ``x`` [B, C, H, W] (any dtype, any device); the random draws (a few numbers per image) are
    made on ``generator``'s device: a CPU generator gives the same images on every device, one
    on ``x``'s GPU spares a host-to-device copy (and the wait for the GPU it costs) per batch,
    with a stream of its own (CUDA's generator is not the CPU's). Under DDP, ``x`` is rows
    ``[offset, offset + B)`` of a global batch of ``total`` items: the draws are made for the whole
    global batch and sliced, so every process follows the single-process random stream.
    """
    B, _, H, W = x.shape
    total = B if total is None else total
    if not 0 <= offset <= total - B:
        raise ValueError(f"offset={offset} does not fit a slice of {B} rows in total={total}")
    rows = slice(offset, offset + B)
    if flip:
        mask = torch.rand(total, generator=generator, device=generator.device)[rows] < 0.5
        mask = mask.to(x.device)  # no copy when drawn there
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    if crop_pad > 0:
        p = crop_pad
        shifts = torch.randint(0, 2 * p + 1, (2, total), generator=generator,
                               device=generator.device)[:, rows].to(x.device)  # fmt: skip
        padded = torch.nn.functional.pad(x, (p, p, p, p))  # [B, C, H+2p, W+2p]
        rows = torch.arange(H, device=x.device)[None, :] + shifts[0][:, None]  # [B, H]
        cols = torch.arange(W, device=x.device)[None, :] + shifts[1][:, None]  # [B, W]
        b = torch.arange(B, device=x.device)[:, None, None]
        # [B, H, W, C] by advanced indexing over (batch, row, col), then back to [B, C, H, W].
        x = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return x
