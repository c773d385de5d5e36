"""Checks of scalar parameters: whole numbers stay whole, flags stay flags.

``int(2.5)`` is 2 and ``True`` is an ``int``: without these checks ``draws=2.5`` ran 2 draws and
recorded 2, and ``head_shots=True`` meant one shot. Each check names the parameter and the value.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np

__all__ = ["check_flag", "check_int", "is_int"]


def is_int(value: Any) -> bool:
    """An integer: Python's or numpy's, not a bool (True is an int: 1) and not a float 2.0."""
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def check_int(value: Any, name: str, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """``value`` as an int: an integer (numpy ones too, not a bool) in [minimum, maximum]
    (either bound may be None)."""
    if not is_int(value):
        raise ValueError(f"{name} must be an integer, got {name}={value!r}")
    low = minimum is not None and value < minimum
    if low or (maximum is not None and value > maximum):
        bounds = (f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None
                  else f">= {minimum}" if low or maximum is None else f"<= {maximum}")
        raise ValueError(f"{name} must be {bounds}, got {name}={int(value)}")
    return int(value)


def check_flag(value: Any, name: str) -> bool:
    """``value`` as a bool: True or False (numpy's too), not a string such as "no"."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {name}={value!r}")
    return bool(value)
