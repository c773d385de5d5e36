"""Users' own images: one subfolder per class (the ImageNet layout), read with Pillow.

```
root/                              or, split already (ImageNet's train/ and val/):
  cat/ 001.jpg 002.png ...         root/train/cat/ ..., root/train/dog/ ...
  dog/ ...                         root/val/cat/ ...,   root/val/dog/ ...   (or root/test/)
```

`ImageFolder` is a map-style dataset (``ds[i] -> (image tensor, label)``) usable with a PyTorch
`DataLoader` for large sets, and `ImageFolder.load_tensors()` decodes everything once into
`ImageTensors` (uint8, fixed size) for the fast in-memory training loop. The transforms are small
classes written here (no torchvision): `Resize`, `CenterCrop`, `RandomCrop`, `RandomHorizontalFlip`,
`ToTensor` (uint8 ``[C, H, W]``), `Normalize` and `Compose`.
"""

from __future__ import annotations

import os
import random
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mrl.data.tensors import ImageTensors

__all__ = [
    "IMAGE_EXTENSIONS",
    "split_folders",
    "CenterCrop",
    "Compose",
    "ImageFolder",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "ToTensor",
    "pixel_stats",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _pil():
    from mrl._optional import require

    return require("PIL.Image", "vision")


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    """Resize a PIL image so that its shorter side is ``size`` pixels (aspect ratio kept)."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got size={size}")
        self.size = size

    def __call__(self, img: Any) -> Any:
        w, h = img.size
        scale = self.size / min(w, h)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        return img.resize(new, _pil().BILINEAR) if new != (w, h) else img


class CenterCrop:
    """Crop the central ``size x size`` square of a PIL image (zero-padded if smaller)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Any) -> Any:
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


class RandomCrop:
    """Crop a random ``size x size`` square (after zero-padding ``padding`` px per side)."""

    def __init__(self, size: int, padding: int = 0, rng: random.Random | None = None) -> None:
        self.size, self.padding = size, padding
        self.rng = rng or random.Random()

    def __call__(self, img: Any) -> Any:
        w, h = img.size
        p = self.padding
        left = self.rng.randint(-p, max(-p, w + p - self.size))
        top = self.rng.randint(-p, max(-p, h + p - self.size))
        return img.crop((left, top, left + self.size, top + self.size))  # outside -> zeros


class RandomHorizontalFlip:
    """Mirror a PIL image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, rng: random.Random | None = None) -> None:
        self.p = p
        self.rng = rng or random.Random()

    def __call__(self, img: Any) -> Any:
        if self.rng.random() < self.p:
            return img.transpose(_pil().FLIP_LEFT_RIGHT)
        return img


class ToTensor:
    """PIL image -> uint8 tensor ``[C, H, W]`` with C = ``channels`` (1: converted to "L", 3:
    to RGB, so a grey image gives three equal channels; image-folder tasks use 3).

    Images of more than 8 bits per pixel are scaled, not clipped, to 0..255 first: 16-bit and
    32-bit integer images (modes ``I;16*``, ``I``) by 255 / 65535, float images (mode ``F``) from
    [0, 1] (PIL's own conversion would clip them and turn most pixels white or black).
    """

    def __init__(self, channels: int = 3) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got channels={channels}")
        self.channels = channels

    def __call__(self, img: Any) -> torch.Tensor:
        img = _to_8bit(img)
        img = img.convert("L" if self.channels == 1 else "RGB")
        w, h = img.size
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return data.view(h, w, self.channels).permute(2, 0, 1).contiguous()


def _to_8bit(img: Any) -> Any:
    """A mode ``I;16*`` / ``I`` / ``F`` image as mode ``L``, its range scaled to 0..255."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    import numpy as np

    x = np.asarray(img, dtype=np.float64)
    scale = 255.0 if img.mode == "F" else 255.0 / 65535.0
    x = np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)
    return _pil().fromarray(x, mode="L")


class Normalize:
    """uint8 or [0, 1] float ``[C, H, W]`` -> ``(x / 255 - mean) / std`` per channel (float32)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


# held-out split folder names beside train/, by preference (the first one present is tested on)
HELD_OUT = ("val", "valid", "validation", "test")


def split_folders(root: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(root/train, root/val)`` (or ``valid``, ``validation``, ``test``: `HELD_OUT`) when
    ``root`` is split already, each split a folder of class subfolders; None when ``root``
    itself holds the class subfolders.

    Read as one folder of classes, a split layout would silently become a 2-class problem
    ("train" vs "val"), so a ``train/`` beside ``val/`` or ``test/`` whose entries are folders
    is taken as splits, and anything else beside them is an error. With several held-out
    folders the first of `HELD_OUT` is the test split (ImageNet's ``test/`` has no labels) and a
    warning says which are not read.
    """
    root = Path(root)
    subs = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    held_out = [n for n in HELD_OUT if n in subs]
    train = root / "train"
    if "train" not in subs or not any(
        d.is_dir() and not d.name.startswith(".") for d in train.iterdir()
    ):
        return None  # class subfolders (a class may be called "train" if it holds images)
    if not held_out:  # classes, one of them "train" with subfolders: or splits misnamed?
        warnings.warn(
            f"image folder root={str(root)!r}: read as classes {sorted(subs)}, although train/ "
            f"holds folders; if it is a split, name the held-out one {' or '.join(HELD_OUT)}",
            stacklevel=2,
        )
        return None
    others = sorted(subs - {"train", *HELD_OUT})
    if others:
        raise ValueError(
            f"image folder root={str(root)!r} holds split folders (train/, "
            f"{'/, '.join(held_out)}/) and also {others}: keep either splits (each of class "
            "subfolders) or class subfolders only"
        )
    if len(held_out) > 1:
        warnings.warn(
            f"image folder root={str(root)!r}: {held_out[0]}/ is the test split; "
            f"{'/, '.join(held_out[1:])}/ not read",
            stacklevel=2,
        )
    return train, root / held_out[0]


def _progress(n: int) -> Any:
    """range(n) with a progress bar on stderr for long decodes (about 5 ms per image: 100k
    images are minutes of otherwise silent work), when tqdm is installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return range(n)
    return tqdm(range(n), desc="decoding images", disable=n < 2000, leave=False, file=sys.stderr)


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root/<class>/``; classes are the sorted subfolder names.

    Args:
        root: the folder holding one subfolder per class.
        transform: applied to each PIL image (default: resize + centre crop to ``image_size`` and
            `ToTensor`).
        image_size: side of the square images produced by the default transform, in pixels.
        channels: 1 (grey) or 3 (RGB).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Any], Any] | None = None,
        image_size: int = 64,
        channels: int = 3,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise FileNotFoundError(f"image folder root={str(self.root)!r} {what}")
        # Hidden folders (.ipynb_checkpoints, .git, ...) are not classes.
        self.classes = sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not self.classes:
            raise ValueError(f"image folder root={str(self.root)!r} has no class subfolders")
        self.samples: list[tuple[Path, int]] = []
        empty, skipped = [], []
        for label, name in enumerate(self.classes):
            # hidden files and folders (macOS ``._x.jpg``, .ipynb_checkpoints) are not data
            found = sorted(p for p in _walk_files(self.root / name)
                           if not _hidden(p, self.root))  # fmt: skip
            files = [p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS]
            skipped += [p for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS]
            self.samples += [(p, label) for p in files]
            if not files:
                empty.append(name)
        loose = sorted(p.name for p in self.root.iterdir() if p.is_file()
                       and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if loose:  # an image outside every class folder has no label: never a silent loss
            warnings.warn(
                f"image folder {str(self.root)!r}: {len(loose)} images lie in the root, outside "
                f"every class subfolder (e.g. {loose[0]}), and are not used; move each into "
                "its class's folder",
                stacklevel=2,
            )
        if skipped:  # never a silent loss: a .jfif or .avif the user meant as an image
            warnings.warn(
                f"image folder {str(self.root)!r}: skipped {len(skipped)} files with other "
                f"extensions than {IMAGE_EXTENSIONS} (e.g. "
                f"{skipped[0].relative_to(self.root)}); rename or convert images to use them",
                stacklevel=2,
            )
        if not self.samples:
            raise ValueError(
                f"image folder root={str(self.root)!r} has no images with extensions "
                f"{IMAGE_EXTENSIONS} in its class subfolders"
            )
        if empty:  # a class without images would be a class no model can learn
            raise ValueError(
                f"image folder root={str(self.root)!r}: class subfolders {empty} hold no images "
                f"with extensions {IMAGE_EXTENSIONS}; remove them or add images"
            )
        self.image_size, self.channels = image_size, channels
        self.transform = transform or Compose(
            [Resize(image_size), CenterCrop(image_size), ToTensor(channels)]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> Any:
        path = self.samples[i][0]
        try:
            with _pil().open(path) as img:
                img.load()
                return img.copy()
        except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
            raise ValueError(f"unreadable image file {path}: {exc}") from None

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(self.load_image(i)), self.samples[i][1]

    def fingerprint(self) -> str:
        """The files, their classes and sizes, hashed: "N files, sha256 <16 hex>". The random
        train/test split is over this list, so a folder with files added, removed or moved
        splits differently (test images that were trained on)."""
        import hashlib

        h = hashlib.sha256()
        for path, label in self.samples:
            h.update(f"{path.relative_to(self.root)}\t{label}\t{path.stat().st_size}\n".encode())
        return f"{len(self.samples)} files, sha256 {h.hexdigest()[:16]}"

    def load_tensors(self) -> ImageTensors:
        """Decode every image once (default transform) into `ImageTensors` with its own mean/std."""
        to_tensor = Compose(
            [Resize(self.image_size), CenterCrop(self.image_size), ToTensor(self.channels)]
        )
        images = torch.stack([to_tensor(self.load_image(i)) for i in _progress(len(self))])
        labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        mean, std = pixel_stats(images)
        return ImageTensors(
            images, labels, len(self.classes), mean, std, f"folder:{self.root.name}"
        )


def _walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, following links to folders (``rglob`` on Python 3.11 does
    not: a class's linked subfolder was dropped without a word), each real folder once."""
    out, seen = [], set()
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back up the tree: walked already
            dirs[:] = []
            continue
        seen.add(real)
        out += [Path(here) / f for f in files if (Path(here) / f).is_file()]
    return out


def pixel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (at least 1e-3) of uint8 images ``[N, C, H, W]``, in [0, 1].

    A task's input statistics come from its training images only (never its test split).
    Summed in float64 chunks of images: a float copy of the whole set (and its transposed
    copy) needed about 8x the uint8 data in extra memory."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    per_image = images[0].numel() // channels if len(images) else 1
    step = max(1, (1 << 24) // max(1, images[0].numel())) if len(images) else 1
    for start in range(0, len(images), step):
        x = images[start : start + step].to(torch.float64).div_(255)  # [b, C, H, W]
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    n = len(images) * per_image
    mean = total / n
    var = (squares - n * mean * mean).clamp_min(0) / max(1, n - 1)  # sample variance, as std()
    return tuple(mean.tolist()), tuple(max(s, 1e-3) for s in var.sqrt().tolist())
