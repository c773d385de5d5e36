"""Atomic file writes: a crash mid-write leaves the previous file intact.

Every artifact (checkpoints, stores, indexes, result files) is written to a temporary file in the
same folder, flushed and fsync'ed, then moved over the target with `os.replace`, which is atomic on
POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # not POSIX: exclusive_lock takes no lock
    fcntl = None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success move it over ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file what a plain open() would (0666 minus umask).
        os.chmod(tmp, 0o666 & ~_umask())
        # text as UTF-8 whatever the locale (a "±" failed under LC_ALL=C; cp1252 on Windows)
        with os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power loss
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _CANNOT_WRITE and exc.filename is None:
            raise WriteError(exc.errno, exc.strerror, str(path)) from None  # say which file
        raise


def _fsync_dir(folder: Path) -> None:
    """fsync a folder's entry list (POSIX; a no-op where folders cannot be opened or synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Older than this, a temporary file of ours is no write in progress (every body of
# `atomic_open` writes right away, and writing keeps the file's mtime fresh).
STALE_TEMPORARY_S = 3600.0


_STALE: dict[str, tuple[float, set[Path]]] = {}  # folder -> (listed at, stale temporaries)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``.NAME.*.tmp`` files beside ``path`` untouched for an hour: left by a process
    killed mid-write (SIGKILL, OOM, power loss), each can be as large as a checkpoint, and
    every restart would add one. Only files named like ours for this very target; no folders.
    A folder is listed at most once an hour per process (on every write it cost O(files) per
    write in a shard folder of thousands); writes in between look up their own target's
    leftovers in that list (a leftover too fresh at one listing is caught by the next)."""
    import re
    import time

    folder = path.parent.resolve()  # absolute: a later chdir does not change what we list
    listed_at, stale = _STALE.get(str(folder), (0.0, set()))
    if time.time() - listed_at > STALE_TEMPORARY_S:
        listed_at, stale = time.time(), set(_list_stale_temporaries(folder))
        _STALE[str(folder)] = (listed_at, stale)
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")  # mkstemp's 8 letters
    for old in [p for p in stale if ours.fullmatch(p.name)]:
        stale.discard(old)  # (two threads may both see it: discard, not remove)
        with contextlib.suppress(OSError):  # gone meanwhile
            old.unlink()


def _list_stale_temporaries(folder: Path) -> list[Path]:
    """Plain files named like a temporary of ours (``.*.XXXXXXXX.tmp``) untouched for an hour."""
    import time

    cutoff = time.time() - STALE_TEMPORARY_S
    found = []
    for p in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if not p.is_symlink() and p.is_file() and p.stat().st_mtime < cutoff:
                found.append(p)
    return found


def _stale_output_dirs(path: Path) -> list[Path]:
    """Temporary siblings of ``path`` that `atomic_output_dir` made (``.NAME.XXXXXXXX.tmp``
    folders) and nothing touched for an hour: a save killed before it could remove its own."""
    import time

    cutoff = time.time() - STALE_TEMPORARY_S
    found = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if not p.is_symlink() and p.is_dir() and p.stat().st_mtime < cutoff:
                found.append(p)
    return found


# A full disk, an exhausted quota, a read-only file system, a file too large: the OS says why a
# write failed but not which file (write(2) has no path), so `atomic_open` names it.
_CANNOT_WRITE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


class WriteError(OSError):
    """Writing ``filename`` failed (disk full, read-only...): one line naming the file."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a whole file, read in 1 MiB blocks (checksums, content hashes)."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20, full: bool = False) -> str:
    """sha256 of a file's size, first and last ``chunk`` bytes (hex, 16 chars): tells a file
    rewritten with other contents of the same size apart in milliseconds, whatever its size,
    and survives copies (no timestamps). ``full``: of every byte (a rewrite that changed only
    the middle of a file differs too; ~0.2 s per 100 MB), for identities that must be exact."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        h.update(f.read(chunk))
        if full:
            while block := f.read(chunk):
                h.update(block)
        elif size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


def check_output_path(
    path: str | os.PathLike, param: str, kind: str = "dir", writable: bool = True
) -> Path:
    """Fail before any work when ``path`` cannot become the output ``kind`` ("dir" or "file").

    Catches what would otherwise surface as an OS error after minutes of work: a path below an
    existing file (``afile/sub``), a folder where a file goes or a file where a folder goes, a
    read-only or unwritable place (PermissionError; not checked with ``writable=False``, for a
    cache that may be read-only when it already holds what is needed).
    The error names the parameter (e.g. ``--out``) and the value.
    """
    path = Path(path)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise FileExistsError(f"{param} {str(path)!r} is a file; give a folder path")
    if kind == "file" and path.is_dir():
        raise FileExistsError(f"{param} {str(path)!r} is a folder; give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(
                    f"{param} {str(path)!r} is below {str(parent)!r}, which is a file"
                )
            break
    else:
        parent = Path(".")
    if writable:
        _check_writable(path if path.is_dir() else parent, param, path)
    return path


def _check_writable(folder: Path, param: str, path: Path) -> None:
    """Create and remove a file in ``folder`` (where the output or its first missing parent
    will be created): a read-only file system or a folder without write permission fails here,
    before the work, not when the finished result is saved (and lost)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".mrl-write-test.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise PermissionError(
            f"{param} {str(path)!r} is not writable: cannot create files in {str(folder)!r} "
            f"({exc.strerror or first_line(exc)})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_not_an_input(path: str | os.PathLike, param: str,
                       inputs: dict[str, str | os.PathLike]) -> None:
    """Refuse an output ``path`` that is one of the ``inputs`` (name -> file or folder), an
    existing file inside an input folder, or the ``<file>.json`` sidecar of an input ``.npy``:
    writing there would destroy what the command just read (an index's index.json, a store's
    files, the queries). A new file inside an input folder is allowed."""
    out = Path(path).resolve()
    for name, value in inputs.items():
        src = Path(value).resolve()
        hit = out == src or (src.is_dir() and out.is_relative_to(src) and out.exists())
        if not hit and src.suffix == ".npy" and out == src.with_suffix(".json"):
            name, hit = f"the sidecar of {name}", True
        if hit:
            raise ValueError(f"{param} {str(path)!r} would overwrite {name} {str(value)!r}; "
                             "write it somewhere else")


def check_new_output_dir(path: str | os.PathLike, param: str) -> Path:
    """`check_output_path` for a folder that must be new (or empty): an old model or result
    folder is never mixed with new files nor silently overwritten."""
    path = check_output_path(path, param, "dir")
    absolute, cwd = Path(os.path.abspath(path)), Path.cwd()
    if absolute == cwd or absolute in cwd.parents:  # written as a sibling, then renamed over
        raise ValueError(
            f"{param} {str(path)!r} is the working folder or holds it; name a new folder for "
            f"the output (e.g. {param} ./model)"
        )
    if path.is_dir() and any(path.iterdir()):
        raise FileExistsError(
            f"{param} {str(path)!r} already exists and is not empty; choose a new folder or "
            "remove it first"
        )
    return path


# what a report folder holds (mrl.report.write_report): a folder with one of them may be rewritten
REPORT_FILES = ("results.json", "results.md", "report.html")
# what `mrl reproduce` and `mrl demo` write beside their report files: a folder holding one is
# theirs, and a report command (`mrl eval --out`) writing there replaced every seed's records
WORKFLOW_FILES = ("runs", "claims.md", "recipe.json", "results.json.lock", "demo.md")


def check_output_dir_of(
    path: str | os.PathLike,
    param: str,
    markers: tuple[str, ...],
    what: str,
    owns: Callable[[Path], bool] | None = None,
    foreign: tuple[str, ...] = (),
) -> Path:
    """`check_output_path` for a folder a command may write into again (a report, a training
    run): new, empty, holding one of ``markers`` (files or folders it writes) or one that
    ``owns(folder)`` recognises (a file whose name others use too, read to tell). Any other
    non-empty folder is refused, so a user's files are never mixed with (or replaced by) ours.
    Hidden entries (.DS_Store, .ipynb_checkpoints) do not count. A folder holding one of
    ``foreign`` (another command's files beside shared names) is refused even so."""
    path = check_output_path(path, param, "dir")
    other = [m for m in foreign if path.is_dir() and (path / m).exists()]
    if other:
        raise FileExistsError(f"{param} {str(path)!r} holds {other[0]}: it is another command's "
                              f"folder, not {what}; choose a new folder")
    if not path.is_dir() or any((path / m).exists() for m in markers):
        return path
    if owns is not None and owns(path):
        return path
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(
            f"{param} {str(path)!r} is a folder of other files ({shown}), not {what} (none of "
            f"{', '.join(markers)}); choose a new folder"
        )
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Write a new folder as a temporary sibling, then rename it to ``path`` (which must not
    exist or be empty): a crash mid-save leaves no half-written folder under the final name."""
    import shutil

    path = Path(os.path.abspath(path))  # "out" and "./out" alike; the sibling is beside it
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_output_dirs(path):  # a killed save's (kill -9 skips the cleanup below)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # half-written: nothing worth keeping
        raise
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    try:
        os.replace(tmp, path)
    except OSError:
        # ``path`` was filled meanwhile (another job?): the finished output is kept, not lost
        raise FileExistsError(
            f"{str(path)!r} appeared (not empty) while writing; the finished output is kept "
            f"in {str(tmp)!r}: move it into place yourself"
        ) from None
    _fsync_dir(path.parent)  # the rename survives a power loss (the files inside are not
    # fsync'ed one by one: a folder of model weights is written by other libraries)


@contextlib.contextmanager
def exclusive_lock(
    path: str | os.PathLike, wait: bool = True, missing_ok: bool = False
) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block, released when it ends or the process
    dies. The file is created if missing and kept: removing it would let two processes lock two
    different files of one name. ``wait=False``: BlockingIOError when another process holds it.
    ``missing_ok``: no lock (and no error) when the folder of ``path`` is gone. Without
    ``fcntl`` (not POSIX) no lock is taken: use such a path from one process there."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        if not missing_ok:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type name when it has no message): libraries'
    errors often span many lines, and ours quote them in one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _umask() -> int:
    """The process umask (reading it means setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through a temporary file (checkpoints are never half-written)."""
    import torch

    with atomic_open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:  # torch reports a failed write as "unexpected pos ..."
            # ... also when Ctrl-C / SIGTERM stopped the write: the interruption, not torch's
            # complaint about it, is what happened (the temporary file is removed either way)
            cause = _in_chain(exc, KeyboardInterrupt) or _os_error_in(exc)
            if cause is None:
                raise
            raise cause from None


def _in_chain(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``'s cause or context chain, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (its cause or context chain), if any."""
    found = _in_chain(exc, OSError)
    return found if isinstance(found, OSError) else None


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> Any:
    """`np.load` of a ``.npy`` file without pickles; a damaged or foreign file is a ValueError
    naming it (numpy alone calls any file without its magic "pickled data")."""
    import numpy as np

    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError(f"{str(path)!r} is not a .npy file (no NumPy header)")
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable .npy file ({exc})") from None


def read_json_sidecar(folder: str | os.PathLike, name: str, what: str) -> dict[str, Any]:
    """Read ``folder/name`` (an artifact's JSON sidecar) with clear errors.

    A missing sidecar is a FileNotFoundError naming ``what`` (e.g. "embedding store"); a
    truncated or malformed one a ValueError naming the file.
    """
    sidecar = Path(folder) / name
    if not sidecar.exists():
        raise FileNotFoundError(f"no {what} at {folder} (missing {name})")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # bytes of another file: the
        # decode error named no file
        raise ValueError(f"{sidecar} is truncated or not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{sidecar} must hold a JSON object, got {type(meta).__name__}")
    return meta
