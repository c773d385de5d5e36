"""Scoring at every prefix in one pass vs scoring once at full size vs the per-prefix loop.

    .venv/bin/python benchmarks/bench_scores.py [--quick] [--json PATH]

Top-k cosine search of Q queries over N items (float32) at all G prefixes of a doubling nesting:

- ``full``: one full-size matrix product + top-k (inputs pre-normalised, untimed): the cost of
  answering at one size only, the baseline the goal is measured against;
- ``all-prefix``: `mrl.similarity.prefix_topk` (one pass over D, tiled, re-normalising each prefix;
  input checks included);
- ``loop``: for each prefix, truncate, re-normalise, one matrix product + top-k.

Before timing, the three are checked against a top-k computed by the check itself, on the timed
items and the first ``--check-queries`` queries: at every prefix the all-prefix scores equal the
reference's, and every returned item (all-prefix and the timed loop at each prefix, ``full`` at D)
scores what the reference's k best score (equal up to float ties); a mismatch stops the run.

Repeats are interleaved (full, all-prefix, loop, full, ...) so machine noise hits all three alike;
medians are reported. Ratios are relative to ``full`` measured in the same run. Table last.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from mrl import Nesting
from mrl.similarity import prefix_topk


def full_once(q: torch.Tensor, x_unit: torch.Tensor, k: int) -> torch.Tensor:
    # q [Q, D] and x_unit [N, D] already unit norm: one [Q, N] product, one top-k
    return (q @ x_unit.T).topk(k, dim=1).indices


def loop(q: torch.Tensor, x: torch.Tensor, nesting: Nesting, k: int,
         metric: str = "cosine") -> list[torch.Tensor]:
    """G top-k index tensors [Q, k], one per prefix (the method timed as ``loop``)."""
    out = []
    for m in nesting.sizes:  # G products of growing width: ~sum(m)/D full-size costs
        qm, xm = q[:, :m], x[:, :m]
        if metric == "cosine":
            qm, xm = F.normalize(qm, dim=1), F.normalize(xm, dim=1)
        out.append((qm @ xm.T).topk(k, dim=1).indices)
    return out


def _scores(qm: torch.Tensor, xm: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Scores [q, k] of the items [q, k] picked for queries qm [q, m] among xm [N, m]."""
    return (qm[:, None] * xm[items]).sum(-1)


def check_agreement(q: torch.Tensor, x: torch.Tensor, nesting: Nesting, k: int, metric: str,
                    tile_size: int, full_idx: torch.Tensor, rtol: float = 1e-4,
                    atol: float = 1e-5) -> None:
    """The three timed methods against a reference top-k computed here, on queries ``q`` (a subset
    of the timed ones) and the timed items ``x``: prefix_topk's scores and items, the timed
    ``loop``'s items at every prefix, ``full_idx`` (the full-size baseline's top-k for ``q``) at
    D. Compares scores, not indices, so that items tied in float32 may come in either order."""
    vals, idx = prefix_topk(q, x, nesting, k, metric=metric, tile_size=tile_size)
    loop_idx = loop(q, x, nesting, k, metric)
    for g, m in enumerate(nesting.sizes):
        qm, xm = q[:, :m], x[:, :m]
        if metric == "cosine":
            qm, xm = F.normalize(qm, dim=1), F.normalize(xm, dim=1)
        ref = (qm @ xm.T).topk(k, dim=1).values  # the reference top-k scores [q, k]
        picks = [("all-prefix", vals[g]), ("all-prefix items", _scores(qm, xm, idx[g])),
                 ("loop items", _scores(qm, xm, loop_idx[g]))]
        if m == nesting.dim:
            picks.append(("full items", _scores(qm, xm, full_idx)))
        for what, got in picks:
            try:
                torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
            except AssertionError as err:
                raise AssertionError(f"prefix {m}: {what} disagree with the reference top-k: "
                                     f"{err}") from None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds), for smoke runs")
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--items", type=int, default=None)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--tile-size", type=int, default=4096)
    ap.add_argument("--metric", default="cosine", choices=["cosine", "dot"])
    ap.add_argument("--json", default=None, help="also write the results as records to PATH")
    ap.add_argument("--check-queries", type=int, default=64,
                    help="queries on which the three methods are checked to agree before timing "
                         "(default 64; 0 skips the check)")
    args = ap.parse_args(argv)
    Q = args.queries if args.queries is not None else (200 if args.quick else 1000)
    N = args.items if args.items is not None else (10_000 if args.quick else 100_000)
    reps = args.repeats if args.repeats is not None else 3
    for flag, value, low in (("--queries", Q, 1), ("--items", N, 1), ("--repeats", reps, 1),
                             ("--k", args.k, 1), ("--tile-size", args.tile_size, 1),
                             ("--check-queries", args.check_queries, 0), ("--dim", args.dim, 8)):
        if value < low:  # --repeats 0 became the default; --k 0 a torch error
            ap.error(f"{flag} must be >= {low}, got {flag} {value}")
    if args.k > N:
        ap.error(f"--k must be <= --items ({N}), got --k {args.k}")
    D, k = args.dim, args.k
    nesting = Nesting.doubling(8, D)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(Q, D, generator=g)
    x = torch.relu(torch.randn(N, D, generator=g))  # post-ReLU-like features
    q_unit, x_unit = F.normalize(q, dim=1), F.normalize(x, dim=1)
    if args.metric == "dot":
        q_unit, x_unit = q, x

    def all_prefix() -> None:
        prefix_topk(q, x, nesting, k, metric=args.metric, tile_size=args.tile_size)

    def loop_run() -> None:
        loop(q, x, nesting, k, args.metric)

    c = min(args.check_queries, Q)
    if c > 0:  # before any timing: the timed methods return the same top-k
        check_agreement(q[:c], x, nesting, k, args.metric, args.tile_size,
                        full_once(q_unit[:c], x_unit, k))
        print(f"agreement on {c} of the {Q} queries (all {len(nesting)} prefixes, full at D): ok",
              flush=True)

    runs = {
        "full": lambda: full_once(q_unit, x_unit, k),
        "all-prefix": all_prefix,
        "loop": loop_run,
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(f"repeat {r + 1}/{reps} {name:>10}: {times[name][-1]:.3f} s", flush=True)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    sum_m = sum(nesting.sizes) / D
    env = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "Q": Q,
        "N": N,
        "D": D,
        "G": len(nesting),
        "k": k,
        "repeats": reps,
        "similarity": args.metric,
        "tile_size": args.tile_size,
        "dtype": "float32",
    }
    goal = 1.3
    ratio = med["all-prefix"] / med["full"]
    print(f"\nsum(m)/D = {sum_m:.2f} (the per-prefix loop's theoretical cost ratio)")
    verdict = "met" if ratio <= goal else "MISSED"
    print(f"goal: all-prefix <= {goal}x full -> {verdict} ({ratio:.2f}x)")
    print(
        f"\nQ={Q} N={N} D={D} G={len(nesting)} top-{k} {args.metric} float32, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {reps}"
    )
    print("| method | median s | x full |")
    print("|---|---|---|")
    for name in runs:
        print(f"| {name} | {med[name]:.3f} | {med[name] / med['full']:.2f} |")
    result = {
        "env": env,
        "median_s": med,
        "times_s": times,
        "ratio_all_prefix": ratio,
        "ratio_loop": med["loop"] / med["full"],
    }
    if args.json:
        from mrl.records import make_record, save_records

        recs = [
            make_record(
                name, None, "seconds", med[name], ratio_to_full=med[name] / med["full"], **env
            )
            for name in runs
        ]
        save_records(args.json, recs)
    return result


if __name__ == "__main__":
    main()
