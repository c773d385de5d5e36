"""The processes of a torchrun job: one process when WORLD_SIZE is unset or 1.

`join` initialises torch.distributed from torchrun's environment (NCCL when CUDA is there and
the run is not on the CPU, else gloo); `mrl.train` and `mrl.text.finetune` both use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Processes", "join"]


@dataclass(frozen=True)
class Processes:
    """This process's place: rank, world size, local rank (its GPU on a node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        """Several processes (torchrun), not one."""
        return self.world_size > 1


def join(device_type: str | None = None) -> Processes:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else one process.
    ``device_type``: "cpu" forces gloo even where CUDA is available."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_type != "cpu" else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return Processes(dist.get_rank(), dist.get_world_size(), local)
