"""The processes of a torchrun job: one process when WORLD_SIZE is unset or 1.

`join` initialises torch.distributed from torchrun's environment (NCCL when CUDA is there and
the run is not on the CPU, else gloo); `mrl.train` and `mrl.text.finetune` both use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Processes", "RankError", "join", "rank_from_env"]


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


class RankError(ValueError):
    """A bad RANK / WORLD_SIZE: only the process that has it knows, so every process says it
    (the CLI prints rank 0's one-line errors only, which left rank 1's exit 2 silent)."""

    every_process = True


def rank_from_env() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of the environment (torchrun sets them; default 0 and 1), checked."""
    values = {}
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1")):
        text = os.environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            raise RankError(f"environment variable {name} must be an integer, got "
                            f"{name}={text!r}") from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    if world < 1 or not 0 <= rank < world:
        raise RankError(f"environment variables RANK={rank} and WORLD_SIZE={world} need "
                        "0 <= RANK < WORLD_SIZE (torchrun sets both)")
    return rank, world


def join(device_type: str | None = None) -> Processes:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else one process.
    ``device_type``: "cpu" forces gloo even where CUDA is available. RANK and WORLD_SIZE are
    checked first: RANK=5 of 2 failed inside gloo and left rank 0 waiting."""
    world = rank_from_env()[1]
    if world <= 1:
        return Processes()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_type != "cpu" else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return Processes(dist.get_rank(), dist.get_world_size(), local)
