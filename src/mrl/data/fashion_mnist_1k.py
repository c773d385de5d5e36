"""``fashion-mnist-1k``: a 1000-class task built from Fashion-MNIST, the paper's regime, small.

An item is three Fashion-MNIST images side by side (``[1, 28, 84]``) and its label is
``100a + 10b + c`` for the three classes ``a, b, c``. With 1000 classes, small prefixes are short
of room, which is where Matryoshka training pays off (the paper trains on ImageNet-1k).

- training triples are composed on the fly from the 60k training images (fresh every epoch);
- the test set: fixed, seeded triples of the 10k test images (default 10k triples);
- the retrieval database: fixed, seeded triples of the training images (default 50k triples).
"""

from __future__ import annotations

import hashlib
import os

import torch

from mrl.data.fashion_mnist import load_fashion_mnist
from mrl.data.tensors import ImageTensors, TripleSource, compose_triples

__all__ = ["DB_DRAW", "database_seed", "fixed_triples", "load_fashion_mnist_1k"]

# Which database draw `load_fashion_mnist_1k` makes (records of `mrl reproduce` carry it): 1 was
# generator seed ``seed + 1``, seed 0's second training epoch; 2 is `database_seed`.
DB_DRAW = 2


def fixed_triples(base: ImageTensors, count: int, seed: int, name: str) -> ImageTensors:
    """``count`` seeded random triples of ``base`` as `ImageTensors` ``[count, C, H, 3W]``."""
    if count <= 0:
        raise ValueError(f"count must be positive, got count={count}")
    idx = torch.randint(len(base), (count, 3), generator=torch.Generator().manual_seed(seed))
    x, y = compose_triples(base.images, base.labels, idx, base.num_classes)
    return ImageTensors(x, y, base.num_classes**3, base.mean, base.std, name)


def load_fashion_mnist_1k(
    root: str | os.PathLike | None = None,
    *,
    train_triples: int = 60000,
    test_triples: int = 10000,
    db_triples: int = 50000,
    seed: int = 0,
    download: bool = True,
    root_fallback: bool = False,
) -> tuple[TripleSource, ImageTensors, ImageTensors]:
    """(training source, database triples, test triples); the fixed sets depend on ``seed`` only.

    ``root_fallback``: as in `load_fashion_mnist` (a recorded ``root`` that is gone falls back to
    the default locations with a warning: evaluating a run whose data copy was removed)."""
    kw = {"root_fallback": root_fallback}
    train = load_fashion_mnist("train", root, download, **kw)
    test = load_fashion_mnist("test", root, download, **kw)
    return (
        TripleSource(train, train_triples),
        fixed_triples(train, db_triples, database_seed(seed), "fashion-mnist-1k/db"),
        fixed_triples(test, test_triples, seed + 2, "fashion-mnist-1k/test"),
    )


def database_seed(seed: int) -> int:
    """The database triples' generator seed: a stream of its own. It was ``seed + 1``, which is
    `epoch_generator(0, 1)`: with seed 0 the second training epoch's first 50k triples were
    exactly the database's (until 2026-11-30). The test triples (``seed + 2``) are drawn from the
    test images, which training never sees."""
    digest = hashlib.blake2b(f"fashion-mnist-1k/db/{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63: a valid torch seed
