"""`mrl text finetune` under torchrun: each process embeds its share of a step's batch.

The global batch (``--batch-size`` B, the same pairs in the same order on every process: one
seed) is cut into contiguous shares, one per process. Each process embeds its share, and all
processes exchange the embeddings, so that every query still has the other B - 1 positives of
the global batch as in-batch negatives: the loss is the single-process loss. Only a process's
own rows carry gradient (the others' arrive detached), so its backward pass gives the part of
the gradient that flows through its rows; summing those parts over processes (one all-reduce
of all gradients) gives the full gradient, and every process takes the same optimizer step.
No autograd through collectives, so gloo (CPU) and NCCL (CUDA) behave alike; tested against
one process on CPU with three gloo processes.

Rank 0 holds the checkpoint (with every process's torch RNG state, for dropout) and saves the
model; the other processes stop after the last step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from mrl.distributed import Processes

__all__ = [
    "agree",
    "all_reduce_grads",
    "all_succeeded",
    "broadcast_flag",
    "gather_rows",
    "shares",
]


def shares(idx: list[int], world: int) -> list[list[int]]:
    """``idx`` cut into ``world`` contiguous shares, the first ``len(idx) % world`` one longer
    (a share may be empty when the batch is smaller than the world)."""
    size, extra = divmod(len(idx), world)
    out, start = [], 0
    for r in range(world):
        stop = start + size + (r < extra)
        out.append(idx[start:stop])
        start = stop
    return out


def gather_rows(local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """Every process's rows ``[sum(sizes), ...]`` in rank order; this rank's are ``local``
    (with its gradient), the others' are detached copies.

    ``local [sizes[rank], ...]``. The shares are padded to the largest for the all-gather.
    """
    cmax = max(sizes)
    pad = local.new_zeros((cmax, *local.shape[1:]))
    pad[: local.shape[0]] = local.detach()
    bufs = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(bufs, pad)
    parts = [local if r == rank else bufs[r][: sizes[r]] for r in range(len(sizes))]
    return torch.cat(parts)


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over processes (one all-reduce of one flat buffer).

    A parameter that no process used keeps ``grad = None`` (AdamW then skips it, weight decay
    included, as in one process); one that some process used gets the sum, zeros standing in
    for the processes that did not.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    ref = params[0]
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        + [torch.tensor([p.grad is not None for p in params], dtype=ref.dtype, device=ref.device)]
    )
    dist.all_reduce(flat)
    used = flat[-len(params) :] > 0
    offset = 0
    for p, u in zip(params, used.tolist()):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone() if u else None
        offset += n


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every process (e.g. its clock says: write a checkpoint now)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def agree(d: Processes, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; if it raises, every process raises the same error (else the
    others would wait forever in their next collective). Returns ``fn``'s result on rank 0,
    None elsewhere."""
    if not d.on:
        return fn()
    result, error = None, None
    if d.main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001  (re-raised below, on every rank)
            error = exc
    box = [None if error is None else portable_error(error)]
    dist.broadcast_object_list(box, 0)
    if box[0] is not None:
        if error is not None:
            raise error
        raise rebuilt_error(*box[0])
    return result


def all_succeeded(error: BaseException | None, device: torch.device, what: str) -> None:
    """Every process did ``what`` (``error`` is this process's failure, or None): else every
    process raises (its own error, or one saying how many others failed), none waits."""
    failed = torch.tensor([0.0 if error is None else 1.0], device=device)
    dist.all_reduce(failed)
    if failed.item() > 0:
        if error is not None:
            raise error
        raise RuntimeError(f"{int(failed.item())} other process(es) could not {what}")


# Exception classes sent between processes by name (any class pickles by reference only if
# importable, and some need more than a message to be built): the rest become RuntimeError.
_KINDS = {c.__name__: c for c in (FileNotFoundError, FileExistsError, PermissionError,
                                  ValueError, ImportError, OSError)}  # fmt: skip


def portable_error(error: BaseException) -> tuple[str, str]:
    """``(class name, message)`` of ``error`` that another process can rebuild: the first of
    `_KINDS` it is an instance of, else RuntimeError with the real class named in the text."""
    for name, kind in _KINDS.items():
        if isinstance(error, kind):
            return name, str(error)
    return "RuntimeError", f"{type(error).__name__}: {error}"


def rebuilt_error(name: str, message: str) -> Exception:
    return _KINDS.get(name, RuntimeError)(message)


def gather_rng(d: Processes, device: torch.device) -> dict[str, list[torch.Tensor] | None]:
    """Every process's RNG states (dropout), in rank order, for rank 0's checkpoint: ``cpu``
    (torch's CPU generator) and ``cuda`` (the generator of each process's own GPU; None on
    the CPU)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    out: dict[str, list[torch.Tensor] | None] = {"cpu": None, "cuda": None}
    for key, state in states.items():
        state = state.to(device)  # NCCL gathers device tensors
        bufs = [torch.empty_like(state) for _ in range(d.world_size)]
        dist.all_gather(bufs, state)
        out[key] = [b.cpu() for b in bufs]
    return out
