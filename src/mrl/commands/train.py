"""`mrl train CONFIG --out RUN_DIR [--set key=value ...] [--resume]`: train one model.

CONFIG is a JSON/TOML file (see `configs/`); ``--set`` overrides dotted keys with type checks
(``--set optim.lr=0.05 --set model.mode=mrl-e``); ``--show-config`` lists every key. Under
``torchrun --nproc_per_node N mrl train ...`` the run is data-parallel (DDP).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mrl.io import check_output_dir_of

NAME = "train"
HELP = "train an image encoder with Matryoshka (or baseline) heads from a config file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", help="config file (.json or .toml), e.g. configs/fashion-mnist.json"
    )
    parser.add_argument("--out", help="run folder: checkpoint.pt, config.json, metrics.jsonl")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable), e.g. --set optim.lr=0.1",
    )
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--show-config",
        action="store_true",
        help="print every config key with its type, default and meaning; exit",
    )


def _checkpoint_stamp(run_dir: str) -> tuple[int, int] | None:
    """(inode, mtime) of the run's checkpoint: every save replaces the file, so an unchanged
    stamp means training wrote nothing (without reading the weights a second time)."""
    from mrl.train import CHECKPOINT

    path = Path(run_dir) / CHECKPOINT
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.is_file() else None


def _holds_a_train_config(folder: Path) -> bool:
    """``config.json`` is a run's only when it is an mrl training config: every Hugging Face
    model folder has a config.json too, which training would overwrite. (Another torchrun
    process may have written the run's config.json a moment ago: that one is ours.)"""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and {"model", "data", "optim"} <= set(data)


def run(args: argparse.Namespace) -> int:
    from mrl.config import describe, load_config

    if args.show_config:
        print(describe())
        return 0
    if args.config is None or args.out is None:
        raise ValueError("mrl train needs CONFIG and --out RUN_DIR (or --show-config)")
    check_output_dir_of(args.out, "--out", ("checkpoint.pt", "metrics.jsonl"),
                        "a training run folder", owns=_holds_a_train_config)
    config = load_config(args.config, args.overrides)
    from mrl.train import train

    before = _checkpoint_stamp(args.out)
    ckpt = train(config, args.out, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun: one line, from rank 0
        finished = before is not None and before == _checkpoint_stamp(args.out)
        what = "already trained (nothing to resume)" if finished else "trained"
        print(f"{what} {config.model.mode} ({config.model.name}, D={config.model.dim}) -> {ckpt}")
    return 0
