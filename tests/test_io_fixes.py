"""Output checks and atomic writes fail early and in one line, and leave nothing behind."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest

from mrl import io
from mrl.io import check_new_output_dir, check_output_path


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder on a "read-only file system" (root ignores permission bits: simulated)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(ro):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(io.tempfile, "mkstemp", mkstemp)
    return ro


def test_an_unwritable_output_fails_before_the_work(read_only):
    with pytest.raises(PermissionError, match=r"--out '.*ro/model' is not writable: cannot "
                       r"create files in '.*ro' \(Read-only file system\)"):
        check_new_output_dir(read_only / "model", "--out")
    with pytest.raises(PermissionError, match="not writable"):
        check_output_path(read_only / "a" / "b.json", "--json", "file")
    with pytest.raises(PermissionError, match="not writable"):
        check_output_path(read_only, "--out", "dir")  # an existing folder: tested itself
    assert list(read_only.iterdir()) == []


def test_a_writable_output_passes_and_leaves_no_probe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_new_output_dir(tmp_path / "new" / "model", "--out") == tmp_path / "new" / "model"
    assert check_output_path("rel-out", "--out") == Path("rel-out")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_really_read_only_place():
    try:  # /sys refuses new files even to root on Linux
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        pass
    else:
        os.close(fd)
        os.unlink(probe)
        pytest.skip("/sys is writable here")
    with pytest.raises(PermissionError, match="--out '/sys/mrl-out' is not writable"):
        check_new_output_dir("/sys/mrl-out", "--out")


def test_the_cli_says_it_in_one_line_before_any_work(read_only, tmp_path, capsys):
    import numpy as np

    from mrl.cli import main

    np.save(tmp_path / "e.npy", np.ones((4, 8), np.float32))
    code = main(["text", "adapt", "--embeddings", str(tmp_path / "e.npy"),
                 "--out", str(read_only / "model")])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mrl text: error: --out ") and err.endswith("(Read-only file system)")
    assert "\n" not in err


def test_a_new_write_removes_only_old_temporaries_of_the_same_target(tmp_path):
    import time

    from mrl.io import atomic_write_text

    stale = [tmp_path / ".ckpt.pt.k1ll3d_x.tmp", tmp_path / ".ckpt.pt.0therrun.tmp"]
    fresh = tmp_path / ".ckpt.pt.aliveeee.tmp"  # a write in progress
    other = tmp_path / ".ckpt.pt.bak.k1ll3d_x.tmp"  # another target's (".ckpt.pt.bak")
    keep = [fresh, other, tmp_path / ".ckpt.pt.folder00.tmp", tmp_path / "ckpt.pt.k1ll3d_x.tmp"]
    for p in [*stale, *keep]:
        p.mkdir() if "folder" in p.name else p.write_text("x")
    old = time.time() - 2 * 3600
    for p in [*stale, *keep[1:]]:
        os.utime(p, (old, old))
    atomic_write_text(tmp_path / "ckpt.pt", "new")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["ckpt.pt", *(p.name for p in keep)])


def test_a_folder_is_listed_once_for_stale_temporaries(tmp_path, monkeypatch):
    """Writing N files into one folder must not list it N times (O(N^2) for shard folders)."""
    import time

    import mrl.io as io

    stale = tmp_path / ".b.txt.k1ll3d_x.tmp"
    stale.write_text("x")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    listed = []
    real = io._list_stale_temporaries
    monkeypatch.setattr(io, "_list_stale_temporaries", lambda f: listed.append(f) or real(f))
    for name in ("a.txt", "b.txt", "c.txt"):
        io.atomic_write_text(tmp_path / name, name)
    assert len(listed) == 1 and not stale.exists()  # b.txt's leftover found in the one listing


def test_a_leftover_too_fresh_at_the_first_listing_is_removed_later(tmp_path, monkeypatch):
    """A restart right after a kill lists the folder while the leftover is minutes old; it must
    not stay for the whole run."""
    import time

    import mrl.io as io

    leftover = tmp_path / ".ckpt.pt.k1ll3d_x.tmp"
    leftover.write_text("x")
    io.atomic_write_text(tmp_path / "ckpt.pt", "1")  # first listing: the leftover is fresh
    assert leftover.exists()
    now = time.time()
    os.utime(leftover, (now - 2 * 3600, now - 2 * 3600))
    monkeypatch.setattr(time, "time", lambda: now + 2 * 3600)  # an hour and more later
    io.atomic_write_text(tmp_path / "ckpt.pt", "2")
    assert not leftover.exists()


def test_atomic_torch_save_interrupted_mid_write_is_the_interruption(tmp_path, monkeypatch):
    """Ctrl-C inside torch.save makes torch raise "unexpected pos" as it closes the archive: the
    caller sees the KeyboardInterrupt (the CLI's one line, exit 130), the old file stays and no
    temporary is left."""
    import torch

    from mrl.io import atomic_torch_save

    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"step": 1}, path)
    real_save = torch.save

    def interrupted(obj, f, *args, **kwargs):
        try:
            f.write(b"PK partial")
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_an_atomic_write_syncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    """The io module promises durable writes: the rename is only durable once the folder is
    synced too (the file was, the folder was not)."""
    import os
    import stat

    from mrl import io as mio

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)

    monkeypatch.setattr(mio.os, "fsync", spy)
    mio.atomic_write_text(tmp_path / "a.txt", "x")
    assert synced == ["file", "dir"] and (tmp_path / "a.txt").read_text() == "x"
    synced.clear()
    with mio.atomic_output_dir(tmp_path / "model") as tmp:  # a folder renamed into place
        (tmp / "w.bin").write_bytes(b"w")
    assert synced == ["dir"] and (tmp_path / "model" / "w.bin").is_file()


def test_atomic_output_dir_removes_a_killed_saves_stale_temporary(tmp_path):
    """kill -9 during a save skips its cleanup: the .OUT.XXXXXXXX.tmp folder (53 MB for a text
    model) stayed for ever. The next save of OUT removes such folders an hour old, not fresh
    ones (another process may be writing) nor other outputs' ones."""
    import time

    from mrl.io import atomic_output_dir

    old = tmp_path / ".out.abcd1234.tmp"
    fresh = tmp_path / ".out.efgh5678.tmp"
    other = tmp_path / ".out2.ijkl9012.tmp"
    for d in (old, fresh, other):
        d.mkdir()
        (d / "weights.bin").write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    for d in (old, other):
        os.utime(d, (hours_ago, hours_ago))
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert not old.exists() and fresh.exists() and other.exists()
