"""DDP on CPU (gloo): two processes with the same global batch end where one process ends."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from mrl.config import load_config

SETS = [
    "data.dataset=synthetic", "data.train_size=256", "data.flip=true", "data.crop_pad=1",
    "model.dim=16", "model.width=4", "model.norm=group", "model.nesting=4,8,16", "epochs=2",
    "batch_size=64", "device=cpu", "eval_test=false",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from mrl.train import train

    train(load_config(None, SETS), out, progress=False)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, monkeypatch):
    from mrl.train import load_checkpoint, train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train(load_config(None, SETS), tmp_path / "one", progress=False)
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2)
    a = load_checkpoint(tmp_path / "one")["model"]
    b = load_checkpoint(tmp_path / "two")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # The logged loss and train top-1 are the global batch's (all-reduced), not rank 0's half.
    import json

    for one, two in zip(*(
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    )):  # fmt: skip
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert two["train_top1"] == pytest.approx(one["train_top1"], abs=1e-3)


def _divergence_worker(rank: int, world: int, port: int, out: str, where: str) -> None:
    from pathlib import Path

    from mrl.distributed import Processes
    from mrl.train import TrainingDiverged, _check_finite

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    bad = rank == 1  # only rank 1's loss sum (or its copy of the weights) went bad
    loss = float("nan") if bad and where == "loss" else 0.5
    model = torch.nn.Linear(2, 2)
    if bad and where == "weights":
        with torch.no_grad():
            model.weight[0, 0] = float("inf")
    try:
        _check_finite({"loss": loss}, model, 3, load_config(None, SETS), Path(out) / "ckpt.pt",
                      Processes(rank, world, rank), torch.device("cpu"))  # fmt: skip
        verdict = "went on"
    except TrainingDiverged:
        verdict = "stopped"
    (Path(out) / f"rank{rank}").write_text(verdict)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("where", ["loss", "weights"])
def test_divergence_on_one_rank_stops_every_rank(tmp_path, where):
    # else rank 1 raises while rank 0 waits at the next barrier: a hung job
    torch.multiprocessing.spawn(_divergence_worker, args=(2, _free_port(), str(tmp_path), where),
                                nprocs=2)  # fmt: skip
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["stopped", "stopped"]


def _bad_batch_worker(rank: int, world: int, port: int, out: str) -> None:
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    from mrl.train import train

    try:
        train(load_config(None, [*SETS, "batch_size=63"]), Path(out) / "run", progress=False)
        verdict = "trained"
    except ValueError as exc:
        verdict = str(exc)
    (Path(out) / f"rank{rank}").write_text(verdict)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_batch_not_divisible_by_processes_writes_nothing(tmp_path):
    torch.multiprocessing.spawn(_bad_batch_worker, args=(2, _free_port(), str(tmp_path)),
                                nprocs=2)  # fmt: skip
    for r in (0, 1):
        assert "batch_size must be a positive multiple of the number of processes (2), got " \
            "batch_size=63" in (tmp_path / f"rank{r}").read_text()
    assert not (tmp_path / "run" / "config.json").exists()
