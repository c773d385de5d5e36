"""Process bodies for tests/test_text_distributed.py, in a module of their own: a spawned
process imports the module its function lives in, and this one imports no more than torch
(the test module imports sentence-transformers, which took seconds per process).

Processes meet through a file (``init_method=file://``), not a TCP port: no port can be
taken by someone else between choosing it and binding it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

SETTINGS = dict(nesting="8,16,32", batch_size=4, epochs=2, lr=1e-3, max_seq_length=32)


def pairs(n: int = 10, negatives: bool = False) -> list:
    """10 pairs in batches of 4: each epoch ends with a batch of 2 (with three processes, one
    has an empty share)."""
    from mrl.text.pairs import Pair

    return [Pair(f"title {i} wing", f"a body {i} about lift and heat {i % 3}",
                 f"an aside {i} on noise" if negatives else None) for i in range(n)]  # fmt: skip


def join(rank: int, world: int, init_file: str) -> None:
    """What torchrun would set up, then the process group (through ``init_file``)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip


def linear_problem() -> tuple[torch.nn.Linear, torch.Tensor]:
    """A seeded linear map (weights and bias) and 5 input rows."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 4, generator=g))
        lin.bias.copy_(torch.randn(3, generator=g))
    return lin, torch.randn(5, 4, generator=g)


def coupled_loss(y: torch.Tensor) -> torch.Tensor:
    """A loss that couples rows of different processes' shares."""
    return y.pow(2).sum() + y[0, 0] * y[4, 1]


def grad_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Each process maps its share of the 5 rows (3 + 2); the loss of the gathered batch,
    backward, all-reduce: rank 0 saves the rows and gradients."""
    from mrl.text.distributed import all_reduce_grads, gather_rows, shares

    join(rank, world, init_file)
    lin, x = linear_problem()
    unused = torch.nn.Linear(2, 2)  # no gradient anywhere: must stay None
    parts = shares(list(range(5)), world)
    y = gather_rows(lin(x[parts[rank]]), [len(p) for p in parts], rank)  # [5, 3]
    coupled_loss(y).backward()
    all_reduce_grads([*lin.parameters(), *unused.parameters()])
    if rank == 0:
        torch.save({"y": y.detach(), "w": lin.weight.grad, "b": lin.bias.grad,
                    "unused": [p.grad for p in unused.parameters()]}, out)  # fmt: skip
    dist.destroy_process_group()


def finetune_worker(rank: int, world: int, init_file: str, model: str, out: str,
                    settings: dict, stop_after: int, resume: bool) -> None:  # fmt: skip
    """`finetune` in one of ``world`` processes; ``stop_after >= 0``: every process is stopped
    (KeyboardInterrupt) at the loss of step ``stop_after + 1``, after that step's checkpoint."""
    join(rank, world, init_file)
    import mrl.text.finetune as ft

    if stop_after >= 0:
        loss, calls = ft.matryoshka_contrastive_loss, {"n": 0}

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > stop_after:
                raise KeyboardInterrupt
            return loss(*args, **kwargs)

        ft.matryoshka_contrastive_loss = interrupted
    settings = dict(settings)
    data = pairs(negatives=settings.pop("_negatives", False))
    try:
        ft.finetune(model, data, out, ft.FinetuneConfig(**settings), log=lambda s: None,
                    resume=resume, checkpoint_minutes=0)  # fmt: skip
    except KeyboardInterrupt:
        pass
    finally:
        dist.destroy_process_group()
