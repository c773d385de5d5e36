"""Checking a user's ``--device`` before any work: one error naming it, not a torch traceback."""

from __future__ import annotations

from typing import Any

__all__ = ["check_device", "default_device", "rank_device"]


def default_device(device: Any = None) -> Any:
    """``device`` (a name or torch.device) when given, else ``"cuda"`` when torch has it, else
    ``"cpu"``: the default of every command that runs a model."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def rank_device(device: str, local_rank: int, world_size: int) -> str:
    """The device of this process under ``torchrun``: a plain ``"cuda"`` (no index) means
    ``cuda:LOCAL_RANK`` there, else every process would share GPU 0 and leave the others idle.
    An explicit index, another device type, or a single process: ``device`` as given."""
    if world_size > 1 and device == "cuda":
        return f"cuda:{local_rank}"
    return device


def check_device(device: str, param: str = "device") -> str:
    """``device`` if torch can use it here ("cpu", "cuda", "cuda:1", "mps"), else ValueError
    naming ``param`` and the value (a CPU-only torch build, a GPU index out of range, a typo)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"{param} must be a torch device such as cpu, cuda or cuda:1, got {param} {device!r}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{param} {device!r}: CUDA is not available to this torch ({torch.__version__})"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{param} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{param} {device!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"{param} must be cpu, cuda[:N] or mps, got {param} {device!r}")
    return device
