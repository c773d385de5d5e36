"""A results folder from tidy records: JSON, markdown tables, one plot per metric, an HTML page.

    write_report(records, "runs/eval", "CIFAR-10 retrieval", notes="ResNet-18, 3 seeds")

writes into ``out_dir``:

- ``results.json``: the records (`mrl.records.save_records`);
- ``results.md``: the title, notes and one table per metric (`mrl.records.to_markdown`: one row
  per method, one column per prefix, mean ± sample std (n - 1) over seeds);
- ``<metric>.png``: the metric against prefix size (log2 x axis), one line per method, a mean ± std
  band (sample std, as the tables) where a (method, prefix) has several values (seeds);
- ``report.html``: one self-contained page (title, notes, tables, the plots embedded as base64,
  plus extra ``sections``).

Every file is written atomically (`mrl.io`). matplotlib (extra ``vision``) is imported lazily.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from mrl._optional import require
from mrl.io import atomic_open, atomic_write_text
from mrl.records import Record, save_records, table_cells, to_markdown, validate_records

__all__ = ["plot_metric", "write_report"]


def _metrics(records: list[Record]) -> list[str]:
    """Metric names in first-seen order."""
    return list(dict.fromkeys(r["metric"] for r in records))


def _safe_name(metric: str) -> str:
    """A file name for a metric: ``map@10`` -> ``map_at_10``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", metric.replace("@", "_at_"))
    return name.strip("._") or "metric"


def _series(records: list[Record], metric: str) -> dict[str, dict[int, list[float]]]:
    """{method: {prefix: [values over seeds]}} for one metric (records without a prefix, or with
    a None / NaN / inf value, skipped: the tables leave those cells blank)."""
    out: dict[str, dict[int, list[float]]] = {}
    for (method, _, prefix), recs in table_cells(records, metric).items():
        if prefix is not None:
            out.setdefault(method, {}).setdefault(int(prefix), []).extend(r["value"] for r in recs)
    return out


def plot_metric(records: Iterable[Record], metric: str) -> bytes | None:
    """PNG bytes of ``metric`` vs prefix size, one line per method; None if nothing to plot."""
    series = _series(list(records), metric)
    if not series:
        return None
    require("matplotlib", "vision").use("Agg")  # headless: never open a window
    plt = require("matplotlib.pyplot", "vision")
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        for method, by_prefix in series.items():
            xs = sorted(by_prefix)
            vals = [np.asarray(by_prefix[p], dtype=float) for p in xs]
            mean = np.array([v.mean() for v in vals])
            (line,) = ax.plot(xs, mean, marker="o", label=method)
            if any(len(v) > 1 for v in vals):
                std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals])
                ax.fill_between(xs, mean - std, mean + std, alpha=0.2, color=line.get_color())
        prefixes = sorted({p for s in series.values() for p in s})
        if prefixes[0] > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(prefixes, [str(p) for p in prefixes])
        ax.set_xlabel("prefix size (dims)")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _markdown(title: str, notes: str, records: list[Record], metrics: list[str]) -> str:
    parts = [f"# {title}", ""]
    if notes:
        parts += [notes, ""]
    for metric in metrics:
        parts += [f"## {metric}", "", to_markdown(records, metric=metric), ""]
    return "\n".join(parts)


def _md_table_to_html(table: str) -> str:
    """The pipe tables of `to_markdown` as HTML (first line header, second the separator)."""
    # split on the column pipes only: to_markdown writes a "|" inside a name as "\\|"
    rows = [
        [html.escape(c.strip().replace("\\|", "|"))
         for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        for line in table.splitlines()
    ]
    head = "".join(f"<th>{c}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section_html(text: str, images: Path | None = None) -> str:
    """HTML passes through; markdown (what the sections write: headings, pipe tables, lists,
    paragraphs with **bold** and `code`, ``![alt](file.png)``) becomes HTML, every text escaped.
    An image is embedded from ``images`` (the report's folder) when the file is there. Other
    markdown stays text: the page once showed every section as escaped markdown in <pre>."""
    if text.lstrip().startswith("<"):
        return text
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")), None)
        if start and _is_table(lines[start:]):  # a caption line right above its table
            out.append(f"<p>{_inline(' '.join(lines[:start]))}</p>")
            lines, block = lines[start:], "\n".join(lines[start:])
        if _is_table(lines):
            out.append(_md_table_to_html(block))
        elif all(line.startswith("- ") for line in lines):
            items = "".join(f"<li>{_inline(line[2:])}</li>" for line in lines)
            out.append(f"<ul>{items}</ul>")
        elif len(lines) == 1 and (m := re.fullmatch(r"(#{1,6})\s+(.*)", lines[0])):
            level = min(6, len(m.group(1)) + 1)  # under the report's own <h2>
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif len(lines) == 1 and (m := re.fullmatch(r"!\[([^\]]*)\]\(([^)\s]+)\)", lines[0])):
            out.append(_image_html(m.group(1), m.group(2), images))
        else:
            out.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(out)


def _png_html(alt: str, png: bytes) -> str:
    """An <img> holding the PNG itself: the page stays one self-contained file."""
    b64 = base64.b64encode(png).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>"


def _is_table(lines: list[str]) -> bool:
    """Pipe-table lines with a separator row (``|---|:--:|``) second."""
    return len(lines) >= 2 and all(line.lstrip().startswith("|") for line in lines) \
        and set(lines[1].replace("|", "").strip()) <= set("-: ")


def _inline(text: str) -> str:
    """Escaped text with markdown's **bold** and `code`."""
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", t)


def _image_html(alt: str, name: str, images: Path | None) -> str:
    """The image embedded when it is a PNG in ``images``; else a link to it."""
    path = None if images is None else images / name
    if path is not None and path.suffix.lower() == ".png" and path.is_file() \
            and path.resolve().parent == images.resolve():  # only the report's own files
        return _png_html(alt, path.read_bytes())
    if ":" in name or name.startswith("//"):  # a scheme (javascript:, data:) or another host
        return f"<p>{html.escape(alt or name)} ({html.escape(name)})</p>"
    return f"<p><a href='{html.escape(name)}'>{html.escape(alt or name)}</a></p>"


_CSS = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;"
    "text-align:right}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}"
)


def _html(
    title: str,
    notes: str,
    records: list[Record],
    metrics: list[str],
    pngs: dict[str, bytes],
    sections: Sequence[tuple[str, str]],
    images: Path | None = None,
) -> str:
    t = html.escape(title)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{t}</title>"]
    parts += [f"<style>{_CSS}</style></head><body><h1>{t}</h1>"]
    if notes:
        parts.append(_section_html(notes, images))
    for metric in metrics:
        parts.append(f"<h2>{html.escape(metric)}</h2>")
        parts.append(_md_table_to_html(to_markdown(records, metric=metric)))
        if metric in pngs:
            parts.append(_png_html(metric, pngs[metric]))
    for heading, text in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{_section_html(text, images)}")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    records: Iterable[Record],
    out_dir: str | os.PathLike,
    title: str,
    notes: str = "",
    sections: Sequence[tuple[str, str]] = (),
    plots: bool = True,
    tables: Iterable[Record] | None = None,
) -> dict[str, Path]:
    """Write results.json, results.md, one PNG per metric and report.html into ``out_dir``.

    Args:
        records: tidy result records (`mrl.records`).
        out_dir: the folder (created if missing).
        title: page and markdown title.
        notes: a paragraph under the title (markdown text, or HTML starting with ``<``).
        sections: extra ``(heading, markdown-or-html)`` pairs appended to the HTML page.
        plots: False skips the PNGs. Without matplotlib they are skipped with a warning: the
            tables and records of a long run are never lost to a missing plotting package.
        tables: the records of the per-metric tables and plots (default: ``records``), for a
            report whose records include some that are not seeds of one setting per cell (the
            demo's cascade curve: several operating points per prefix, tabled in its section).
            ``results.json`` always holds every record.

    Returns:
        ``{"json": ..., "markdown": ..., "html": ..., "<metric>": png path, ...}``.
    """
    records = validate_records(records)
    if not records:
        raise ValueError("records must not be empty, got []")
    shown = records if tables is None else validate_records(tables)
    for i, s in enumerate(sections):
        if not (isinstance(s, (tuple, list)) and len(s) == 2):
            raise ValueError(f"sections[{i}] must be a (heading, text) pair, got {s!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = _metrics(shown)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "html": out / "report.html",
    }
    save_records(paths["json"], records)
    atomic_write_text(paths["markdown"], _markdown(title, notes, shown, metrics))
    pngs: dict[str, bytes] = {}
    if plots and importlib.util.find_spec("matplotlib") is None:
        warnings.warn("matplotlib is not installed: the report has no plots (pip install "
                      "'mrl[vision]' for them)", stacklevel=2)
        plots = False
    taken: set[str] = set()
    for metric in metrics if plots else []:
        png = plot_metric(shown, metric)
        if png is not None:
            pngs[metric] = png
            name = _safe_name(metric)
            while name in taken:  # "p@10" and "p_at_10" wrote one file, the second over the first
                name += "_"
            taken.add(name)
            paths[metric] = out / f"{name}.png"
            with atomic_open(paths[metric], "wb") as f:
                f.write(png)
    atomic_write_text(paths["html"], _html(title, notes, shown, metrics, pngs, sections, out))
    return paths
