"""`mrl index build`: build a MatryoshkaIndex (shortlist prefix + rerank funnel) from embeddings."""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from mrl.commands._options import check_minimums

if TYPE_CHECKING:
    import numpy as np

NAME = "index"
HELP = "build an adaptive-retrieval MatryoshkaIndex from embeddings (.npy or store folder)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build an index", description=HELP)
    b.add_argument("embeddings", help="a .npy file [N, D] or an EmbeddingStore folder")
    b.add_argument("--out", required=True, help="the index folder to write")
    b.add_argument(
        "--nesting",
        default=None,
        help="prefix sizes, e.g. 'doubling:8' or '8,16,32' (default: from the store "
        "or a <file>.json sidecar, else doubling:8)",
    )
    how = b.add_mutually_exclusive_group()
    how.add_argument(
        "--shortlist-dim",
        type=int,
        default=None,
        help="D_s: the shortlist prefix in dims (default 16 or the smallest size)",
    )
    how.add_argument(
        "--target-recall",
        type=float,
        default=None,
        help="auto-tune: the cheapest configuration with this recall@k vs exact",
    )
    b.add_argument("--shortlist", type=int, default=None,
                   help="K: shortlist size (default 200; chosen by the tuner with --target-recall)")
    b.add_argument(
        "--backend",
        default=None,
        choices=("flat", "numpy", "hnsw", "ivf", "ivfpq", "torch"),
        help="shortlist scan (default flat = FAISS exact on the prefix; ivf = FAISS inverted "
        "file on the prefix; ivfpq = the same with 4-bit PQ fast-scan codes, approximate: use a "
        "larger --shortlist and --funnel, whose first stage re-scores exactly at the prefix; "
        "with --target-recall, flat/hnsw/ivf/ivfpq are all tried unless --backend names one)",
    )
    b.add_argument(
        "--nlist",
        type=int,
        default=None,
        help="IVF cells (default round(4 * sqrt(N)))",
    )
    b.add_argument("--nprobe", type=int, default=None,
                   help="IVF cells scanned per query (default 16)")
    b.add_argument(
        "--funnel",
        action="store_true",
        help="rerank in stages (halve K, double the prefix) instead of once at D",
    )
    b.add_argument(
        "--center",
        action="store_true",
        help="subtract the mean of the rows from rows and queries (saved with the index; "
        "queries are centred at search time). A store created with a center brings its own",
    )
    b.add_argument("--k", type=int, default=None,
                   help="k of the tuning's recall@k, or the --funnel's last keep (default 10)")
    b.add_argument(
        "--tune-queries",
        type=int,
        default=None,
        help="with --target-recall: held-out database rows used as tuning queries (default 200)",
    )
    b.add_argument(
        "--max-memory",
        type=parse_bytes,
        default=None,
        help="with --target-recall: a memory budget for the index (e.g. 2G, 500M, 123456 bytes); "
        "the fastest configuration within it is chosen",
    )
    b.add_argument(
        "--vector-dtype",
        default="float32",
        choices=("float32", "float16", "int8"),
        help="rerank vectors (float16: half the memory, dot-product error ~1e-5; int8: a "
        "quarter, one scale per column)",
    )


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """'2G', '500M', '64K' (binary units, optional trailing 'B' or 'iB') or a plain byte count."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):  # inf (or 1e400) was an OverflowError traceback
        raise argparse.ArgumentTypeError(
            f"--max-memory must be a positive size such as 2G, 500M or 123456, got {text!r}"
        )
    return int(value * _UNITS[unit])


def _check_options(args: argparse.Namespace) -> None:
    """Options that would be silently ignored or fail late are errors up front."""
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        raise ValueError(f"--target-recall must be in (0, 1], got --target-recall "
                         f"{args.target_recall}")
    if args.target_recall is None:  # set but unused, silently, before
        if args.tune_queries is not None:
            raise ValueError("--tune-queries is for --target-recall (the tuner's queries)")
        if args.k is not None and not args.funnel:
            raise ValueError("--k sizes the tuning (--target-recall) or the last keep of "
                             "--funnel; without either it is not used")
    args.k = 10 if args.k is None else args.k
    args.tune_queries = 200 if args.tune_queries is None else args.tune_queries
    # --k sizes the funnel's last keep: "stages[1] keep must be >= 1" named no flag
    check_minimums(args, (("k", 1), ("tune_queries", 1)))
    if args.funnel and args.shortlist is not None and args.shortlist < args.k:
        # the stages' keeps came out below k: saved, then silently widened by every search
        raise ValueError(f"--shortlist must be >= --k ({args.k}) with --funnel, got --shortlist "
                         f"{args.shortlist}")
    if args.max_memory is not None and args.target_recall is None:
        raise ValueError("--max-memory needs --target-recall (it bounds the tuner's choice)")
    if args.target_recall is not None:
        chosen = {"shortlist": args.shortlist is not None, "nprobe": args.nprobe is not None,
                  "funnel": args.funnel}
        for name, given in chosen.items():
            if given:
                raise ValueError(f"--{name} is chosen by the tuner with --target-recall: drop "
                                 f"--{name}, or drop --target-recall to set it yourself")
    backend = args.backend or ("flat" if args.target_recall is None else None)
    if backend not in (None, "ivf", "ivfpq"):
        for name in ("nlist", "nprobe"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name} is for --backend ivf or ivfpq, got --backend "
                                 f"{backend}")


def run(args: argparse.Namespace) -> int:
    from mrl.retrieval import MatryoshkaIndex
    from mrl.retrieval.funnel.index import check_index_path
    from mrl.retrieval.loading import load_embeddings, store_normalized

    check_index_path(args.out, "--out")  # before loading and tuning, not after
    _check_options(args)
    x, nesting, ids = load_embeddings(args.embeddings, args.nesting)
    center, centered = _center(args, x)
    cfg = _search_config(args, nesting)
    backend = cfg.backend
    if args.target_recall is not None and not 1 <= args.k < len(x):  # before building anything
        raise ValueError(f"--k {args.k} (recall@k of the tuning; default 10) must be in [1, "
                         f"{len(x)}): {args.embeddings!r} has {len(x)} rows")
    if args.target_recall is not None and args.tune_queries > len(x):
        warnings.warn(f"--tune-queries {args.tune_queries} is more than the {len(x)} rows; "
                      f"tuning with all {len(x)}", stacklevel=2)
    t0 = time.perf_counter()
    # unit rows centred on their mean: raw queries must be made unit vectors before the center
    # is subtracted (else they lie in another space: recall@10 0.24 at a whole-database
    # shortlist); a store's own center was subtracted before it normalised, so not there
    normalize = center is not None and not centered and store_normalized(args.embeddings)
    index = MatryoshkaIndex(nesting, cfg, vector_dtype=args.vector_dtype, center=center,
                            normalize=normalize)  # fmt: skip
    index.add(x, ids=ids, centered=centered)
    if args.target_recall is not None:
        from mrl.retrieval.tune import tune

        backends = ("flat", "hnsw", "ivf", "ivfpq") if args.backend is None else (backend,)
        res = tune(
            index,
            args.target_recall,
            k=args.k,
            n_queries=args.tune_queries,
            backends=backends,
            max_memory=args.max_memory,
            # quantised rerank vectors: measure recall against the float32 originals, so the
            # quantisation error counts (else int8 reported 0.996 where the truth was 0.979)
            reference=None if args.vector_dtype == "float32" else x,
            centered=centered,  # a centred store's rows
            log=print,
        )
        c = res.config
        print(
            f"tuned: backend={c.backend} D_s={c.shortlist_dim} K={c.shortlist} "
            f"ef={c.ef_search} nprobe={c.nprobe} "
            f"stages={list(c.stages) or 'rerank at D'}: recall@{args.k} "
            f"{res.recall:.4f}, {res.qps:.0f} queries/s on {min(args.tune_queries, index.count)} "
            "held-out rows"
        )
    index.build()
    build_s = time.perf_counter() - t0  # add + (tuning) + the chosen structure
    index.save(args.out)
    tuning = " (tuning included)" if args.target_recall is not None else ""
    print(
        f"index: {index.count} vectors of {nesting.dim} dims, nesting {list(nesting.sizes)}"
        f"{_nesting_source(args)}, built in {build_s:.2f}s{tuning}, saved to {args.out}"
    )
    return 0


def _search_config(args: argparse.Namespace, nesting):
    """The index's saved `SearchConfig` from the options (the tuner may replace it)."""
    from mrl.retrieval import SearchConfig, funnel_stages

    shortlist = 200 if args.shortlist is None else args.shortlist
    backend = "flat" if args.backend is None else args.backend
    ds = args.shortlist_dim
    if ds is None:
        ds = 16 if 16 in nesting else nesting.sizes[0]
    if ds not in nesting:
        raise ValueError(
            f"--shortlist-dim must be a prefix size in the nesting {list(nesting.sizes)}, got {ds}"
        )
    stages = funnel_stages(ds, shortlist, nesting.dim, args.k, nesting) if args.funnel else ()
    if args.funnel and backend == "ivfpq":  # approximate codes: re-score exactly at D_s
        keep = max(args.k, shortlist // 2)
        stages = ((ds, keep), *funnel_stages(ds, keep, nesting.dim, args.k, nesting))
    return SearchConfig(
        shortlist_dim=ds,
        shortlist=shortlist,
        backend=backend,
        stages=stages,
        nlist=args.nlist,
        nprobe=16 if args.nprobe is None else args.nprobe,
    )


def _center(args: argparse.Namespace, x: np.ndarray) -> tuple[np.ndarray | None, bool]:
    """(the index's center [D] or None, whether the rows ``x`` have it subtracted already).

    A store created with a center holds rows minus it: the index takes that center, so that raw
    queries are centred at search time (without it they were searched un-centred: recall@10
    0.75 at a whole-database shortlist). ``--center`` centres a .npy's rows on their mean."""
    import numpy as np

    from mrl.retrieval.loading import store_center

    own = store_center(args.embeddings)
    if own is not None and args.center:
        raise ValueError(f"--center: the store {args.embeddings!r} is centred already (its "
                         "store.json records a center, which the index takes); drop --center")
    if own is not None:
        return own, True
    if args.center:
        return x.mean(axis=0, dtype=np.float64).astype(np.float32), False
    return None, False


def _nesting_source(args: argparse.Namespace) -> str:
    """Where the nesting came from, when it is a guess (a .npy without a sidecar): a prefix the
    model has but the guess lacks would otherwise surface only at search time."""
    import json

    src = Path(args.embeddings)
    if args.nesting is not None or src.suffix != ".npy":
        return ""
    side = src.with_suffix(".json")
    try:  # (a damaged sidecar was refused when the embeddings were read)
        named = side.is_file() and json.loads(side.read_text()).get("nesting") is not None
    except (OSError, ValueError, AttributeError):
        named = False
    return "" if named else f" (a default: {side.name} does not name one; pass --nesting to choose)"
