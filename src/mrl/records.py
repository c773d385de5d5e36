"""The one result-record format of the project.

Every result file (evaluations, reproductions, benchmarks) is a JSON list of flat objects with at
least ``method``, ``prefix``, ``metric`` and ``value``, plus any context that helps (``dataset``,
``seed``, ``k``, ...). Tables and plots read these records directly.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mrl.io import atomic_write_json
from mrl.params import is_int

REQUIRED_KEYS = ("method", "prefix", "metric", "value")

Record = dict[str, Any]


def make_record(
    method: str, prefix: int | None, metric: str, value: float, **context: Any
) -> Record:
    """One tidy record. ``prefix`` is the prefix size in dims (None where it does not apply)."""
    try:
        value = float(value)  # numbers, numpy/torch scalars
    except (TypeError, ValueError):  # "abc", None: a bare float() error named nothing
        raise ValueError(f"value must be a number, got value={value!r} (metric={metric!r})"
                         ) from None
    whole = isinstance(prefix, numbers.Real) and math.isfinite(prefix) and int(prefix) == prefix
    if prefix is not None and (isinstance(prefix, bool) or not whole or prefix < 1):
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
        v = r["value"]
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise ValueError(f"records[{i}] value must be a number or None, got value={v!r}")
        p = r["prefix"]  # "8" sorted against 8 in every table: a TypeError after the work
        if p is not None and not is_int(p):
            raise ValueError(f"records[{i}] prefix must be a whole number or None, got "
                             f"prefix={p!r}")
        for key in ("method", "metric"):
            if not isinstance(r[key], str):
                raise ValueError(f"records[{i}] {key} must be a string, got {key}={r[key]!r}")
    return records


def finite_value(v: Any) -> bool:
    """A value that belongs in a table or plot: not None, NaN or inf (a file written by hand or
    by an older version may hold NaN / Infinity, which `make_record` stores as None)."""
    return v is not None and math.isfinite(v)


def _json_safe(obj: Any, where: str) -> Any:
    """``obj`` as strict JSON data: numpy / torch scalars and arrays as Python numbers and lists,
    non-finite floats as None (``NaN`` / ``Infinity`` are not JSON; `make_record` does the same
    for ``value``). Anything else that JSON cannot hold is a ValueError naming where it is."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v, f"{where}[{j}]") for j, v in enumerate(obj)]
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):  # numpy / torch scalar or array
        return _json_safe(obj.tolist(), where)
    raise ValueError(f"{where} cannot be written as JSON, got {type(obj).__name__} {obj!r}")


def _identity(r: Record) -> str:
    """A record's identity: every key but ``value`` (method, metric, prefix, seed, context)."""
    return json.dumps({k: v for k, v in r.items() if k != "value"}, sort_keys=True, default=str)


def load_records(path: str | os.PathLike) -> list[Record]:
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # the message named no file
        raise ValueError(f"{path} is not a JSON file of result records ({exc})") from None
    if isinstance(data, dict):
        data = data.get("records", data.get("results"))
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a list of result records")
    try:
        return validate_records(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def save_records(path: str | os.PathLike, records: Iterable[Record], append: bool = False) -> None:
    """Write records atomically as strict JSON (numpy numbers as Python ones, NaN / inf as null).

    ``append`` keeps what the file holds (seeds accumulate); a record of the file with the same
    identity as a new seeded one (every key but ``value``, ``seed`` among them: a rerun of the
    same seed and setting) is replaced by it, not kept beside it. Records without a ``seed``
    (repeated measurements, e.g. a benchmark run again) accumulate."""
    records = [_json_safe(r, f"records[{i}]") for i, r in enumerate(validate_records(records))]
    path = Path(path)
    if append and path.exists():
        new = {_identity(r) for r in records if r.get("seed") is not None}
        records = [r for r in load_records(path) if _identity(r) not in new] + records
    atomic_write_json(path, records)


# Context that must agree within one cell: records that differ in it are not seeds of one setting.
_SAME_IN_A_CELL = ("dataset", "split", "center", "k", "budget")


def to_markdown(records: Iterable[Record], metric: str | None = None) -> str:
    """A table with one row per (method, metric) and one column per prefix.

    A cell with one record shows its value; with several, their mean ± the sample standard
    deviation (n - 1) over seeds. Missing, None, NaN and inf values leave the cell blank. A cell
    whose records are not distinct seeds of one setting (a seed twice, or another ``dataset``,
    ``split``, ``center``, ``k`` or ``budget``) is still averaged, with a warning.
    """
    cells = table_cells(records, metric)
    warn_pooled(cells, "to_markdown")
    rows: dict[tuple[str, str], dict[int | None, list[float]]] = {}  # in order of appearance
    for (method, met, prefix), recs in cells.items():
        rows.setdefault((method, met), {})[prefix] = [r["value"] for r in recs]
    cols = sorted({p for _, _, p in cells}, key=lambda p: (p is None, p or 0))
    head = "| method | metric | " + " | ".join("-" if p is None else str(p) for p in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for (method, met), by_prefix in rows.items():
        # One scale per row, from its largest value: a percent row at 1.4 / 23.9 / 88.6 keeps one
        # decimal throughout (per value, 1.4 would show as "1.360").
        dec = _decimals(max(abs(v) for vals in by_prefix.values() for v in vals))
        shown = []
        for p in cols:
            vals = by_prefix.get(p)
            if not vals:
                shown.append("")
            elif len(vals) == 1:
                shown.append(f"{vals[0]:.{dec}f}")
            else:
                mean = sum(vals) / len(vals)
                std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
                # The spread gets the mean's decimals: "71.5 ± 2.2", not "71.5 ± 2.217".
                shown.append(f"{mean:.{dec}f} ± {std:.{dec}f}")
        lines.append(f"| {_escape(method)} | {_escape(met)} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def table_cells(records: Iterable[Record], metric: str | None = None) -> dict[tuple, list[Record]]:
    """(method, metric, prefix) -> the records of that cell with a finite value (of ``metric``
    only, when given), in order of appearance: what a table or a claim averages."""
    cells: dict[tuple, list[Record]] = {}
    for r in records:
        if (metric is None or r["metric"] == metric) and finite_value(r.get("value")):
            cells.setdefault((r["method"], r["metric"], r["prefix"]), []).append(r)
    return cells


def _escape(name: Any) -> str:
    """A name in a pipe table: a ``|`` in it would start a new column, a line break a new row
    (the HTML report then lost the name)."""
    return " ".join(str(name).splitlines()).replace("|", "\\|")


def warn_pooled(cells: dict[tuple, list[Record]], caller: str, stacklevel: int = 3) -> None:
    """Warn when a cell (``caller``'s mean, e.g. a table cell) averages records that are not
    distinct seeds of one setting."""
    bad = []
    for (method, met, prefix), recs in cells.items():
        if len(recs) < 2:
            continue
        # repeated measurements without a seed may be averaged; a seed twice may not
        seeds = [json.dumps(r["seed"], default=str) for r in recs if r.get("seed") is not None]
        differ = [k for k in _SAME_IN_A_CELL
                  if len({json.dumps(r.get(k), default=str) for r in recs}) > 1]
        if len(set(seeds)) < len(seeds) or differ:
            why = f"differ in {differ}" if differ else "repeat a seed"
            bad.append(f"method={method!r} metric={met!r} prefix={prefix!r} ({len(recs)} "
                       f"records that {why})")
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        warnings.warn(f"{caller}: a cell's mean ± std is not over seeds of one setting: "
                      f"{bad[0]}{more}; filter the records first", stacklevel=stacklevel)


def _decimals(v: float) -> int:
    """Decimals shown for a value: 0 from 1000, 1 from 10, 3 from 1, else 4."""
    if abs(v) >= 1000:
        return 0
    if abs(v) >= 10:
        return 1
    return 4 if abs(v) < 1 else 3


