"""Where cascade logits come from: a logits file (``.npz``) or a trained run folder.

A logits file is self-describing: ``logits [G, N, C]`` (float32), ``labels [N]`` (int64), optional
``embeddings [N, D]`` (float32), and two JSON strings, ``nesting`` and ``meta`` (mode, ff_dim,
dataset, split; from a run folder also run, epoch and epochs, so that logits of an interrupted run
are warned about as `mrl eval` does). `save_logits` / `load_logits` write and read it.
`load_source` accepts either a logits file or a run folder: for a run folder it computes the logits
of a split with the trained model (one forward pass, no gradient) and caches them as
``<run>/logits-<split>.npz``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrl.io import atomic_open
from mrl.nesting import Nesting
from mrl.params import is_int

__all__ = ["LogitsSet", "fingerprint", "load_logits", "load_source", "save_logits"]

FORMAT = "mrl-logits"


@dataclass
class LogitsSet:
    """Per-prefix logits of a model on a labelled set.

    ``nesting`` names the G prefixes of ``logits``; a fixed-feature (FF-m) model has ``G = 1`` and
    ``meta["ff_dim"] = m``. ``embeddings`` (optional) are the encoder outputs, for few-shot NCM.
    """

    logits: np.ndarray  # [G, N, C]
    labels: np.ndarray  # [N]
    nesting: Nesting
    embeddings: np.ndarray | None = None  # [N, D]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.logits.ndim != 3 or self.logits.shape[0] != len(self.nesting):
            raise ValueError(
                f"logits must be [G, N, C] with G={len(self.nesting)}, got {self.logits.shape}"
            )
        if self.labels.shape != (self.logits.shape[1],):
            raise ValueError(
                f"labels must be [N]=({self.logits.shape[1]},), got {self.labels.shape}"
            )
        ff = self.meta.get("ff_dim")
        if ff is not None and (not is_int(ff) or ff < 1):  # 8.7 was used as FF-8
            raise ValueError(f"meta 'ff_dim' must be a positive int (the FF model's size) or "
                             f"null, got {ff!r}")
        if self.embeddings is not None:  # rows of other samples gave wrong few-shot numbers
            shape = np.shape(self.embeddings)
            if len(shape) != 2 or shape[0] != self.logits.shape[1] or shape[1] < self.nesting.dim:
                raise ValueError(f"embeddings must be [N={self.logits.shape[1]}, D >= "
                                 f"{self.nesting.dim}] (one row per sample), got shape {shape}")

    @property
    def mode(self) -> str:
        return str(self.meta.get("mode", "mrl"))

    @property
    def size(self) -> int:
        """The representation size the model's classifier reads: ff_dim for FF-m, else D."""
        return int(self.meta.get("ff_dim") or self.nesting.dim)


def fingerprint(data: LogitsSet) -> str:
    """SHA-256 of the logits, labels and nesting: the same samples and scores, wherever the
    file lies (a fitted cascade stores it to recognise its own source under another name)."""
    h = hashlib.sha256(data.nesting.to_json().encode())
    for arr in (np.asarray(data.logits, dtype=np.float32), np.asarray(data.labels, np.int64)):
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def save_logits(path: str | os.PathLike, data: LogitsSet) -> None:
    arrays = {
        "logits": np.asarray(data.logits, dtype=np.float32),
        "labels": np.asarray(data.labels, dtype=np.int64),
        "nesting": np.array(data.nesting.to_json()),
        "meta": np.array(json.dumps({"format": FORMAT, **data.meta})),
    }
    if data.embeddings is not None:
        arrays["embeddings"] = np.asarray(data.embeddings, dtype=np.float32)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def load_logits(path: str | os.PathLike) -> LogitsSet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"logits file not found: {path}")
    if path.suffix != ".npz":
        raise ValueError(f"a logits file is an .npz (see `mrl cascade --help`), got {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable .npz logits file ({exc})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single array, not an .npz logits file")
    with z:
        missing = {"logits", "labels", "nesting"} - set(z.files)
        if missing:
            raise ValueError(f"{path} is not a logits file: it lacks {sorted(missing)}")
        try:
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            nesting = Nesting.from_json(str(z["nesting"]))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: 'nesting' and 'meta' must be JSON objects ({exc})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: 'meta' must be a JSON object, got {type(meta).__name__}")
        meta.pop("format", None)
        labels = z["labels"]
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: labels must be integers, got dtype {labels.dtype}")
        try:
            return LogitsSet(
                logits=z["logits"],
                labels=labels.astype(np.int64),
                nesting=nesting,
                embeddings=z["embeddings"] if "embeddings" in z.files else None,
                meta=meta,
            )
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def load_source(path: str | os.PathLike, split: str = "test", refresh: bool = False) -> LogitsSet:
    """Logits of ``split`` from a logits file, or from a run folder (computed once, then cached)."""
    path = Path(path)
    if path.is_file():
        data = load_logits(path)
        held = data.meta.get("split")
        if held is not None and held != split:
            raise ValueError(f"{path} holds logits of split {held!r}, not of split {split!r}")
    elif not path.is_dir():
        raise FileNotFoundError(f"no logits file or run folder at {path}")
    elif (cache := path / f"logits-{split}.npz").is_file() and not refresh and (
        _newer_than_checkpoint(cache, path)
    ):
        data = load_logits(cache)
    else:
        data = _compute_from_run(path, split)
        save_logits(cache, data)
    _warn_if_interrupted(data, path)
    return data


def _warn_if_interrupted(data: LogitsSet, path: Path) -> None:
    """Warn, as `mrl eval` does, when the logits come from a run trained to fewer epochs than
    its config asks for (an interrupted run; ``meta["epoch"]`` of ``meta["epochs"]``)."""
    epoch, epochs = data.meta.get("epoch"), data.meta.get("epochs")
    run = Path(path if path.is_dir() else data.meta.get("run", path))
    if epochs is None:  # logits cached before "epochs" was stored: the run's config.json
        epochs = _config_epochs(run)
    if epoch is None or epochs is None or int(epoch) >= int(epochs):
        return
    what = str(path) if path.is_dir() else f"{run} (the run of {path})"
    warnings.warn(
        f"{what} is trained to epoch {epoch} of {epochs} only (interrupted?); evaluating it as "
        "it is (finish it with mrl train CONFIG --out RUN --resume)",
        stacklevel=3,
    )


def _config_epochs(run: Path) -> int | None:
    try:
        return int(json.loads((run / "config.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def source_nesting(path: str | os.PathLike, split: str = "test") -> Nesting | None:
    """The nesting of a logits file or run folder, read without loading or computing logits
    (for checking options first); None when it cannot be read (`load_source` then says why)."""
    path = Path(path)
    cache = path / f"logits-{split}.npz"
    if path.is_dir() and cache.is_file() and _newer_than_checkpoint(cache, path):
        path = cache
    try:
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return Nesting.from_json(str(z["nesting"]))
        from mrl.train import load_checkpoint  # the training module (vision extra)

        saved = load_checkpoint(path)
        return Nesting.from_dict(saved.get("head_nesting") or saved["nesting"])
    except Exception:  # any unreadable source: load_source then reports it
        return None


def _newer_than_checkpoint(cache: Path, run_dir: Path) -> bool:
    ckpts = list(run_dir.glob("*.pt"))
    return all(cache.stat().st_mtime >= c.stat().st_mtime for c in ckpts)


def _compute_from_run(run_dir: Path, split: str) -> LogitsSet:
    """Forward the run's model over ``split`` of its dataset: logits and embeddings."""
    try:
        from mrl.train import load_run  # the training module (vision extra)
    except ImportError as exc:
        raise ValueError(
            f"{run_dir} is a folder but mrl.train.load_run is not available to read it ({exc}); "
            "pass a logits .npz file instead"
        ) from None
    return _forward_run(load_run(run_dir), split, run_dir)


# The few-shot pool: a seeded subset of the training images is plenty for 1..100 shots per class.
POOL_SIZE = 5000


def _forward_run(run: Any, split: str, run_dir: Path) -> LogitsSet:
    """``run`` = (model, config, checkpoint) from `mrl.train.load_run`.

    ``split`` is ``test`` (the task's test set) or ``train`` (a seeded subset of POOL_SIZE
    training images, for few-shot support sets).
    """
    from mrl.data import load_task
    from mrl.train import check_task, predict

    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    model, config, saved = run
    d = config.data
    task = load_task(d.dataset, root=d.root, train_size=POOL_SIZE if split == "train" else 1,
                     image_size=d.image_size, seed=config.seed, root_fallback=True)  # fmt: skip
    check_task(saved, task, run_dir)
    data = task.db if split == "train" else task.test
    z, logits = predict(model, data, config.eval_batch_size)  # [N, D], [G, N, C] on the CPU
    nesting = Nesting.from_dict(saved.get("head_nesting") or saved["nesting"])
    meta = {"mode": config.model.mode, "ff_dim": config.model.ff_dim, "dataset": d.dataset,
            "split": split, "run": str(Path(run_dir).resolve()),
            "epoch": int(saved.get("epoch", 0)), "epochs": int(config.epochs)}  # fmt: skip
    return LogitsSet(
        logits=logits.numpy(),
        labels=data.labels.cpu().numpy().astype(np.int64),
        nesting=nesting,
        embeddings=z.numpy(),
        meta=meta,
    )
