"""Datasets as tensors: Fashion-MNIST, the 1000-class triple task, image folders, synthetic.

`load_task(name, ...)` returns a `Task`: the training source, the retrieval database (the training
images, or fixed triples) and the test set, each ready for `mrl.train` and `mrl eval`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrl.data.tensors import ImageTensors, TripleSource, augment, iterate_batches

__all__ = [
    "TASKS",
    "ImageTensors",
    "Task",
    "TripleSource",
    "augment",
    "iterate_batches",
    "load_task_for",
    "load_task",
]

TASKS = ("fashion-mnist", "fashion-mnist-1k", "synthetic", "image-folder")


@dataclass
class Task:
    """train: what training draws batches from; db / test: fixed labelled sets for evaluation."""

    name: str
    train: ImageTensors | TripleSource
    db: ImageTensors
    test: ImageTensors
    # What the data was, where a task's name does not say it (an image folder: its files); runs
    # record it, and evaluating or resuming on data with another fingerprint is refused.
    fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        return self.test.num_classes

    @property
    def in_channels(self) -> int:
        return self.test.in_channels

    @property
    def mean(self) -> tuple[float, ...]:
        return self.test.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.test.std


def load_task_for(config: Any, *, saved: bool = False, size_name: str = "data.train_size") -> Task:
    """The `Task` a training config names: its ``data`` section and its seed.

    ``saved``: the config of a trained run being read back (eval, cascade), not one about to
    train: a data.root that was another machine's Fashion-MNIST folder falls back to the
    default locations (with a warning), and train_size is not checked again. ``size_name``:
    what the user set train_size as, for the error (the demo's ``--train-size``).
    """
    d = config.data
    task = load_task(
        d.dataset,
        root=d.root,
        train_size=d.train_size,
        image_size=d.image_size,
        seed=config.seed,
        root_fallback=saved,
    )
    have = len(task.train)
    checked = not saved and d.dataset in ("fashion-mnist", "image-folder")
    if checked and d.train_size is not None and d.train_size > have:
        # a run must not claim a train_size it never had
        got = f"{size_name} {d.train_size}" if size_name.startswith("--") else (
            f"{size_name}={d.train_size}")
        raise ValueError(
            f"{size_name} must be <= {have} (the training images of {d.dataset}), got {got}"
        )
    return task


def load_task(
    name: str,
    *,
    root: str | None = None,
    train_size: int | None = None,
    image_size: int = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
    root_fallback: bool = False,
) -> Task:
    """Load a built-in task by name (see `TASKS`); ``train_size`` keeps a seeded subset.

    ``fashion-mnist-1k``: ``train_size`` is the number of training triples per epoch (drawn from
    all 60k images) and caps the retrieval database at min(50000, train_size) triples; its
    test and database triples are the same for every ``seed`` (one fixed benchmark).

    ``root``: the data folder (Fashion-MNIST files, or the image folder); ``image_size`` and
    ``test_fraction`` only apply to ``image-folder``.
    """
    if name == "fashion-mnist":
        from mrl.data.fashion_mnist import load_fashion_mnist

        kw = {"root_fallback": root_fallback}
        train = load_fashion_mnist("train", root, **kw).subset(train_size, seed)
        return Task(name, train, train, load_fashion_mnist("test", root, **kw))
    if name == "fashion-mnist-1k":
        from mrl.data.fashion_mnist_1k import load_fashion_mnist_1k

        n = train_size or 60000
        source, db, test = load_fashion_mnist_1k(root, train_triples=n, db_triples=min(50000, n),
                                                 root_fallback=root_fallback)
        return Task(name, source, db, test)
    if name == "synthetic":
        from mrl.data.synthetic import make_synthetic

        train = make_synthetic(n=train_size or 512, seed=seed, split="train")
        return Task(name, train, train, make_synthetic(n=128, seed=seed, split="test"))
    if name == "image-folder":
        task = _image_folder_task(root, image_size, test_fraction, seed)
        train = task.train.subset(train_size, seed)
        return Task(task.name, train, train, task.test, task.fingerprint)
    raise ValueError(f"dataset must be one of {TASKS}, got dataset={name!r}")


def _image_folder_task(root: str | None, image_size: int, test_fraction: float, seed: int) -> Task:
    import torch

    from mrl.data.image_folder import ImageFolder, pixel_stats, split_folders

    if root is None:
        raise ValueError("dataset 'image-folder' needs data.root (the folder of class subfolders)")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got test_fraction={test_fraction}")
    splits = split_folders(root) if Path(root).is_dir() else None
    if splits is not None:  # root/train + root/val: a fixed test split, whatever the seed
        return _split_folder_task(*splits, image_size)
    folder = ImageFolder(root, image_size=image_size)
    _need_two_classes(folder, f"root={str(root)!r}")  # before decoding every image
    full = folder.load_tensors()
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(len(full) * test_fraction))
    # Both splits are normalised with the training part's statistics: the folder's (the test
    # images included) would leak the test split into the model's input layer.
    train_images = full.images[perm[n_test:]]
    mean, std = pixel_stats(train_images)

    def part(images: torch.Tensor, idx: torch.Tensor, split: str) -> ImageTensors:
        return ImageTensors(
            images, full.labels[idx], full.num_classes, mean, std, f"{full.name}/{split}"
        )

    train = part(train_images, perm[n_test:], "train")
    test = part(full.images[perm[:n_test]], perm[:n_test], "test")
    return Task("image-folder", train, train, test, folder.fingerprint())


def _split_folder_task(train_dir: Path, test_dir: Path, image_size: int) -> Task:
    """``train/`` and ``val/`` (or ``test/``) folders of the same classes; the test images are
    normalised with the training images' mean and std."""
    from mrl.data.image_folder import ImageFolder

    train_folder = ImageFolder(train_dir, image_size=image_size)
    test_folder = ImageFolder(test_dir, image_size=image_size)
    if train_folder.classes != test_folder.classes:
        only_train = sorted(set(train_folder.classes) - set(test_folder.classes))
        only_test = sorted(set(test_folder.classes) - set(train_folder.classes))
        raise ValueError(
            f"image folders {str(train_dir)!r} and {str(test_dir)!r} must hold the same class "
            f"subfolders; only in {train_dir.name}/: {only_train}, only in {test_dir.name}/: "
            f"{only_test}"
        )
    _need_two_classes(train_folder, repr(str(train_dir)))
    root = train_dir.parent.name
    tr, te = train_folder.load_tensors(), test_folder.load_tensors()
    train = ImageTensors(tr.images, tr.labels, tr.num_classes, tr.mean, tr.std, f"{root}/train")
    test = ImageTensors(te.images, te.labels, te.num_classes, tr.mean, tr.std,
                        f"{root}/{test_dir.name}")  # fmt: skip
    fingerprint = (f"train/: {train_folder.fingerprint()}; {test_dir.name}/: "
                   f"{test_folder.fingerprint()}")  # fmt: skip
    return Task("image-folder", train, train, test, fingerprint)


def _need_two_classes(folder: Any, shown: str) -> None:
    """An `ImageFolder` of one class has nothing to classify (checked before any decoding)."""
    if len(folder.classes) < 2:
        raise ValueError(f"image folder {shown} has {len(folder.classes)} class subfolder; "
                         "classification needs at least 2")
