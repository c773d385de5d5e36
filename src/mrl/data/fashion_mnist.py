"""Fashion-MNIST (Xiao et al., 2017): 60k train / 10k test grey 28x28 images, 10 classes.

Where the files come from, in order:

1. a folder given by the caller (``root``) or the ``MRL_FASHION_MNIST`` environment variable
   (either one is the only place looked at: a typo is an error, never another copy);
2. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
3. the cache folder (``$MRL_CACHE/fashion-mnist``, default ``~/.cache/mrl/fashion-mnist``);
4. when ``download=True``: the official files, fetched into the cache and checked against the
   official MD5 sums before they are kept.

Every file is also checked for structure (IDX magic number, shape, label range), so a truncated or
corrupt file gives a clear error naming it instead of garbage tensors. The whole dataset is held as
tensors (47 MB as uint8), which is what the training loop wants: no per-image Python work.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch

from mrl.data.tensors import ImageTensors
from mrl.io import file_digest

__all__ = [
    "CLASSES",
    "FILES",
    "SYSTEM_DIR",
    "cache_dir",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
BASE_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# split -> (images file, labels file, number of items); MD5 of the official .gz files.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# Fashion-MNIST statistics of the training images (pixel values in [0, 1]).
MEAN, STD = (0.2860,), (0.3530,)

# IDX type codes -> numpy dtype (big-endian as stored).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def cache_dir() -> Path:
    """``$MRL_CACHE/fashion-mnist`` or ``~/.cache/mrl/fashion-mnist``."""
    base = os.environ.get("MRL_CACHE") or Path.home() / ".cache" / "mrl"
    return Path(base).expanduser() / "fashion-mnist"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (optionally gzip'ed) into a numpy array; clear errors on corrupt files.

    Format: 2 zero bytes, a type code, the number of dims n, n big-endian uint32 sizes, the data.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"corrupt data file {path}: cannot read it ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"corrupt data file {path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"corrupt data file {path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize  # exact: np.prod wrapped at 2**63
    if len(raw) - header != expected:
        raise ValueError(
            f"corrupt data file {path}: header promises {expected} data bytes for shape "
            f"{shape}, file holds {len(raw) - header}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _candidate_dirs() -> list[Path]:
    return [SYSTEM_DIR, cache_dir()]


_NAMES = tuple(name for pair in FILES.values() for name in pair[:2])  # the four .gz files


def _has_all(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _NAMES)


def find_fashion_mnist(
    root: str | os.PathLike | None = None, download: bool = False, root_fallback: bool = False
) -> Path:
    """The folder holding the four Fashion-MNIST files; downloads them when allowed and missing.

    An explicit ``root`` (``data.root`` in a config) is the only place looked at: a typo must
    not silently train on another copy; so is $MRL_FASHION_MNIST when set. Without either: the
    Debian package's folder, then mrl's cache. ``root_fallback``: a root that lacks the files is
    skipped with a warning instead (reading a saved run whose data.root was another machine's
    folder).
    """
    if root is not None and root_fallback and not _has_all(Path(root)):
        warnings.warn(
            f"data.root={str(root)!r} of the saved run does not hold Fashion-MNIST here; using "
            "the default locations",
            stacklevel=2,
        )
        root = None
    if root is not None:
        return _explicit_root(Path(root), download)
    if os.environ.get("MRL_FASHION_MNIST"):
        return _explicit_root(Path(os.environ["MRL_FASHION_MNIST"]).expanduser(), download,
                              "MRL_FASHION_MNIST")
    searched = _candidate_dirs()
    for folder in searched:
        if _has_all(folder):
            return folder
    if download:
        try:
            return _download(cache_dir())
        except OSError as exc:  # offline, DNS failure, HTTP error ...
            reason = f"downloading failed ({exc})"
    else:
        reason = "downloading is off"
    raise FileNotFoundError(
        "Fashion-MNIST not found in " + ", ".join(str(d) for d in searched) + f"; {reason}. "
        "Get it either way: (1) as root, `apt-get install dataset-fashion-mnist` (files land in "
        f"{SYSTEM_DIR}), or (2) when online, let mrl download the official files into "
        f"{cache_dir()} (set MRL_CACHE to change the folder)."
    )


def _explicit_root(folder: Path, download: bool, name: str = "data.root") -> Path:
    """``folder`` named by ``name`` (data.root or $MRL_FASHION_MNIST) holds the files, or gets
    them by download, or is an error: never a silent fall back to another copy."""
    if _has_all(folder):
        return folder
    if download and not folder.is_file():
        created = _missing_folders(folder)  # [folder, its parent, ...] that do not exist yet
        try:
            return _download(folder)
        except (OSError, ValueError) as exc:  # ValueError: an MD5 mismatch, raised as it is
            for made in created:  # leave no empty folder behind a failed download (the
                if made.is_dir() and not any(made.iterdir()):  # parents it made too)
                    made.rmdir()
            if isinstance(exc, ValueError):
                raise
            reason = f"downloading into it failed ({exc})"
    else:
        reason = "downloading is off" if not folder.is_file() else "it is a file"
    others = f"{SYSTEM_DIR} or mrl's download cache"
    raise FileNotFoundError(
        f"{name}={str(folder)!r} does not hold the Fashion-MNIST files {list(_NAMES)}; "
        f"{reason}. Point {name} at the folder that holds them, or leave it unset to use "
        + (others if name != "data.root" else f"$MRL_FASHION_MNIST, {others}") + "."
    )


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist, innermost first."""
    out = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        out.append(p)
    return out


def _download(folder: Path) -> Path:
    """Fetch the official files into ``folder``; a file is kept only if its MD5 matches."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, md5 in MD5.items():
        target = folder / name
        if target.is_file() and file_digest(target, "md5") == md5:
            continue
        tmp = folder / f".{name}.part"
        try:
            with urllib.request.urlopen(BASE_URL + name, timeout=60) as resp, open(tmp, "wb") as f:
                while block := resp.read(1 << 20):
                    f.write(block)
            got = file_digest(tmp, "md5")
            if got != md5:
                raise ValueError(f"downloaded {name} has MD5 {got}, expected {md5}; not kept")
            os.replace(tmp, target)
        finally:  # a reset connection or Ctrl-C leaves no partial file behind
            tmp.unlink(missing_ok=True)
    return folder


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = True,
    root_fallback: bool = False,
) -> ImageTensors:
    """One split as `ImageTensors`: images uint8 ``[N, 1, 28, 28]``, labels int64 ``[N]``."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got split={split!r}")
    folder = find_fashion_mnist(root, download=download, root_fallback=root_fallback)
    image_file, label_file, count = FILES[split]
    images = read_idx(folder / image_file)
    labels = read_idx(folder / label_file)
    if images.shape != (count, 28, 28) or images.dtype != np.uint8:
        raise ValueError(
            f"corrupt data file {folder / image_file}: expected uint8 images of shape "
            f"({count}, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.shape != (count,) or labels.dtype != np.uint8 or labels.max() > 9:
        raise ValueError(  # float labels (3.7) were cut to whole classes without a word
            f"corrupt data file {folder / label_file}: expected {count} uint8 labels in 0..9, "
            f"got {labels.dtype} {labels.shape}"
        )
    return ImageTensors(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        mean=MEAN,
        std=STD,
        name=f"fashion-mnist/{split}",
    )
