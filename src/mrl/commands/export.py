"""`mrl export qdrant`: write an index or embedding store into a Qdrant collection (resumable)."""

from __future__ import annotations

import argparse
import hashlib

from mrl.commands._options import check_minimums

NAME = "export"
HELP = "export embeddings to a Qdrant collection (named prefix vectors, resumable batches)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=["qdrant"], help="where to export (only 'qdrant' for now)")
    p.add_argument("index", help="a MatryoshkaIndex folder or an EmbeddingStore folder")
    p.add_argument("--collection", required=True, help="collection name")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--url", help="Qdrant server or cluster node, e.g. http://localhost:6333 (or ':memory:')"
    )
    where.add_argument("--path", help="local folder for an in-process Qdrant Edge collection")
    p.add_argument(
        "--prefixes",
        default=None,
        help="prefix sizes stored as named vectors, e.g. '16,64,2048' (default: the "
        "smallest nesting size >= 16 and the full size)",
    )
    p.add_argument(
        "--indexed",
        default=None,
        help="prefixes that get an HNSW graph (default: the smallest; rescoring vectors need none)",
    )
    p.add_argument(
        "--distance",
        choices=["cosine", "dot"],
        default=None,
        help="the collection's distance (default: an index's own metric; cosine for a store)",
    )
    p.add_argument("--batch-size", type=int, default=1024, help="points per upsert")
    p.add_argument("--retries", type=int, default=5, help="retries per batch (exponential backoff)")
    p.add_argument(
        "--commit-every",
        type=int,
        default=8,
        help="batches between durable commits (Edge flush) and progress-marker updates",
    )
    p.add_argument(
        "--progress",
        default=None,
        help="progress marker file (default: PATH/COLLECTION.progress.json with "
        "--path, INDEX.qdrant-COLLECTION.json beside the index with --url)",
    )
    p.add_argument("--shards", type=int, default=None, help="cluster: shard_number")
    p.add_argument("--replication", type=int, default=None, help="cluster: replication_factor")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def default_prefixes(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The paper's default funnel ends: a 16-d (or the smallest >= 16) shortlist and the full D."""
    small = next((m for m in sizes if m >= 16), sizes[-1])
    return (small, sizes[-1]) if small != sizes[-1] else (sizes[-1],)


# (option, smallest allowed value): checked before anything opens or creates a collection
_MINIMUMS = (("batch_size", 1), ("retries", 0), ("commit_every", 1), ("shards", 1),
             ("replication", 1))


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse an out-of-range number naming the option (e.g. ``--retries -1`` failed only once a
    batch had to be sent, after the collection had been created)."""
    check_minimums(args, _MINIMUMS)
    if args.path and (args.shards is not None or args.replication is not None):
        # a local Edge collection is one shard on one machine: the options would be ignored
        raise ValueError("--shards and --replication apply to a cluster (--url), not to --path")


def check_progress(progress: str) -> None:
    """The marker file can be written, and holds a marker if it exists (a folder, or a file of
    something else, failed at the first commit, after the collection had been set up)."""
    from mrl.io import check_output_path
    from mrl.qdrant import check_progress_file

    check_output_path(progress, "--progress", "file")
    check_progress_file(progress, "--progress")


def _sizes(spec: str, option: str, dim: int) -> tuple[int, ...]:
    """Prefix sizes from ``8,64`` (any subset), ``doubling:8`` or ``full`` (of ``dim``); an error
    names the option (it named none, and "full" asked for a dim known here)."""
    from mrl import Nesting

    text = spec.strip()
    whole = text == "full" or text.startswith("doubling:")  # specs that end at D
    try:
        return Nesting.parse(text, dim=dim if whole else None).sizes
    except ValueError as exc:
        raise ValueError(f"{option} {spec!r}: {exc}") from None


def _distance(rows, distance: str | None) -> str:
    """The collection's distance: an index's own metric unless given (a dot index exported as
    cosine ranked other neighbours than the index, without a word); a store has no metric."""
    metric = getattr(rows, "metric", None)
    if distance is None:
        return metric or "cosine"
    if metric is not None and distance != metric:
        raise ValueError(f"--distance {distance} differs from the index's metric {metric!r}: "
                         "Qdrant would rank other neighbours than the index; drop --distance")
    return distance


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mrl.qdrant import (
        QdrantLayout,
        export_qdrant,
        open_rows,
        open_target,
        refuse_centred,
        target_location,
    )

    check_numbers(args)
    rows = open_rows(args.index)
    refuse_centred(rows, args.index)  # before any collection is set up
    sizes = rows.nesting.sizes
    if args.prefixes:
        prefixes = _sizes(args.prefixes, "--prefixes", rows.nesting.dim)
        bad = [m for m in prefixes if m not in sizes]
        if bad:
            raise ValueError(f"--prefixes {list(bad)} are not in the index's nesting {list(sizes)}")
    else:
        prefixes = default_prefixes(sizes)
    indexed = None if args.indexed is None else _sizes(args.indexed, "--indexed", sizes[-1])
    layout = QdrantLayout(prefixes, _distance(rows, args.distance), indexed)
    if args.path:
        from mrl.io import check_output_path

        check_output_path(args.path, "--path", "dir")  # a file there failed after the set-up
        progress = args.progress or str(Path(args.path) / f"{args.collection}.progress.json")
        check_progress(progress)
        target = open_target(args.collection, path=args.path)
    else:
        # one marker per server: another server's marker skipped every row there
        server = hashlib.blake2b(target_location(args.url).encode(), digest_size=4).hexdigest()
        progress = args.progress or (
            f"{str(args.index).rstrip('/')}.qdrant-{args.collection}-{server}.json"
        )
        check_progress(progress)
        target = open_target(
            args.collection,
            url=args.url,
            shard_number=args.shards,
            replication_factor=args.replication,
        )
    try:
        report = export_qdrant(
            rows,
            target,
            layout,
            progress,
            collection=args.collection,
            batch_size=args.batch_size,
            retries=args.retries,
            commit_every=args.commit_every,
            show_progress=not args.quiet,
        )
        count = target.count()
    finally:
        target.close()
    print(
        f"exported {report.total} points to collection {args.collection!r} "
        f"(vectors {[layout.name(m) for m in prefixes]}): {report.written} written this run "
        f"from row {report.resumed_from}, {report.batches} batches, {report.retries} retries, "
        f"{report.seconds:.1f} s; collection holds {count} points"
    )
    if count < report.total:
        raise ValueError(
            f"collection holds {count} points, expected {report.total}; run the export again"
        )
    if count > report.total:  # points of an earlier, larger export: a rerun cannot remove them
        raise ValueError(
            f"collection {args.collection!r} holds {count} points, expected {report.total}: "
            "it keeps points of an earlier, larger export; export into a new --collection or "
            "delete this one first"
        )
    return 0
