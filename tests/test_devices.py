"""`check_device`: a device torch cannot use here is one error naming the parameter."""

from __future__ import annotations

import pytest
import torch

from mrl.cli import main
from mrl.devices import check_device


def test_cpu_passes_and_typos_are_named():
    assert check_device("cpu", "--device") == "cpu"
    with pytest.raises(ValueError, match="--device must be a torch device .*got --device 'gpu0'"):
        check_device("gpu0", "--device")
    with pytest.raises(ValueError, match=r"must be cpu, cuda\[:N\] or mps, got --device .meta."):
        check_device("meta", "--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_cuda_is_one_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="--device 'cuda:1': CUDA is not available"):
        check_device("cuda:1", "--device")
    assert main(["eval", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device 'cuda': CUDA is not available" in err and "Traceback" not in err
    assert main(["search", str(tmp_path), str(tmp_path / "q.npy"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_default_device_is_the_given_one_or_cuda_when_available():
    import torch

    from mrl.devices import default_device

    assert default_device("cpu") == "cpu"
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_plain_cuda_under_torchrun_is_the_local_ranks_gpu(monkeypatch):
    from mrl import devices
    from mrl.config import load_config
    from mrl.devices import rank_device
    from mrl.train import _device

    assert rank_device("cuda", 3, 4) == "cuda:3"  # not GPU 0 for every process
    assert rank_device("cuda", 0, 1) == "cuda"  # one process: as given
    assert rank_device("cuda:1", 3, 4) == "cuda:1"  # an explicit index is kept
    assert rank_device("cpu", 3, 4) == "cpu"
    monkeypatch.setattr(devices, "check_device", lambda device, param: device)  # CPU-only torch
    config = load_config(None, ["device=cuda"])
    assert _device(config, local_rank=2, world_size=4) == torch.device("cuda:2")
    assert _device(config, local_rank=0, world_size=1) == torch.device("cuda")
