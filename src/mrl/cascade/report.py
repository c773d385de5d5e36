"""Plot and markdown for a cascade evaluation (`mrl.cascade.evaluate.evaluate_cascade`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrl._optional import require

__all__ = ["curve_table", "headline_markdown", "plot_curves", "write_outputs"]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _ms(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    if stat is None:
        return "n/a (not reached on some seed)"
    if stat.get("n", 2) == 1:
        return f"{scale * stat['mean']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _headline_sentence(h: dict[str, Any], ref_name: str, fixed: str, pts: float) -> str:
    ratio = "n/a" if h["x_smaller"] is None else f"{h['x_smaller']:.2f}"
    if h["cascade_dims"] is None:
        cas = "no point of the curve (it does not reach that accuracy)"
    else:
        spread = ("one calibration split; " if h.get("n_seeds", 2) < 2
                  else f"± {h['cascade_dims_std']:.1f} over seeds; ")  # no "± 0.0" of one seed
        cas = (
            f"{h['cascade_dims']:.1f} expected dims ({spread}"
            f"test accuracy {100 * h['cascade_accuracy']:.2f} %, "
            + ("the full size: no fitted point reaches it)" if h["tolerance"] is None
               else f"tolerance {100 * h['tolerance']:g} points)")
        )
    m = h["fixed_dims"]
    fix = (
        "none" if m is None else f"{fixed}-{m} (test accuracy {100 * h['fixed_accuracy'][m]:.2f} %)"
    )
    return (
        f"**At the accuracy of {ref_name} ({100 * h['reference_accuracy']:.2f} %), seed-averaged "
        f"curve, within {pts:g} points: the cascade needs {cas}; the smallest {fixed} model is "
        f"{fix}; {ratio} x smaller.**"
    )


def headline_markdown(summary: dict[str, Any], match: float = 0.005) -> str:
    """A few sentences and a table with the headline numbers (mean ± std over seeds)."""
    pts = 100 * match
    fixed = summary["fixed_name"].upper()
    own_name = f"mrl-{summary['reference'].split('-')[-1]}"
    lines = [_headline_sentence(summary["mean_curve_headline"], summary["reference"], fixed, pts)]
    if summary["reference"].startswith("ff"):
        lines += ["", _headline_sentence(summary["mean_curve_headline_own"], own_name, fixed, pts)]
    lines += [
        "",
        f'Reference ("full-size model"): **{summary["reference"]}**, test accuracy '
        f"{_ms(summary['reference_test_accuracy'], 100, 2)} %. Seeds (calibration/test splits): "
        f"{summary['seeds']}.",
        "",
        "| quantity | value (mean ± std over seeds) |",
        "|---|---|",
        f"| per seed: cascade's fewest expected dims within {pts:g} points of the reference "
        "(that seed's test curve) | "
        f"{_ms(summary['cascade_dims_to_match'])} |",
        f"| per seed: cascade's fewest expected dims within {pts:g} points of its own full-size "
        "prefix "
        f"(test accuracy {_ms(summary['own_reference_test_accuracy'], 100, 2)} %) | "
        f"{_ms(summary['cascade_dims_to_match_own'])} |",
        f"| per seed: smallest {fixed} model within {pts:g} points of the reference | "
        f"{_ms(summary['fixed_dims_to_match'], digits=0)} |",
        f"| per seed: x smaller ({fixed} dims / cascade expected dims) | "
        f"{_ms(summary['x_smaller'], digits=2)} |",
        f"| cascade fitted on calibration to reference - {pts:g} points: test accuracy (%) | "
        f"{_ms(summary['matched_accuracy'], 100, 2)} |",
        "| ... its expected dims (= MRL-E classifier cost) | "
        f"{_ms(summary['matched_expected_dims'])} |",
        "| ... its expected head dims (independent MRL heads, every head passed) | "
        f"{_ms(summary['matched_expected_head_dims'])} |",
        f"| cascade fitted on calibration to its own full-size prefix - {pts:g} points: test "
        f"accuracy (%) | {_ms(summary['matched_own_accuracy'], 100, 2)} |",
        "| ... its expected dims (= MRL-E classifier cost) | "
        f"{_ms(summary['matched_own_expected_dims'])} |",
        "| ... its expected head dims (independent MRL heads) | "
        f"{_ms(summary['matched_own_expected_head_dims'])} |",
        "| oracle (smallest correct prefix): accuracy (%) | "
        f"{_ms(summary['oracle_accuracy'], 100, 2)} |",
        f"| oracle: expected dims | {_ms(summary['oracle_expected_dims'])} |",
    ]
    return "\n".join(lines)


def curve_table(summary_seed: dict[str, Any]) -> str:
    """The accuracy-vs-dims curve of one seed as a markdown table."""
    lines = [
        "| tolerance (points) | calib acc (%) | test acc (%) | expected dims | expected heads | "
        "expected head dims (MRL) | thresholds |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in summary_seed["curve"]:
        full = p["tolerance"] is None  # the curve's end: the largest prefix for every sample
        th = "none (full size)" if full else ", ".join(f"{t:.3f}" for t in p["thresholds"])
        tol = "full size" if full else f"{100 * p['tolerance']:g}"
        lines.append(
            f"| {tol} | {_pct(p['calib_accuracy'])} | {_pct(p['accuracy'])} | "
            f"{p['expected_dims']:.1f} | {p['expected_heads']:.2f} | "
            f"{p['expected_head_dims']:.1f} | {th} |"
        )
    return "\n".join(lines)


def _seed_mean(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The plot's fixed points, oracle and reference: means over the seeds' summaries (each seed
    measures them on its own test part; seed 0 alone disagreed with the seed-mean headline)."""
    def mean(key: str) -> float:
        return float(np.mean([s[key] for s in summaries]))

    def mean_dict(key: str) -> dict[Any, float]:
        return {m: float(np.mean([s[key][m] for s in summaries])) for m in summaries[0][key]}

    return {
        "mrl_accuracy": mean_dict("mrl_accuracy"),
        "ff_accuracy": mean_dict("ff_accuracy"),
        "oracle_expected_dims": mean("oracle_expected_dims"),
        "oracle_accuracy": mean("oracle_accuracy"),
        "reference_test_accuracy": mean("reference_test_accuracy"),
        "reference": summaries[0]["reference"],
    }


def plot_curves(
    summaries: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    title: str = "",
    match: float = 0.005,
) -> Path:
    """Accuracy (%) against expected dims (log scale): cascade curves (one per seed), fixed MRL
    prefixes, FF models, the oracle and the reference band."""
    mpl = require("matplotlib", "vision")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot", "vision")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, s in enumerate(summaries):
        xs = [p["expected_dims"] for p in s["curve"]]
        ys = [100 * p["accuracy"] for p in s["curve"]]
        ax.plot(
            xs,
            ys,
            "-o",
            ms=3,
            color="C0",
            alpha=1.0 if i == 0 else 0.35,
            label="MRL cascade (per seed)" if i == 0 else None,
        )
    s0 = _seed_mean(summaries)  # the headline's reference is the seed mean too
    ax.plot(
        list(s0["mrl_accuracy"]),
        [100 * a for a in s0["mrl_accuracy"].values()],
        "s--",
        color="C2",
        label="MRL, fixed prefix",
    )
    if s0["ff_accuracy"]:
        ax.plot(
            list(s0["ff_accuracy"]),
            [100 * a for a in s0["ff_accuracy"].values()],
            "^--",
            color="C3",
            label="FF-m",
        )
    ax.plot(
        [s0["oracle_expected_dims"]],
        [100 * s0["oracle_accuracy"]],
        "*",
        ms=12,
        color="C1",
        label="oracle",
    )
    ref = 100 * s0["reference_test_accuracy"]
    ax.axhline(ref, color="grey", lw=0.8)
    ax.axhline(
        ref - 100 * match,
        color="grey",
        lw=0.8,
        ls=":",
        label=f"{s0['reference']} - {100 * match:g} pts",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("expected dims")
    ax.set_ylabel("test accuracy (%)")
    lo = min(min(100 * a for a in s0["mrl_accuracy"].values()), ref - 5)
    ax.set_ylim(max(lo, ref - 15), max(ref + 1.5, 100 * s0["oracle_accuracy"] + 0.5))
    ax.set_title(title or "Adaptive classification")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    from mrl.io import atomic_open

    path = Path(path)
    fig.tight_layout()
    try:  # through a temporary file: an interrupted save leaves no truncated cascade.png
        with atomic_open(path, "wb") as f:
            fig.savefig(f, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def _versions() -> str:
    import numpy as np

    parts = [f"numpy {np.__version__}"]
    try:
        import torch

        parts.insert(0, f"torch {torch.__version__}")
    except ImportError:  # pragma: no cover
        pass
    from mrl import __version__

    return f"mrl {__version__}, " + ", ".join(parts)


def _fixed_table(records: Sequence[dict[str, Any]]) -> str:
    from mrl.records import to_markdown

    fixed = [r for r in records if r["method"] in ("mrl", "ff") and r["metric"] == "accuracy"]
    return to_markdown([{**r, "value": 100 * r["value"]} for r in fixed])


def _fewshot_tables(records: Sequence[dict[str, Any]]) -> str:
    from mrl.records import to_markdown

    few = [r for r in records if r["metric"].startswith(("ncm_", "lt"))]
    if not few:
        return ""
    pct = [{**r, "value": 100 * r["value"]} for r in few]
    # the head classes' support as recorded: min(100, the smallest class), not always 100
    heads = sorted({r["head_shots"] for r in few if r["metric"].startswith("lt")
                    and r.get("head_shots") is not None}, key=str)  # fmt: skip
    head = "all they have" if not heads else " or ".join(str(h) for h in heads)
    where = (
        "support drawn from a seeded subset of training images, queries: the whole split"
        if few[0].get("support_from") == "train"
        else "support drawn from a seeded half of the split, queries: the other half"
    )
    return (
        "## Few-shot and long-tail (nearest class mean, accuracy %)\n\n"
        f"Cosine to class means of re-normalised prefixes; {where}; 5 seeded draws, mean shown. "
        "`ncm_Nshot`: N examples per class. `ltN_*`: half the classes (random per draw) get N "
        f"examples, the others {head}; accuracy over all / head / tail queries. FF-m: its first m "
        "features.\n\n" + to_markdown(pct) + "\n"
    )


def write_outputs(
    out_dir: str | os.PathLike,
    records: Sequence[dict[str, Any]],
    summaries: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write ``cascade.json`` (records), ``cascade.md`` and ``cascade.png`` into ``out_dir``."""
    from mrl.io import atomic_write_text
    from mrl.records import save_records

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_records(out / "cascade.json", records)
    match = float(meta.get("match", 0.005))
    title = f"Adaptive classification{' on ' + meta['dataset'] if meta.get('dataset') else ''}"
    plot_curves(summaries, out / "cascade.png", title=title, match=match)
    s0 = summaries[0]
    text = [
        f"# {title}",
        "",
        f"Source: `{meta.get('source')}`; FF runs: {meta.get('ff') or 'none'}. "
        f"Split `{meta.get('split')}` ({s0['n_calib'] + s0['n_test']} samples) divided at random "
        f"per seed into {s0['n_calib']} calibration / {s0['n_test']} test samples "
        f"(calib fraction {meta.get('calib_fraction')}); seeds {meta.get('seeds')}.",
        f"Command: `{meta.get('command')}`. Machine: {meta.get('machine')}; {_versions()}.",
        "",
        meta.get("notes") or "",
        "",
        "## Headline",
        "",
        headline_markdown(summary, match),
        "",
        "Expected dims: mean size of the prefix that answered (also the classifier cost of "
        "MRL-E, whose logits at a prefix extend those of the previous one). Expected head dims: "
        "dims read by the independent-heads MRL model, which evaluates every head it passes.",
        "",
        "![accuracy vs expected dims](cascade.png)",
        "",
        "## Fixed prefixes (test accuracy %, mean ± std over seeds)",
        "",
        _fixed_table(records),
        "",
        f"## Curve (seed {s0['seed']}: thresholds fitted on calibration, measured on test)",
        "",
        curve_table(s0),
        "",
        _fewshot_tables(records),
    ]
    atomic_write_text(out / "cascade.md", "\n".join(text))
    return out
