"""The paper's claims, checked on a reproduction's records (``mrl reproduce``).

Each claim compares means over seeds of two methods at some prefixes and says whether it holds,
with the numbers that decide it, so a reader sees at once what the run established and what not.
Methods are those of ``mrl reproduce``: ``mrl`` / ``ff`` (their own heads for ``top1``), ``plain``
(the full-size model: its prefixes are plain truncation), ``pca`` and ``random`` (coordinates of
the plain model's features); ``probe_top1`` is one linear-probe recipe for every method. A variant
such as ``mrl-w`` (prefix-weighted MRL) is checked beside ``mrl``, never instead of it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["VARIANTS", "Claim", "check_claims", "claims_markdown"]


@dataclass(frozen=True)
class Claim:
    """One statement, whether it holds (None: informational or no data) and its evidence."""

    text: str
    holds: bool | None
    evidence: str


Means = dict[tuple[str, str, int], dict[Any, float]]

#: Percentage points below which two values count as equal: far under a test set's resolution
#: (0.01 for 10k images), above float32 rounding of stored values (a gap of exactly 1.00 read
#: as -1.0000038 failed "within 1 point").
EPS = 1e-4


def _means(records: Iterable[dict[str, Any]]) -> Means:
    """(method, metric, prefix) -> {seed: value}. Records without a finite value or a prefix
    are left out (as the tables leave their cells blank); a seed's repeated records are
    averaged, with a warning (`mrl.records.warn_pooled`)."""
    from mrl.records import table_cells, warn_pooled

    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for (m, metric, p), recs in table_cells(records).items():
        if p is not None:
            cells[(m, metric, int(p))] += recs  # 8 and 8.0 are one prefix
    warn_pooled(cells, "check_claims", stacklevel=4)  # points at check_claims' caller
    means: Means = {}
    for key, recs in cells.items():
        by_seed: dict[Any, list[float]] = defaultdict(list)
        for r in recs:
            by_seed[r.get("seed")].append(float(r["value"]))
        means[key] = {s: sum(v) / len(v) for s, v in by_seed.items()}
    return means


def _pair(means: Means, a: str, b: str, metric: str, p: int) -> tuple[float, float, list] | None:
    """Means of a and b at prefix p over the seeds both have (never one seed set against
    another), and those seeds; None when they share no seed."""
    sa, sb = means.get((a, metric, p), {}), means.get((b, metric, p), {})
    common = sorted(set(sa) & set(sb), key=str)
    if not common:
        return None
    return (sum(sa[s] for s in common) / len(common), sum(sb[s] for s in common) / len(common),
            common)  # fmt: skip


def _compare(
    means: Means, a: str, b: str, metric: str, prefixes: Iterable[int], margin: float
) -> tuple[bool | None, str]:
    """Does mean(a) >= mean(b) - margin hold at every prefix? And the numbers.

    A prefix where one side has no record (or no seed in common) leaves the claim undecided
    (None) unless another prefix already fails it: it is never counted as holding."""
    parts, ok, missing, seed_sets = [], [], [], set()
    for p in prefixes:
        got = _pair(means, a, b, metric, p)
        if got is None:
            missing.append(p)
            continue
        va, vb, common = got
        seed_sets.add(tuple(common))
        ok.append(va >= vb - margin - EPS)
        parts.append(f"{p}: {va:.1f} vs {vb:.1f} ({va - vb:+.1f})")
    if not ok:
        return None, f"no {metric} records of both {a} and {b}"
    text = f"{metric} {a} vs {b} at " + "; ".join(parts)
    if len(seed_sets) == 1 and _seeds(means, a, b, metric) != list(next(iter(seed_sets))):
        text += f" (seeds both have: {list(next(iter(seed_sets)))})"
    elif len(seed_sets) > 1:
        text += f" (seeds both have differ by prefix: {sorted(seed_sets)})"
    if missing:
        text += f"; no records of both at {missing}"
        return (False if not all(ok) else None), text
    return all(ok), text


def _seeds(means: Means, a: str, b: str, metric: str) -> list:
    """Every seed either method has for ``metric``."""
    found = {s for (m, mt, _), by in means.items() if m in (a, b) and mt == metric for s in by}
    return sorted(found, key=str)


def _prefixes(means: Means, method: str, metric: str) -> list[int]:
    return sorted({p for (m, mt, p) in means if m == method and mt == metric})


#: Variants of MRL that ``mrl reproduce`` can add (``--mrl-weights``), checked like ``mrl`` itself.
VARIANTS = {"mrl-w": "MRL-W (MRL with per-prefix loss weights)"}


def check_claims(records: Iterable[dict[str, Any]], task: str,
                 ff_sizes: Iterable[int] | None = None) -> list[Claim]:
    """Claims of the paper (as the vision issue states them) on ``task``'s records.

    The claims are decided for ``mrl`` (the paper's unweighted sum); each variant of `VARIANTS`
    present in the records gets the same decided claims under its own name, plus an informational
    line against ``mrl``. The variant's lines never change the verdicts on ``mrl``.
    ``ff_sizes``: the FF models the recipe trains (FF at the full size is the plain model's own
    head); one without records leaves the FF claim undecided. None: the FF sizes recorded.
    """
    means = _means(records)
    claims = _method_claims(means, "mrl", "MRL", task, ff_sizes)
    pca = _compare(means, "mrl", "pca", "probe_top1", _prefixes(means, "mrl", "top1"), 0.0)[1]
    pca_nn = _compare(means, "mrl", "pca", "1nn", _prefixes(means, "mrl", "top1"), 0.0)[1]
    claims.append(Claim("PCA's standing (informational)", None, f"{pca}. {pca_nn}"))
    present = {m for (m, _, _) in means}
    for method, label in VARIANTS.items():
        if method not in present:
            continue
        claims += _method_claims(means, method, label, task, ff_sizes)
        p = _prefixes(means, method, "top1")
        top1 = _compare(means, method, "mrl", "top1", p, 0.0)[1]
        nn = _compare(means, method, "mrl", "1nn", p, 0.0)[1]
        claims.append(Claim(f"{label} against MRL (informational)", None, f"{top1}. {nn}"))
    return claims


def _method_claims(means: Means, method: str, label: str, task: str,
                   ff_sizes: Iterable[int] | None) -> list[Claim]:
    """The decided claims for one MRL method (``label`` names it in the claim texts)."""
    all_p = _prefixes(means, method, "top1")
    small = [p for p in all_p if p <= 8]
    ff_all = set(_prefixes(means, "ff", "top1"))
    if ff_sizes is not None:  # the recipe's FF models (a crashed one must not go unnoticed)
        ff_all = set(ff_sizes) | ({max(all_p)} if all_p else set())
    ff_large = sorted(p for p in ff_all if p >= 16)
    claims = [
        Claim(f"{label} top-1 at most 1 point below FF-m at every prefix m >= 16 (own heads)",
              *_compare(means, method, "ff", "top1", ff_large, 1.0)),
        Claim(f"{label} features above plain truncation at small prefixes (<= 8, same linear "
              "probe)", *_compare(means, method, "plain", "probe_top1", small, 0.0)),
        Claim(f"{label} features above random coordinates at small prefixes (<= 8, same linear "
              "probe)", *_compare(means, method, "random", "probe_top1", small, 0.0)),
        Claim(f"{label} 1-NN at least the truncated full-size model's at every prefix",
              *_compare(means, method, "plain", "1nn", all_p, 0.0)),
    ]  # fmt: skip
    if task == "fashion-mnist-1k":
        claims += [
            Claim(f"{label} top-1 above FF-8 at prefix 8",
                  *_strict(means, method, "ff", "top1", 8)),
            Claim(f"{label} 1-NN above PCA at prefix 8", *_strict(means, method, "pca", "1nn", 8)),
        ]  # fmt: skip
    return claims


def _strict(means: Means, method: str, other: str, metric: str, p: int) -> tuple[bool | None, str]:
    holds, text = _compare(means, method, other, metric, [p], 0.0)
    got = _pair(means, method, other, metric, p)
    if holds is None or got is None:
        return None, text
    return got[0] > got[1] + EPS, text


def claims_markdown(claims: list[Claim], seeds: list[int]) -> str:
    """A markdown list: holds / does NOT hold / info, the claim, then its numbers."""
    mark = {True: "holds", False: "does NOT hold", None: "info"}
    lines = [f"### Claims (means over {len(seeds)} seed(s): {seeds})", ""]
    lines += [f"- **{mark[c.holds]}**: {c.text}. {c.evidence}" for c in claims]
    return "\n".join(lines)
