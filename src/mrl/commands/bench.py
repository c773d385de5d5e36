"""`mrl bench retrieval`: adaptive retrieval vs exact and HNSW search (one run, table last)."""

from __future__ import annotations

import argparse

from mrl.commands._options import check_minimums

NAME = "bench"
HELP = "benchmarks: `mrl bench retrieval` (funnel vs exact FAISS vs HNSW)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="suite", metavar="SUITE", required=True)
    r = sub.add_parser(
        "retrieval",
        help="adaptive retrieval benchmark",
        description="Exact FAISS flat IP vs HNSW (M=32, full D) vs the "
        "auto-tuned Matryoshka funnel, on MRL-like synthetic data "
        "or your embeddings.",
    )
    r.add_argument("--n", type=int, default=None,
                   help="synthetic database size (default 100000; --embeddings: its rows)")
    r.add_argument("--dim", type=int, default=None,
                   help="synthetic embedding size D (default 2048; --embeddings: its dims)")
    r.add_argument("--queries", type=int, default=None,
                   help="test queries (default 1000; rows held out of --embeddings, or all of "
                   "--query-embeddings)")
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--target-recall", type=float, default=0.99)
    r.add_argument(
        "--hnsw-n",
        type=int,
        default=None,
        help="N for the HNSW comparison (default min(n, 100000); 0 skips it)",
    )
    r.add_argument(
        "--embeddings",
        default=None,
        help="use these database embeddings (.npy or store) instead of synthetic",
    )
    r.add_argument(
        "--query-embeddings",
        default=None,
        help="queries for --embeddings (default: 1000 rows held out from it)",
    )
    r.add_argument(
        "--vector-dtype",
        default="float16",
        choices=("float32", "float16", "int8"),
        help="the funnel's stored full-size vectors (default float16: half of float32's "
        "memory, recall loss ~0)",
    )
    r.add_argument(
        "--max-hnsw",
        type=int,
        default=2,
        help="prefix HNSW graphs the tuner may build (each is a pass over N)",
    )
    r.add_argument(
        "--ef-construction",
        type=int,
        default=80,
        help="build breadth of the prefix HNSW graphs (default 80)",
    )
    r.add_argument(
        "--max-ivf",
        type=int,
        default=3,
        help="prefix IVF indexes the tuner may build (each is k-means + a pass over N)",
    )
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", default=None, help="write the records here")


def _check_finite(x, param: str, block: int = 65536) -> None:
    """The first non-finite row by its row in the file (before rows are held out)."""
    from mrl.retrieval.store import first_nonfinite_row

    bad = first_nonfinite_row(x, block)
    if bad is not None:
        raise ValueError(f"{param}: row {bad} has NaN or inf")


# (option, smallest allowed value); --dim: the reference funnel shortlists at 16 dims
_MINIMUMS = (("n", 1), ("dim", 16), ("queries", 1), ("k", 1), ("hnsw_n", 0), ("max_hnsw", 0),
             ("ef_construction", 1), ("max_ivf", 0), ("seed", 0))


def _fill_sizes(args: argparse.Namespace) -> None:
    """--n / --dim size the synthetic data and --queries the queries drawn: with --embeddings
    (and --query-embeddings) the files say them, and a given value was ignored without a word."""
    given = {"--n": args.n, "--dim": args.dim}
    if args.query_embeddings:
        given["--queries"] = args.queries
    if args.embeddings:
        for flag, value in given.items():
            if value is None:
                continue
            if flag == "--queries":  # it sizes the queries drawn from --embeddings otherwise
                raise ValueError("--queries sets how many queries are drawn; --query-embeddings "
                                 "gives them: drop --queries")
            raise ValueError(f"{flag} sizes the synthetic data; with --embeddings the file gives "
                             f"it: drop {flag}")
    args.n = 100_000 if args.n is None else args.n
    args.dim = 2048 if args.dim is None else args.dim
    args.queries = 1000 if args.queries is None else args.queries


def check_options(args: argparse.Namespace) -> None:
    """Refuse bad options naming them, before any data is loaded or generated."""
    from mrl.retrieval.bench import min_rows

    _fill_sizes(args)
    check_minimums(args, _MINIMUMS)
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        raise ValueError(f"--target-recall must be in (0, 1], got --target-recall "
                         f"{args.target_recall}")
    if args.query_embeddings and not args.embeddings:
        # without --embeddings the synthetic benchmark ran and the queries were ignored
        raise ValueError("--query-embeddings needs --embeddings (the database the queries "
                         "search)")
    need = min_rows(args.k)
    if not args.embeddings and args.n < need:
        raise ValueError(f"--n must be >= {need} with --k {args.k} (the database must hold "
                         f"more than k rows, and at least 16), got --n {args.n}")
    if args.hnsw_n and args.hnsw_n < need:  # else it failed after the main part had run
        raise ValueError(f"--hnsw-n must be 0 (skip) or >= {need} with --k {args.k}, got "
                         f"--hnsw-n {args.hnsw_n}")


def check_rows(db, args: argparse.Namespace, held_out: bool) -> None:
    """Enough rows and dims in --embeddings (else a vague 'k must be < n (0)' or a failure deep
    in the tuner). With ``held_out``, --queries rows leave the database as the queries."""
    from mrl.retrieval.bench import min_rows

    rows, dims = db.shape
    base = min_rows(args.k)
    need = base + (args.queries if held_out else 0)
    if rows < need:
        held = f"--queries {args.queries} held out as queries plus " if held_out else ""
        raise ValueError(f"--embeddings {args.embeddings!r} has {rows} rows; the benchmark needs "
                         f"at least {need}: {held}a database of at least {base} rows (more than "
                         f"--k {args.k}, and at least 16)")
    if dims < 16:  # the reference funnel shortlists at 16 dims
        raise ValueError(f"--embeddings {args.embeddings!r} has {dims} dims; the benchmark "
                         "needs at least 16")


def _check_same_center(args: argparse.Namespace) -> None:
    """Raw queries against a centred store's rows (or the reverse) mix two spaces: refused.
    Held-out rows of the store itself are in its space."""
    import numpy as np

    from mrl.retrieval.loading import store_center

    if not args.query_embeddings:
        return
    c_db, c_q = store_center(args.embeddings), store_center(args.query_embeddings)
    same = (c_db is None and c_q is None) or (
        c_db is not None and c_q is not None and np.array_equal(c_db, c_q))
    if not same:
        raise ValueError(
            f"--embeddings {args.embeddings!r} and --query-embeddings {args.query_embeddings!r} "
            "are not centred alike (a store records its center): give both from stores of one "
            "center, both uncentred, or leave out --query-embeddings (rows are held out)"
        )


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from mrl.records import save_records
    from mrl.retrieval.bench import bench_retrieval, environment, format_table

    check_options(args)
    if args.json:
        from mrl.io import check_output_path

        check_output_path(args.json, "--json", "file")
    data, dataset, nesting = None, "mrl-like", None
    if args.embeddings:
        from mrl.retrieval.loading import load_embeddings

        _check_same_center(args)
        # the model's prefixes (a store's, a sidecar's, else doubling from 8), not always 8, 16..
        db, nesting, _ = load_embeddings(args.embeddings)
        check_rows(db, args, held_out=not args.query_embeddings)
        _check_finite(db, "--embeddings")  # row numbers of the file, before rows are held out
        if args.query_embeddings:
            q, _, _ = load_embeddings(args.query_embeddings, "full")
            if q.shape[1] != db.shape[1]:
                raise ValueError(
                    f"--query-embeddings have {q.shape[1]} dims but --embeddings have "
                    f"{db.shape[1]}; both must come from the same model"
                )
            _check_finite(q, "--query-embeddings")
        else:  # hold out rows: they leave the database, so no query finds itself
            rows = np.random.default_rng(args.seed).permutation(len(db))
            q, db = db[rows[: args.queries]], db[np.sort(rows[args.queries :])]
        data, dataset = (db, q), str(args.embeddings)
    records = bench_retrieval(
        args.n,
        args.dim,
        args.queries,
        k=args.k,
        target_recall=args.target_recall,
        hnsw_n=args.hnsw_n,
        seed=args.seed,
        data=data,
        dataset=dataset,
        vector_dtype=args.vector_dtype,
        max_hnsw=args.max_hnsw,
        max_ivf=args.max_ivf,
        ef_construction=args.ef_construction,
        nesting=nesting,
    )
    env = environment()
    for r in records:
        r.update(env)
    print(
        f"\nmachine: {env['machine']}, {env['cpus']} CPUs; numpy {env['numpy']}, "
        f"faiss {env['faiss']}, torch {env['torch']}"
    )
    print(format_table(records))
    if args.json:
        save_records(args.json, records)
        print(f"records written to {args.json}")
    return 0
