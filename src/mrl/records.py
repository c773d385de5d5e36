"""The one result-record format of the project.

Every result file (evaluations, reproductions, benchmarks) is a JSON list of flat objects with at
least ``method``, ``prefix``, ``metric`` and ``value``, plus any context that helps (``dataset``,
``seed``, ``k``, ...). Tables and plots read these records directly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mrl.io import atomic_write_json

REQUIRED_KEYS = ("method", "prefix", "metric", "value")

Record = dict[str, Any]


def make_record(
    method: str, prefix: int | None, metric: str, value: float, **context: Any
) -> Record:
    """One tidy record. ``prefix`` is the prefix size in dims (None where it does not apply)."""
    value = float(value)
    if prefix is not None and (isinstance(prefix, bool) or int(prefix) != prefix or prefix < 1):
        raise ValueError(f"prefix must be a positive whole number of dims or None, got "
                         f"prefix={prefix!r}")
    return {
        "method": str(method),
        "prefix": None if prefix is None else int(prefix),
        "metric": str(metric),
        "value": value if math.isfinite(value) else None,
        **context,
    }


def validate_records(records: Iterable[Record]) -> list[Record]:
    records = list(records)
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"records[{i}] must be an object, got {type(r).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            raise ValueError(f"records[{i}] lacks keys {missing}: {r!r}")
    return records


def load_records(path: str | os.PathLike) -> list[Record]:
    path = Path(path)
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = data.get("records", data.get("results"))
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a list of result records")
    return validate_records(data)


def save_records(path: str | os.PathLike, records: Iterable[Record], append: bool = False) -> None:
    """Write records atomically; ``append`` keeps what the file holds (seeds accumulate)."""
    records = validate_records(records)
    path = Path(path)
    if append and path.exists():
        records = load_records(path) + records
    atomic_write_json(path, records)


def to_markdown(records: Iterable[Record], metric: str | None = None) -> str:
    """A table with one row per (method, metric) and one column per prefix; mean over seeds."""
    rows: dict[tuple[str, str], dict[int | None, list[float]]] = {}
    prefixes: set[int | None] = set()
    for r in records:
        if metric is not None and r["metric"] != metric:
            continue
        if r["value"] is None:
            continue
        cell = rows.setdefault((r["method"], r["metric"]), {}).setdefault(r["prefix"], [])
        cell.append(r["value"])
        prefixes.add(r["prefix"])
    cols = sorted(prefixes, key=lambda p: (p is None, p or 0))
    head = "| method | metric | " + " | ".join("-" if p is None else str(p) for p in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for (method, met), by_prefix in rows.items():
        # One scale per row, from its largest value: a percent row at 1.4 / 23.9 / 88.6 keeps one
        # decimal throughout (per value, 1.4 would show as "1.360").
        dec = _decimals(max(abs(v) for vals in by_prefix.values() for v in vals))
        cells = []
        for p in cols:
            vals = by_prefix.get(p)
            if not vals:
                cells.append("")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.{dec}f}")
            else:
                mean = sum(vals) / len(vals)
                std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
                # The spread gets the mean's decimals: "71.5 ± 2.2", not "71.5 ± 2.217".
                cells.append(f"{mean:.{dec}f} ± {std:.{dec}f}")
        lines.append(f"| {method} | {met} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _decimals(v: float) -> int:
    """Decimals shown for a value: 0 from 1000, 1 from 10, 3 from 1, else 4."""
    if abs(v) >= 1000:
        return 0
    if abs(v) >= 10:
        return 1
    return 4 if abs(v) < 1 else 3


