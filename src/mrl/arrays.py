"""One conversion from what users pass (numpy arrays, lists, torch tensors) to numpy.

The numpy-based parts of mrl (retrieval, the adaptor, the cascade) take torch tensors as they
come out of a model: still attached to the autograd graph, on a GPU, or in bfloat16 (which numpy
has no dtype for). `as_numpy` handles all three in one place instead of each caller failing in
its own way ("Can't call numpy() on Tensor that requires grad", "unsupported ScalarType").
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_numpy", "torch_shareable"]


def as_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array: tensors are detached and moved to the CPU; bfloat16 becomes
    float32 (exact: every bfloat16 value is a float32 value); other dtypes are kept (float16
    stays float16). Arrays and lists go through ``np.asarray`` (no copy of an ndarray)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def torch_shareable(x: np.ndarray) -> np.ndarray:
    """``x`` itself when ``torch.from_numpy`` can share it, else a native-order contiguous copy:
    torch refuses negative strides (a reversed view ``x[::-1]``) and non-native byte order (a
    big-endian ``>f4`` array read from a file)."""
    if x.dtype.isnative and all(s >= 0 for s in x.strides):
        return x
    return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
