"""Training survives kills, concurrent runs and full disks without losing or mixing anything."""

from __future__ import annotations

import json

import pytest
import test_train
import torch

from mrl.data import load_task
from mrl.train import load_checkpoint, train

BASE, _cfg = test_train.BASE, test_train._cfg  # the same tiny recipe as the training tests


@pytest.fixture(scope="module")
def task():
    return load_task("synthetic", train_size=256)


def _epochs(run) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(s)["epoch"] for s in lines]


def _kill_before_the_log_line(run) -> None:
    """The state a kill leaves between the checkpoint's write and the log's: the checkpoint has
    an epoch metrics.jsonl does not."""
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:-1]))


def test_resume_after_a_kill_between_checkpoint_and_log_keeps_every_line(tmp_path, task):
    cfg = _cfg()
    train(cfg, tmp_path, progress=False, task=task, stop_after_epochs=2)
    _kill_before_the_log_line(tmp_path)
    assert _epochs(tmp_path) == [1]
    train(cfg, tmp_path, resume=True, progress=False, task=task)
    assert _epochs(tmp_path) == [1, 2, 3]
    history = load_checkpoint(tmp_path)["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()] == history


def test_resume_of_an_old_checkpoint_drops_log_lines_past_it(tmp_path, task):
    # A checkpoint written before it kept its history: the log is cut to its epoch, no repeats.
    cfg = _cfg()
    train(cfg, tmp_path, progress=False, task=task, stop_after_epochs=1)
    ckpt = load_checkpoint(tmp_path)
    del ckpt["history"]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    log = tmp_path / "metrics.jsonl"
    one = log.read_text()
    log.write_text(one + one.replace('"epoch": 1', '"epoch": 2') + '{"epoch": 3, "lo')
    train(cfg, tmp_path, resume=True, progress=False, task=task)
    assert _epochs(tmp_path) == [1, 2, 3]
    assert log.read_text().startswith(one)


def test_plain_as_ff_reads_the_checkpoints_epoch_not_the_last_log_line(tmp_path, task):
    from mrl.commands.reproduce import _plain_as_ff

    cfg = _cfg("model.mode=plain", "epochs=2", "optim.lr=0.01")
    train(cfg, tmp_path, progress=False, task=task)
    history = load_checkpoint(tmp_path)["history"]
    want = history[-1]["test_top1"]["16"]
    assert want != history[0]["test_top1"]["16"]  # else the test could not tell them apart
    _kill_before_the_log_line(tmp_path)  # killed after the last save: no rerun trains again
    assert _plain_as_ff(tmp_path, 16, task)["value"] == want
    ckpt = load_checkpoint(tmp_path)  # an old checkpoint: the short log is not trusted
    del ckpt["history"]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    assert _plain_as_ff(tmp_path, 16, task)["value"] == pytest.approx(want, abs=1e-3)


def test_a_second_process_training_into_the_same_out_is_refused(tmp_path, task, capsys):
    import fcntl

    from mrl.cli import main
    from mrl.train import RunInUse

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "a") as held:  # the first process, mid-run
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunInUse, match="another process is training into .*run'"):
            train(_cfg("epochs=1"), run, progress=False, task=task)
        (tmp_path / "c.json").write_text("{}")
        sets = ["--set", "data.dataset=synthetic", "--no-progress"]
        assert main(["train", str(tmp_path / "c.json"), "--out", str(run), *sets]) == 2
        err = capsys.readouterr().err
        assert "another process is training into" in err and "Traceback" not in err
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the second run
    train(_cfg("epochs=1"), run, progress=False, task=task)  # the lock is free again
    assert load_checkpoint(run)["epoch"] == 1


def test_a_refused_run_leaves_no_new_folder(tmp_path, task):
    with pytest.raises(ValueError, match="batch_size=999 exceeds"):
        train(_cfg("batch_size=999"), tmp_path / "new", progress=False, task=task)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("extra", [["model.name=mlp", "model.width=32"], ["model.name=cnn"]])
def test_one_item_per_process_with_batchnorm_is_refused_before_anything(tmp_path, task, extra):
    """The MLP's BatchNorm1d failed on the first step with torch's "Expected more than 1 value
    per channel", after config.json, the lock and an empty metrics.jsonl had been written."""
    with pytest.raises(ValueError, match=r"batch_size=1 gives 1 item\(s\) per process .*BatchNorm"):
        train(_cfg("batch_size=1", *extra), tmp_path / "new", progress=False, task=task)
    assert not (tmp_path / "new").exists()
    train(_cfg("batch_size=1", "epochs=1", "model.norm=group", "model.name=cnn",
               "data.train_size=4"), tmp_path / "group", progress=False,
          task=load_task("synthetic", train_size=4))  # no BatchNorm: one item is allowed


@pytest.fixture
def full_disk(monkeypatch):
    """Binary writes fail with ENOSPC after a few bytes (a full disk; root ignores quotas)."""
    import errno
    import io as _io
    import os

    from mrl import io

    class Full(_io.BufferedWriter):
        written = 0

        def write(self, b) -> int:
            self.written += len(b)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)

    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        return Full(_io.FileIO(fd, "wb")) if mode == "wb" else real(fd, mode, *args, **kwargs)

    monkeypatch.setattr(io.os, "fdopen", fdopen)


def _tiny_config(tmp_path) -> list[str]:
    config = tmp_path / "c.json"
    config.write_text("{}")
    return [str(config), "--no-progress", *(f"--set={s}" for s in BASE)]


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, task, capsys, request):
    from mrl.cli import main
    from mrl.io import WriteError

    run = tmp_path / "run"
    train(_cfg(), run, progress=False, task=task, stop_after_epochs=1)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    request.getfixturevalue("full_disk")
    with pytest.raises(WriteError, match=r"cannot write .*checkpoint.pt: No space left on device"):
        train(_cfg(), run, resume=True, progress=False, task=task)
    assert main(["train", *_tiny_config(tmp_path), "--out", str(run), "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"mrl train: error: cannot write {run / 'checkpoint.pt'}: No space left on device"
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # no temp file, no change


def test_ctrl_c_is_one_line_with_the_resume_hint(tmp_path, monkeypatch, capsys):
    from mrl.cli import main
    from mrl.commands import train as train_command

    def interrupted(args) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "run", interrupted)
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # an epoch finished
    assert main(["train", "c.json", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("mrl train: interrupted; resume with the same command plus --resume")
    assert "Traceback" not in err and err.count("\n") == 1
    (tmp_path / "checkpoint.pt").unlink()  # stopped within the first epoch: nothing to resume
    assert main(["train", "c.json", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == ("mrl train: interrupted; no epoch finished, so there is no "
                                       "checkpoint: run the same command again to start over\n")


def test_sigterm_runs_the_clean_ups_and_exits_143(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import time

    from mrl.cli import main
    from mrl.commands import train as train_command
    from mrl.io import atomic_open

    def killed_mid_write(args) -> int:
        with atomic_open(tmp_path / "checkpoint.pt") as f:
            f.write(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        return 0

    monkeypatch.setattr(train_command, "run", killed_mid_write)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # kept should main not
    try:  # replace it
        t0 = time.monotonic()
        assert main(["train", "c.json", "--out", str(tmp_path)]) == 143
        assert time.monotonic() - t0 < 4
        before = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    # the first checkpoint's write was cut: nothing to resume, and the hint says so
    assert capsys.readouterr().err.startswith("mrl train: terminated; no epoch finished, so "
                                              "there is no checkpoint")
    assert list(tmp_path.iterdir()) == []  # the temporary file was removed
    assert before is not None and before.__name__ == "<lambda>"  # main restored it


def test_sigterm_to_a_real_training_leaves_a_resumable_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mrl.cli", "train", *_tiny_config(tmp_path), "--out", str(run),
           "--set=epochs=200", "--set=optim.schedule=constant"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("mrl train: terminated; resume with")
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    done = load_checkpoint(run)["epoch"]
    assert 1 <= done < 200 and len(load_checkpoint(run)["history"]) == done


def test_the_divergence_advice_is_one_resume_accepts(tmp_path, task):
    # It used to say "Lower optim.lr", which --resume of the same folder refuses.
    from mrl.train import TrainingDiverged

    cfg = _cfg("epochs=2", "optim.schedule=constant")
    train(cfg, tmp_path, progress=False, task=task, stop_after_epochs=1)
    ckpt = load_checkpoint(tmp_path)
    for v in ckpt["model"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(TrainingDiverged, match=r"Train again into a new --out .* lower optim.lr"):
        train(cfg, tmp_path, resume=True, progress=False, task=task)
    with pytest.raises(ValueError, match="another recipe"):  # why a new --out: resume refuses
        train(_cfg("epochs=2", "optim.schedule=constant", "optim.lr=1e-4"), tmp_path,
              resume=True, progress=False, task=task)  # fmt: skip


def test_channels_last_only_for_resnets_on_cuda():
    from mrl.train import _memory_format

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    resnet = _cfg("model.name=resnet18")
    assert _memory_format(resnet, cuda) is torch.channels_last
    assert _memory_format(resnet, cpu) is torch.contiguous_format  # CPU stays as it was
    assert _memory_format(_cfg(), cuda) is torch.contiguous_format


def test_augment_on_cpu_keeps_its_stream():
    # Resumed CPU runs are compared with old ones: the CPU draws must not change.
    from mrl.data import augment

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    g = torch.Generator().manual_seed(3)
    flips = torch.rand(2, generator=g) < 0.5
    shifts = torch.randint(0, 3, (2, 2), generator=g)
    got = augment(x, torch.Generator().manual_seed(3), flip=True, crop_pad=1)
    for b in range(2):
        img = x[b].flip(-1) if flips[b] else x[b]
        padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
        r, c = shifts[0, b], shifts[1, b]
        assert torch.equal(got[b], padded[:, r : r + 4, c : c + 4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_cuda_draws_there_without_a_host_sync():
    from mrl.data import augment

    x = torch.rand(8, 3, 8, 8, device="cuda")
    g = torch.Generator("cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = augment(x, g, flip=True, crop_pad=2, total=16, offset=8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.device == x.device and y.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_resnet_trains_channels_last_on_cuda(tmp_path):
    task = load_task("synthetic", train_size=256)
    cfg = _cfg("model.name=resnet18", "model.width=8", "device=cuda", "epochs=1",
               "data.flip=true", "data.crop_pad=1")  # fmt: skip
    train(cfg, tmp_path, progress=False, task=task)
    record = load_checkpoint(tmp_path)["history"][0]
    assert not torch.backends.cudnn.benchmark and record["seconds"] > 0  # restored after the run


def test_cudnn_benchmark_is_restored_after_training(tmp_path, monkeypatch):
    """_train turns cudnn.benchmark on for CUDA runs; later work in the process (evaluation,
    a library user's code) must get the setting it had back."""
    import mrl.train as tr

    def cuda_like(*args, **kwargs):
        torch.backends.cudnn.benchmark = True
        return tmp_path / "checkpoint.pt"

    monkeypatch.setattr(tr, "_train", cuda_like)
    before = torch.backends.cudnn.benchmark
    tr.train(_cfg(), tmp_path, progress=False)
    assert torch.backends.cudnn.benchmark == before


def test_a_foreign_pickle_is_refused_without_running_its_code(tmp_path):
    """load_checkpoint unpickled with weights_only=False: a file's code ran before the format
    check refused it. A format-1 dict without a config gave a bare KeyError at --resume."""
    import pickle

    from mrl.train import load_checkpoint

    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": 1, "x": Payload()}))
    with pytest.raises(ValueError, match="evil.pt is unreadable or corrupt, or holds objects "):
        load_checkpoint(path)
    assert not ran.exists()
    torch.save({"format": 1}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match=r"bare.pt is not an mrl training checkpoint \(format 1\): "
                                         r"it lacks \['epoch', 'config'"):
        load_checkpoint(tmp_path / "bare.pt")


@pytest.mark.parametrize("api", ["add_safe_globals", "none"])
def test_checkpoints_load_weights_only_on_torch_without_safe_globals(tmp_path, task, monkeypatch,
                                                                     api):
    """`torch.serialization.safe_globals` exists from torch 2.5; pyproject allows 2.1: every
    checkpoint was "unreadable or corrupt" there."""
    cfg = _cfg("epochs=1")
    train(cfg, tmp_path, progress=False, task=task)
    monkeypatch.delattr(torch.serialization, "safe_globals")
    if api == "none":
        monkeypatch.delattr(torch.serialization, "add_safe_globals")
    saved = load_checkpoint(tmp_path)
    assert saved["epoch"] == 1 and isinstance(saved["torch_version"], str)


def test_resume_takes_default_weights_written_out_as_the_same_model(tmp_path, task):
    """nesting_weights None and [1, 1, 1] are one model (the paper's sum): resume refused it."""
    train(_cfg("epochs=2"), tmp_path, progress=False, task=task, stop_after_epochs=1)
    with pytest.raises(ValueError, match="nesting_weights"):  # other weights: another model
        train(_cfg("epochs=2", "model.nesting_weights=[1,1,2]"), tmp_path, resume=True,
              progress=False, task=task)  # fmt: skip
    train(_cfg("epochs=2", "model.nesting_weights=[1,1,1]"), tmp_path, resume=True,
          progress=False, task=task)  # fmt: skip
    assert load_checkpoint(tmp_path)["epoch"] == 2
