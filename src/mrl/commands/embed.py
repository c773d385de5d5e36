"""`mrl embed`: embed a large corpus into an EmbeddingStore in resumable shards (multi-process)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mrl.commands._options import check_minimums
from mrl.commands.serve import add_threads_argument, set_threads

NAME = "embed"
HELP = "embed a corpus (.txt/.jsonl) into an embedding store, in resumable shards"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="sentence-transformers folder, 'default' (all-MiniLM-L6-v2) or "
        "'hash:DIM' (a fake, for trying the pipeline)",
    )
    p.add_argument(
        "--nesting",
        default=None,
        help="nesting recorded in the store (default: the model's, else its full size)",
    )
    p.add_argument("--input", required=False, help="corpus: .txt (one text per line) or .jsonl")
    p.add_argument("--out", required=True, help="the EmbeddingStore folder to write")
    p.add_argument("--shard-size", type=int, default=10_000, help="texts per shard")
    p.add_argument("--batch-size", type=int, default=64, help="texts per encoder call")
    p.add_argument(
        "--field",
        default="text",
        help=".jsonl: the text field, or fields joined by '+' (title+text: a BEIR corpus's "
        "documents as `mrl eval` encodes them)",
    )
    p.add_argument("--id-field", default="id", help=".jsonl: the id field (else row numbers)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "int8"],
        default=None,
        help="on-disk type of the merged store (default float32; a resumed merge keeps its own)",
    )
    p.add_argument(
        "--no-merge", action="store_true", help="only write shards (merge later with --merge-only)"
    )
    p.add_argument("--merge-only", action="store_true", help="merge finished shards and stop")
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=24 * 3600.0,
        help="rank 0: how long to wait for the other ranks' shards before merging (s)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_argument(p)


def _check_flags(args: argparse.Namespace) -> None:
    """Options that would be ignored are refused (a user who set them expects an effect)."""
    if args.merge_only and args.no_merge:
        raise ValueError("--merge-only and --no-merge contradict each other; give one")
    if not args.wait_timeout > 0:  # NaN too
        raise ValueError(f"--wait-timeout must be positive (seconds), got {args.wait_timeout}")
    # it failed only after the model had loaded, naming shard_size
    check_minimums(args, (("shard_size", 1), ("batch_size", 1)))
    if args.no_merge and args.dtype is not None:  # the merge-only step chose float32 itself
        raise ValueError("--dtype is the merged store's: give it to the step that merges "
                         "(--merge-only), not with --no-merge")
    if args.merge_only:  # the merge reads the finished shards only
        encoding = (("--input", args.input, None), ("--model", args.model, "default"),
                    ("--nesting", args.nesting, None), ("--shard-size", args.shard_size, 10_000),
                    ("--batch-size", args.batch_size, 64), ("--field", args.field, "text"),
                    ("--id-field", args.id_field, "id"))
        given = [flag for flag, value, default in encoding if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} would be ignored with --merge-only (it merges "
                             "the shards already written, as their manifest records them)")
    txt = bool(args.input) and Path(args.input).suffix.lower() == ".txt"
    for flag, value, default in (("--field", args.field, "text"),
                                 ("--id-field", args.id_field, "id")):  # fmt: skip
        if txt and value != default:
            raise ValueError(f"{flag} {value!r} applies to .jsonl input; {args.input!r} is .txt "
                             "(one text per line, ids are row numbers)")


def run(args: argparse.Namespace) -> int:
    from mrl.embed import embed_corpus, merge_shards
    from mrl.retrieval.store import check_new_store_path

    # a file, a path below one, or a non-store folder (a model, results) is refused up front
    check_new_store_path(args.out, "--out")

    _check_flags(args)
    if args.merge_only:
        store = merge_shards(args.out, dtype=args.dtype)
        print(f"merged {store.count} rows into {args.out}")
        return 0
    if not args.input:
        raise ValueError("--input is required (unless --merge-only)")
    from mrl.embed import _rank_from_env, already_merged, check_inputs
    from mrl.serve.encoders import load_encoder

    rank = _rank_from_env()[0]  # RANK / WORLD_SIZE checked before anything
    if rank != 0 and already_merged(Path(args.out)):  # a resumed job rank 0 had finished
        print(f"rank {rank}: {args.out} is already merged; nothing to do")
        return 0
    # every line and id before the model loads (a typo must not cost a model load)
    rows = check_inputs(Path(args.input), Path(args.out), args.field, args.id_field,
                        rank, field_param="--field")  # fmt: skip

    if args.threads is not None:
        set_threads(args.threads)

    encoder = load_encoder(args.model, args.nesting)
    report = embed_corpus(
        encoder,
        args.input,
        args.out,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        field=args.field,
        id_field=args.id_field,
        merge=not args.no_merge,
        dtype=args.dtype,
        wait_timeout_s=args.wait_timeout,
        rows=rows,
        show_progress=not args.quiet,
    )
    if report.already:
        print(f"rank {rank}: {args.out} was merged meanwhile; nothing to do")
        return 0
    print(
        f"{report.rows} texts in {report.shards} shards: encoded {len(report.encoded)}, "
        f"skipped {len(report.skipped)} already done, {report.seconds:.1f} s"
        + (f"; merged into {args.out}" if report.merged else "")
    )
    return 0
