"""Bring your own image encoder and train it with Matryoshka heads, then evaluate every prefix.

Shows the Python route for a custom `nn.Module` (images [B, C, H, W] -> embeddings [B, D]):
register it by name (`mrl.models.register_encoder`), give `mrl.train.train` a config naming it
and a `Task` of your own data (here a tiny synthetic one), then embed the database and test sets
once (`compute_embeddings`) and evaluate every prefix z[:, :m] from those embeddings
(`evaluate_embeddings`: the heads' top-1, and 1-NN / mAP@10 / P@10 retrieval).

Run:
    python examples/custom_encoder.py                  # ~20 s on a CPU
    python examples/custom_encoder.py --quick          # a few seconds (what the tests run)
    python examples/custom_encoder.py --out runs/mine  # keep the run folder (checkpoint, metrics)
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from mrl.commands.eval import compute_embeddings, evaluate_embeddings
from mrl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from mrl.data import Task
from mrl.data.synthetic import make_synthetic
from mrl.models import ENCODERS, register_encoder
from mrl.records import to_markdown
from mrl.train import train

ENCODER = "example-tiny-convnet"


class TinyConvNet(nn.Module):
    """Your encoder: images [B, C, H, W] -> embeddings [B, D]. Any module with that contract works
    (e.g. a torchvision backbone with its classifier removed)."""

    def __init__(self, dim: int, in_channels: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )  # fmt: skip
        self.proj = nn.Linear(2 * width, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)  # [B, 2w, H/2, W/2]
        return self.proj(h.mean(dim=(2, 3)))  # global average pool [B, 2w] -> [B, D]


def make_task(n_train: int, num_classes: int, seed: int) -> Task:
    """Your data as a `Task`: uint8 images [N, 1, 16, 16] + labels [N] (class prototypes + noise).
    The database (retrieval corpus) is the training set, as in `mrl eval`."""
    kw = {"num_classes": num_classes, "size": 16, "noise": 70.0, "seed": seed}
    train_set = make_synthetic(n=n_train, split="train", **kw)
    test_set = make_synthetic(n=max(n_train // 4, num_classes), split="test", **kw)
    return Task("toy-prototypes", train_set, train_set, test_set)


def make_config(args: argparse.Namespace) -> TrainConfig:
    """Nesting 'doubling:2' with D=64: heads (and the loss, a sum) at prefixes 2, 4, ..., 64."""
    return TrainConfig(
        data=DataConfig(dataset="synthetic"),  # recorded only: the Task below is what trains
        model=ModelConfig(name=ENCODER, dim=args.dim, mode="mrl", nesting="doubling:2"),
        optim=OptimConfig(lr=3e-3),
        epochs=args.epochs, batch_size=64, seed=args.seed, device=args.device,
    )  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None, help="run folder (must be new; default: a temp folder)")
    p.add_argument("--dim", type=int, default=64, help="embedding size D")
    p.add_argument("--epochs", type=int, default=None, help="default 8 (--quick: 4)")
    p.add_argument("--train-size", type=int, default=None,
                   help="training images (default 4096; --quick: 1024)")  # fmt: skip
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quick", action="store_true", help="tiny run (seconds on a CPU)")
    args = p.parse_args(argv)
    sizes = {"epochs": (8, 4), "train_size": (4096, 1024)}  # (full, --quick)
    for name, (full, quick) in sizes.items():  # an option given explicitly wins over --quick
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if ENCODER not in ENCODERS:  # a registration lives in this process (once per process)
        register_encoder(ENCODER, lambda dim, in_channels, **kw: TinyConvNet(dim, in_channels))
    task = make_task(args.train_size, args.classes, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.out or tmp
        train(make_config(args), run_dir, task=task, progress=not args.quick)
        # Encode once: db [N, D], test [Q, D], the heads' logits [G, Q, C]; prefixes are slices.
        emb = compute_embeddings(run_dir, device=None if args.device == "auto" else args.device,
                                 task=task)  # fmt: skip
    records = evaluate_embeddings(emb)  # top1 (heads), 1nn, map@10, p@10 at every prefix
    print(f"{args.classes} classes, D={args.dim}, {len(task.train)} training images; "
          "columns: prefix m (dims), values in %")  # fmt: skip
    print(to_markdown(records))
    return records


if __name__ == "__main__":
    main()
