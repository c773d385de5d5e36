"""`Nesting`: the prefix sizes of a Matryoshka embedding, as one immutable, validated value.

An embedding of full size D is trained so that every prefix ``z[:m]`` for ``m`` in the nesting is a
usable representation. The nesting is created once and saved (as JSON) with every artifact:
checkpoints, embedding stores, indexes and cascades all carry it, so nothing is inferred from a
file name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mrl.params import check_int

__all__ = ["Nesting"]


@dataclass(frozen=True)
class Nesting:
    """Strictly increasing positive prefix sizes ``m_1 < ... < m_G = D`` and per-prefix weights.

    Args:
        sizes: the prefix sizes; the last one is the full embedding size D.
        weights: one non-negative, finite loss weight per prefix (default 1 each, the paper's sum).

    Example:
        >>> Nesting.doubling(8, 100).sizes
        (8, 16, 32, 64, 100)
    """

    sizes: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sizes, (str, bytes)) or not hasattr(self.sizes, "__iter__"):
            raise ValueError(f"sizes must be a sequence of ints such as (8, 16, 32) (a spec "
                             f"string goes to Nesting.parse), got sizes={self.sizes!r}")
        sizes = tuple(self.sizes) if not isinstance(self.sizes, tuple) else self.sizes
        if len(sizes) == 0:
            raise ValueError("sizes must not be empty, got ()")
        sizes = tuple(check_int(s, f"sizes[{i}]") for i, s in enumerate(sizes))
        for i, s in enumerate(sizes):
            if s <= 0:
                raise ValueError(f"sizes must be positive, got sizes[{i}]={s} in {list(sizes)}")
            if i and s <= sizes[i - 1]:
                raise ValueError(
                    f"sizes must be strictly increasing, got sizes[{i}]={s} after "
                    f"sizes[{i - 1}]={sizes[i - 1]} in {list(sizes)}"
                )
        weights = self.weights
        if weights is None:
            weights = (1.0,) * len(sizes)
        else:
            if isinstance(weights, (str, bytes)):  # "12" was read as the weights (1.0, 2.0)
                raise ValueError(f"weights must be numbers, one per prefix, got "
                                 f"weights={self.weights!r}")
            try:
                weights = tuple(float(w) for w in weights)
            except (TypeError, ValueError):
                raise ValueError(f"weights must be numbers, one per prefix, got "
                                 f"weights={self.weights!r}") from None
            if len(weights) != len(sizes):
                raise ValueError(
                    f"weights must have one entry per prefix ({len(sizes)}), "
                    f"got {len(weights)}: {list(weights)}"
                )
            for i, w in enumerate(weights):
                if not math.isfinite(w) or w < 0:
                    raise ValueError(
                        f"weights must be finite and non-negative, got weights[{i}]={w}"
                    )
            if sum(weights) == 0:
                raise ValueError(f"weights must not all be zero, got {list(weights)}")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "weights", weights)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def doubling(cls, start: int, dim: int, weights: Sequence[float] | None = None) -> Nesting:
        """Sizes ``start, 2*start, 4*start, ...`` below ``dim``, then ``dim`` itself.

        ``Nesting.doubling(8, 2048)`` is the paper's nesting (8, 16, ..., 2048); for a D that is
        not ``start`` times a power of two, D is still the last size: ``doubling(8, 384)`` ends
        256, 384.
        """
        start = check_int(start, "start")
        dim = check_int(dim, "dim")
        if start <= 0:
            raise ValueError(f"start must be positive, got start={start}")
        if dim < start:
            raise ValueError(f"dim must be >= start, got dim={dim} < start={start}")
        sizes = []
        m = start
        while m < dim:
            sizes.append(m)
            m *= 2
        sizes.append(dim)
        return cls(tuple(sizes), None if weights is None else tuple(weights))

    @classmethod
    def full(cls, dim: int) -> Nesting:
        """A single prefix: the full embedding (a plain, non-Matryoshka model)."""
        return cls((check_int(dim, "dim"),))

    @classmethod
    def coerce(cls, value: Any, name: str = "nesting") -> Nesting:
        """What public functions call on a user's nesting argument: a `Nesting` as it is; a
        spec string, a sequence or a 1-D array of ints through `parse`; anything else a
        ValueError naming ``name`` (instead of an AttributeError deep inside)."""
        if isinstance(value, Nesting):
            return value
        if isinstance(value, (bytes, bytearray)):  # a Sequence of ints, but never meant as sizes
            raise ValueError(f"{name} must be a Nesting, a list of ints or a spec string, got "
                             f"bytes {value!r}")
        if isinstance(value, (str, Sequence)):
            return cls.parse(value)
        if hasattr(value, "tolist") and getattr(value, "ndim", None) == 1:  # numpy / torch 1-D
            return cls.parse(value.tolist())
        raise ValueError(f"{name} must be a Nesting, a list of ints or a spec such as "
                         f"'8,16,32', got {name}={value!r}")

    @classmethod
    def parse(cls, spec: str | Sequence[int] | Nesting, dim: int | None = None) -> Nesting:
        """Build a nesting from a command-line style spec.

        Accepts ``"8,16,32,64"``, ``"doubling:8"`` (needs ``dim``), ``"full"`` (needs ``dim``), a
        sequence of ints or a `Nesting`. When ``dim`` is given it must equal the last size.
        """
        if isinstance(spec, Nesting):
            nesting = spec
        elif isinstance(spec, str):
            text = spec.strip()
            if text.startswith("doubling:") or text == "full":
                if dim is None:
                    raise ValueError(f"nesting spec {spec!r} needs the embedding dim")
                if text == "full":
                    return cls.full(dim)
                try:
                    start = int(text.split(":", 1)[1])
                except ValueError:
                    raise ValueError(f"nesting spec {spec!r}: start must be an int") from None
                return cls.doubling(start, dim)
            try:  # one trailing comma is tolerated; an empty item elsewhere is a typo
                sizes = tuple(int(s) for s in text.removesuffix(",").split(","))
            except ValueError:
                raise ValueError(
                    f"nesting spec {spec!r} is not a comma-separated list of ints, "
                    "'doubling:START' or 'full'"
                ) from None
            nesting = cls(sizes)
        else:
            nesting = cls(tuple(spec))
        if dim is not None and nesting.dim != dim:
            raise ValueError(
                f"nesting {list(nesting.sizes)} ends at {nesting.dim}, "
                f"but the embedding dim is {dim}"
            )
        return nesting

    # ----------------------------------------------------------------- accessors
    @property
    def dim(self) -> int:
        """The full embedding size D (the last prefix)."""
        return self.sizes[-1]

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        return iter(self.sizes)

    def __contains__(self, m: object) -> bool:
        return m in self.sizes

    def index(self, m: int) -> int:
        """Position of prefix size ``m``; a clear error when ``m`` is not one of the sizes."""
        try:
            return self.sizes.index(m)
        except ValueError:
            raise ValueError(f"prefix {m!r} is not in the nesting {list(self.sizes)}") from None

    @property
    def chunks(self) -> tuple[tuple[int, int], ...]:
        """Half-open column ranges ``[m_{g-1}, m_g)`` between consecutive prefix sizes (m_0 = 0)."""
        starts = (0,) + self.sizes[:-1]
        return tuple(zip(starts, self.sizes))

    def check_dim(self, dim: int, name: str = "embeddings") -> None:
        """Raise if an embedding of size ``dim`` does not match this nesting's full size."""
        if dim != self.dim:
            raise ValueError(
                f"{name} have dimension {dim}, but the nesting {list(self.sizes)} "
                f"expects {self.dim}"
            )

    def truncated(self, dim: int) -> Nesting:
        """The sizes that fit in ``dim`` (dim itself is added as the last size if missing), with
        their weights; an added ``dim`` takes the weight of the size it replaces."""
        dim = check_int(dim, "dim")
        if dim > self.dim:  # growing a nesting would invent a prefix no head was trained for
            raise ValueError(f"dim must be at most the nesting's largest prefix {self.dim}, got "
                             f"dim={dim}")
        keep = [g for g, m in enumerate(self.sizes) if m < dim]  # never the last: dim <= D
        weights = [self.weights[g] for g in keep] + [self.weights[len(keep)]]
        return Nesting(tuple(self.sizes[g] for g in keep) + (dim,), tuple(weights))

    def with_weights(self, weights: Iterable[float]) -> Nesting:
        return Nesting(self.sizes, tuple(weights))

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Nesting:
        if not isinstance(data, dict) or "sizes" not in data:
            raise ValueError(f"a nesting must be a JSON object with 'sizes', got {data!r}")
        unknown = set(data) - {"sizes", "weights"}
        if unknown:
            raise ValueError(f"unknown nesting keys {sorted(unknown)} in {data!r}")
        weights = data.get("weights")
        return cls(tuple(data["sizes"]), None if weights is None else tuple(weights))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Nesting:
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        if all(w == 1.0 for w in self.weights):
            return f"Nesting({list(self.sizes)})"
        return f"Nesting({list(self.sizes)}, weights={list(self.weights)})"
