"""`mrl search INDEX QUERIES --k 10`: top-k with a MatryoshkaIndex (the funnel)."""

from __future__ import annotations

import argparse

from mrl.commands._options import check_minimums

NAME = "search"
HELP = "search a MatryoshkaIndex with query embeddings (.npy or store folder)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="an index folder written by `mrl index build`")
    p.add_argument("queries", help="a .npy file [Q, D] or an EmbeddingStore folder")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--shortlist", type=int, default=None, help="override K")
    p.add_argument("--shortlist-dim", type=int, default=None, help="override D_s")
    p.add_argument(
        "--backend", default=None, choices=("flat", "numpy", "hnsw", "ivf", "ivfpq", "torch")
    )
    p.add_argument("--nprobe", type=int, default=None, help="override IVF cells scanned")
    p.add_argument("--device", default="cpu", help="torch device for --backend torch")


def run(args: argparse.Namespace) -> int:
    import time

    from mrl.devices import check_device
    from mrl.io import atomic_write_json, check_not_an_input, check_output_path
    from mrl.retrieval import MatryoshkaIndex
    from mrl.retrieval.funnel.index import hit_lists
    from mrl.retrieval.loading import load_embeddings

    if args.out:
        check_output_path(args.out, "--out", "file")
        inputs = {"the index": args.index, "the queries": args.queries}
        check_not_an_input(args.out, "--out", inputs)
    check_device(args.device, "--device")
    index = MatryoshkaIndex.load(args.index, device=args.device)
    backend = args.backend or index.config.backend
    if args.nprobe is not None and backend not in ("ivf", "ivfpq"):  # else silently ignored
        raise ValueError(f"--nprobe is for the ivf/ivfpq backends; this search runs {backend}")
    if args.device != "cpu" and backend != "torch":
        raise ValueError(f"--device {args.device} is for --backend torch (this search runs "
                         f"{backend} on the CPU)")
    _check_numbers(args, index)  # named as flags (the index's errors say k, shortlist_dim)
    q, _, _ = load_embeddings(args.queries, "full")
    centered = _queries_centered(args.queries, index)
    overrides = {
        name: v
        for name, v in (
            ("shortlist", args.shortlist),
            ("shortlist_dim", args.shortlist_dim),
            ("backend", args.backend),
            ("nprobe", args.nprobe),
        )
        if v is not None
    }
    t = time.perf_counter()
    res = index.search(q, args.k, centered=centered, **overrides)
    elapsed = time.perf_counter() - t
    hit_ids, hit_scores = hit_lists(res.ids, res.scores, res.indices)  # ragged: IVF may find fewer
    if args.out:  # written before printing: a closed pipe (`| head`) must not lose it
        atomic_write_json(
            args.out,
            {
                "k": args.k,
                "config": res.config.to_dict(),  # what ran (k may have widened the funnel)
                "results": [
                    {"query": j, "ids": hit_ids[j], "scores": hit_scores[j]}
                    for j in range(len(q))
                ],
            },
        )
    print(f"{len(q)} queries, k={args.k}: {elapsed:.3f}s ({len(q) / elapsed:.0f} queries/s)")
    for j in range(min(3, len(q))):
        print(f"query {j}: ids {hit_ids[j]}")
    if args.out:
        print(f"results written to {args.out}")
    return 0


def _queries_centered(queries: str, index) -> bool:
    """Whether the queries are centred already: read from a store created with the index's
    center (a .npy holds raw embeddings, which the index centres itself). A store centred
    otherwise, or normalised where the index centres raw rows, cannot be searched correctly:
    refuse it."""
    import numpy as np

    from mrl.retrieval.loading import store_center, store_normalized

    own = store_center(queries)
    if own is None:
        if index.center is not None and not index.normalize and store_normalized(queries):
            raise ValueError(
                f"the queries store {queries!r} holds L2-normalised rows, but the index centres "
                "rows as they were added (not normalised): pass raw query embeddings (.npy) or "
                "a store created without normalize"
            )
        return False
    if index.normalize:  # the store subtracted its center before normalising; the index after
        raise ValueError(
            f"the queries store {queries!r} subtracts a center before normalising its rows, but "
            "the index normalises rows before its center: pass raw query embeddings (.npy)"
        )
    if own.shape != (index.nesting.dim,):  # before comparing centres (a numpy broadcast error)
        raise ValueError(f"the queries store {queries!r} holds {own.shape[0]}-dim rows; the "
                         f"index holds {index.nesting.dim}-dim rows")
    if index.center is None or not np.allclose(own, index.center, rtol=1e-6, atol=1e-7):
        has = "has no center" if index.center is None else "has another center"
        raise ValueError(
            f"the queries store {queries!r} subtracts a center from its rows, but the index "
            f"{has}: pass raw query embeddings (.npy) or a store created with the index's center"
        )
    return True


def _check_numbers(args, index) -> None:
    """--k, --shortlist, --shortlist-dim and --nprobe against the index, before the queries
    are read; the library's own errors name its parameters (k, shortlist_dim), not the flags."""
    if not 1 <= args.k <= index.count:
        raise ValueError(f"--k must be in [1, {index.count}] (the index's rows), got --k {args.k}")
    check_minimums(args, (("shortlist", 1), ("nprobe", 1)))
    if args.shortlist is not None and args.shortlist < args.k:
        raise ValueError(f"--shortlist must be >= --k ({args.k}), got --shortlist "
                         f"{args.shortlist}")
    if args.shortlist_dim is not None and args.shortlist_dim not in index.nesting:
        raise ValueError(f"--shortlist-dim must be a prefix size of the index "
                         f"{list(index.nesting.sizes)}, got --shortlist-dim {args.shortlist_dim}")
