"""Checkpoints of `mrl text finetune`: an interrupted fine-tune resumes where it stopped.

While ``finetune(..., out=OUT)`` trains, ``OUT.partial/checkpoint.pt`` holds all that the loop
needs to continue exactly: the trained weights (the whole model's, or only the rotation layer's
with a frozen encoder), the AdamW and schedule states, the step, the current epoch's batch order
and position in it, and every random state (the shuffles' ``random.Random``, torch's global
generator for dropout, the distillation sampler's generator). It is written atomically at the
end of each epoch, after the last step, and whenever ``minutes`` have passed since the last
write; a resumed run's weights equal an uninterrupted run's (tested). Once the model folder is
saved, ``OUT.partial`` is removed.

The checkpoint records the settings, the base model and digests of the pairs and of the corpus;
a resume with anything that would change the result is refused, naming what differs (the device
may change). A lock in ``OUT.partial`` refuses a second fine-tune into the same ``OUT``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from mrl.io import atomic_torch_save, file_fingerprint

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

__all__ = [
    "FinetuneCheckpoint",
    "check_finished_out",
    "checkpoint_file",
    "folder_fingerprint",
    "loop_state",
    "partial_dir",
    "restore_loop",
    "texts_digest",
]

FORMAT = "mrl-text-finetune-checkpoint/1"
CHECKPOINT = "checkpoint.pt"
_LOCK = ".lock"


def partial_dir(out: str | os.PathLike) -> Path:
    """``OUT.partial``: the folder beside ``out`` that holds its fine-tune's checkpoint
    (``out`` made absolute first: ``--out .`` has one beside the working folder)."""
    out = Path(os.path.abspath(out))
    if not out.name:
        raise ValueError(f"--out (out) must name a folder below another one, got {str(out)!r}")
    return out.with_name(out.name + ".partial")


def checkpoint_file(out: str | os.PathLike) -> Path:
    """``OUT.partial/checkpoint.pt``: where a fine-tune into ``out`` keeps its checkpoint."""
    return partial_dir(out) / CHECKPOINT


def texts_digest(rows: Iterable[Iterable[str | None]]) -> str:
    """sha256 over rows of texts (pairs: query, positive, negative); None and "" differ."""
    h = hashlib.sha256()
    for row in rows:
        for text in row:
            b = b"\x00" if text is None else b"\x01" + text.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
        h.update(b"\x02")  # end of row
    return h.hexdigest()


def folder_fingerprint(path: str | os.PathLike) -> dict[str, str]:
    """``{relative path: file_fingerprint}`` of the visible files under ``path`` (a model
    folder; of a sentence-transformers folder only the files it loads, `_model_files`) or of
    ``path`` itself (a file): the same model wherever it lies or however the path is spelled;
    another model, or one rewritten in place, differs (every byte is hashed: a rewrite that
    changed only the middle of the weights file passed the head-and-tail fingerprint)."""
    path = Path(path)
    if path.is_file():
        return {path.name: file_fingerprint(path, full=True)}
    if (path / "modules.json").is_file():  # a sentence-transformers folder: what it loads (a
        from mrl.text.encoders import _model_files  # report `mrl eval` wrote beside the model

        files = _model_files(path)  # blocked resuming a fine-tune from it)
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))  # fmt: skip
    return {str(p.relative_to(path)): file_fingerprint(p, full=True) for p in files}


class FinetuneCheckpoint:
    """The checkpoint of one fine-tune into ``out``: checks at creation, `save`, `finish`.

    ``identity``: what must match for a resume (settings, base model, data digests);
    ``resume``: continue from the checkpoint (it must exist); else one must not exist (an
    interrupted run is never overwritten). ``minutes``: write at least this often (0: after
    every step), besides each epoch's end. Use as a context manager: it holds the lock.
    """

    def __init__(
        self, out: str | os.PathLike, identity: dict[str, Any], resume: bool, minutes: float
    ) -> None:
        if not minutes >= 0:
            raise ValueError(
                f"checkpoint_minutes (--checkpoint-minutes) must be >= 0, got {minutes}"
            )
        self.out = Path(os.path.abspath(out))
        self.folder = partial_dir(out)
        self.path = checkpoint_file(out)
        # the folders this run creates (OUT.partial and missing parents): removed again, when
        # empty, if it stops before writing anything
        self._made = [f for f in (self.folder, *self.folder.parents) if not f.exists()]
        self.identity = identity
        self.minutes = minutes
        self.resume = resume
        self.saved: dict[str, Any] | None = None
        self._last = time.monotonic()
        self._fd: int | None = None

    def __enter__(self) -> FinetuneCheckpoint:
        self._lock()
        try:
            self._check_folder()
            self._remove_dead_temporaries()
            if self.resume:
                self.saved = self._load()
        except BaseException:
            self.__exit__()  # __exit__ does not run when __enter__ raises
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is None:  # not locked (finished, or never locked): the folder is not ours
            return
        if not self.path.exists():  # failed before any checkpoint: nothing to resume
            self._remove_ours()
        self._unlock()

    def _lock(self) -> None:
        """An exclusive lock on ``OUT.partial/.lock``, taken before anything is checked. The
        folder is removed (with the lock file) when a run ends, so a lock taken on a file that
        was unlinked meanwhile is worth nothing: it is taken again on the new file."""
        if self.folder.exists() and not self.folder.is_dir():
            raise FileExistsError(
                f"{str(self.folder)!r} (the checkpoint folder of this --out) is a file"
            )
        lock = self.folder / _LOCK
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:  # not POSIX: no lock (one process per --out there)
                self._fd = fd
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FileExistsError(
                    f"another fine-tune is writing {str(self.folder)!r} (same --out); wait "
                    "for it or choose another --out"
                ) from None
            try:
                current = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                self._fd = fd
                return
            os.close(fd)  # the folder was removed after we opened the file: again

    def _unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def _check_folder(self) -> None:
        if self.out.is_dir() and any(self.out.iterdir()):  # another run finished meanwhile
            raise FileExistsError(
                f"--out {str(self.out)!r} already exists and is not empty; choose a new folder"
            )
        if self.resume and not self.path.is_file():
            raise FileNotFoundError(
                f"resume (--resume) given but there is no checkpoint at {str(self.path)!r}"
            )
        if not self.resume and self.path.exists():
            raise FileExistsError(
                f"{str(self.path)!r} holds an interrupted fine-tune into this --out; pass "
                "--resume (resume=True) to continue it, or remove that folder to start again"
            )
        foreign = sorted(p.name for p in self.folder.iterdir() if not _ours(p.name))
        if foreign:
            raise FileExistsError(
                f"{str(self.folder)!r} is where a fine-tune into this --out keeps its "
                f"checkpoint, but it holds other files ({', '.join(foreign[:3])}); move them "
                "or choose another --out"
            )

    def _remove_dead_temporaries(self) -> None:
        """Temporaries of checkpoint writes that a killed run left (``kill -9``, preemption):
        under the lock no write of ours is in progress, so every one is dead (each is as large
        as a checkpoint; they would pile up over kills)."""
        for p in self.folder.iterdir():
            if _temporary(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _load(self) -> dict[str, Any]:
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (any unpickling failure: a damaged file)
            raise ValueError(
                f"checkpoint {str(self.path)!r} is unreadable or corrupt: {exc}"
            ) from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"{str(self.path)!r} is not an mrl text fine-tune checkpoint")
        diffs = list(_differences(saved["identity"], self.identity))
        if diffs:
            raise ValueError(
                f"checkpoint {str(self.path)!r} was made by another fine-tune; cannot resume "
                "it with these settings or data: " + "; ".join(diffs)
            )
        return saved

    def due(self, epoch_end: bool, last: bool) -> bool:
        """Whether to write after this step."""
        elapsed = time.monotonic() - self._last
        return epoch_end or last or elapsed >= self.minutes * 60

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (the loop's: see `loop_state`) atomically with the identity."""
        atomic_torch_save({"format": FORMAT, "identity": self.identity, **state}, self.path)
        self._last = time.monotonic()

    def finish(self) -> None:
        """The model folder is saved: the checkpoint is no longer needed. Its files are removed
        while the lock is held (a run waiting for it then finds no folder, or a fresh one)."""
        self._remove_ours()
        self._unlock()

    def _remove_ours(self) -> None:
        """Remove the checkpoint, its temporaries and the lock file, then the folder if empty;
        anything else in it is left alone."""
        if not self.folder.is_dir():
            return
        for p in self.folder.iterdir():
            if _ours(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        for folder in self._made or [self.folder]:  # deepest first; non-empty ones stay
            with contextlib.suppress(OSError):
                folder.rmdir()


def _temporary(name: str) -> bool:
    """A temporary of an atomic checkpoint write (`mrl.io.atomic_open`'s naming)."""
    return name.startswith(f".{CHECKPOINT}.") and name.endswith(".tmp")


def _ours(name: str) -> bool:
    """The checkpoint, the lock file or a temporary of an atomic checkpoint write."""
    return name in (CHECKPOINT, _LOCK) or _temporary(name)


def check_finished_out(out: str | os.PathLike, param: str = "out") -> None:
    """A finished ``out`` beside a leftover checkpoint (a stop while the run removed it): say
    that the leftover can go, rather than only that ``out`` exists."""
    out = Path(out)
    leftover = checkpoint_file(out)
    if out.is_dir() and any(out.iterdir()) and leftover.is_file():
        raise FileExistsError(
            f"{param} {str(out)!r} already holds a finished fine-tune; "
            f"{str(partial_dir(out))!r} is a leftover checkpoint of it: remove that folder "
            "(or choose a new --out to train again)"
        )


def _differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """``"key: checkpoint X vs now Y"`` for each differing entry; nested dicts (the settings,
    a model's file fingerprints) name the entry inside them (``settings.lr``)."""
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            yield from _differences(old, new, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}: checkpoint {old!r} vs now {new!r}"


def loop_state(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng: random.Random,
    generator: torch.Generator | None,
    step: int,
    order: list[int],
    start: int,
) -> dict[str, Any]:
    """Everything `_train_loop` needs to continue after ``step``: see the module docstring.

    ``order``/``start``: the current epoch's batch order and the next batch's position in it.
    """
    state = {
        "step": step,
        "order": list(order),
        "start": start,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "python_rng": _python_state(rng),
        "torch_rng": torch.get_rng_state(),
        "generator": None if generator is None else generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_loop(
    saved: dict[str, Any],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng: random.Random,
    generator: torch.Generator | None,
) -> tuple[int, list[int], int]:
    """Load `loop_state`'s ``saved`` into the live objects; returns ``(step, order, start)``."""
    module.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng.setstate(_python_state_back(saved["python_rng"]))
    torch.set_rng_state(saved["torch_rng"])
    if generator is not None and saved["generator"] is not None:
        generator.set_state(saved["generator"])
    cuda = saved.get("cuda_rng")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return int(saved["step"]), list(saved["order"]), int(saved["start"])


def _python_state(rng: random.Random) -> list[Any]:
    """``rng.getstate()`` as lists (what torch's weights-only loader reads back)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _python_state_back(state: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
