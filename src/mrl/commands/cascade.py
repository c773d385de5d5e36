"""`mrl cascade fit|eval`: adaptive classification over the prefixes of a trained model.

SOURCE is a trained run folder (its test-set logits are computed once and cached) or a logits
``.npz`` file (`mrl.cascade.runs`). The split's samples are divided at random (``--seed``) into a
calibration part, where thresholds are tuned, and a held-out part, where results are measured.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mrl.io import check_output_dir_of, check_output_path
from mrl.params import is_int

if TYPE_CHECKING:
    import numpy as np

    from mrl import Nesting
    from mrl.cascade.runs import LogitsSet

NAME = "cascade"
HELP = "adaptive classification: fit confidence thresholds between prefixes, evaluate them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _fit_arguments(
        sub.add_parser("fit", help="tune thresholds on a calibration split; write a cascade file")
    )
    _eval_arguments(sub.add_parser(
        "eval",
        help="accuracy vs expected dims, beside FF models; or evaluate a fitted cascade file",
    ))  # fmt: skip


def _fit_arguments(fit: argparse.ArgumentParser) -> None:
    fit.add_argument("source", help="run folder or logits .npz")
    mode = fit.add_mutually_exclusive_group()
    mode.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="accuracy fraction below the full-size prefix, in [-1, 1) (0.005 = 0.5 points; "
        "negative: above it; the default mode, with 0.005)",
    )
    mode.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="absolute calibration accuracy to keep, in [0, 1]",
    )
    mode.add_argument(
        "--budget",
        type=float,
        default=None,
        help="expected dims to spend at most on the calibration part (most accurate cascade "
        "within it; the held-out part may spend a little more)",
    )
    _common(fit)
    fit.add_argument("--seed", type=int, default=0, help="seed of the calibration/held-out split")
    fit.add_argument(
        "--out",
        default=None,
        help="cascade file to write (default: SOURCE/cascade.json for a run "
        "folder, SOURCE with suffix .cascade.json for a file)",
    )


def _eval_arguments(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("source", help="run folder, logits .npz, or a cascade file (.json)")
    ev.add_argument(
        "--logits",
        default=None,
        help="with a cascade file: evaluate on all of this run folder / logits file; on its "
        "held-out part only when it is the cascade's own source (default: the held-out part "
        "of the source it was fitted on)",
    )
    ev.add_argument(
        "--ff",
        nargs="*",
        default=[],
        help="fixed-feature runs (folders or logits files), one per size",
    )
    ev.add_argument("--seeds", default=None,
                    help="calibration/test split seeds, e.g. 0,1,2 (default 0,1,2)")
    ev.add_argument(
        "--match",
        type=float,
        default=None,
        help="accuracy fraction within which the reference counts as matched (default 0.005)",
    )
    ev.add_argument(
        "--fewshot",
        action="store_true",
        help="also few-shot / long-tail NCM at every prefix of every run",
    )
    ev.add_argument(
        "--fewshot-pool",
        choices=("test", "train"),
        default=None,  # None: not given (the default, test, is set in run)
        help="support set: a seeded half of the split (queries: the other half; "
        "default) or training images (queries: the whole split)",
    )
    ev.add_argument(
        "--out",
        default=None,
        help="folder for cascade.json/.md/.png (default: RUN_DIR/cascade-eval, or "
        "<stem>-cascade-eval beside a logits file)",
    )
    ev.add_argument("--dataset", default=None, help="dataset name added to every record")
    ev.add_argument("--notes", default=None,
                    help="text for cascade.md (how the runs were trained)")
    _common(ev)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib-fraction",
        type=float,
        default=None,  # None: not given (0.5 is set in run)
        help="fraction of the split used for calibration (default 0.5)",
    )
    p.add_argument(
        "--split",
        choices=("test", "train"),
        default=None,  # None: not given (the default, test, is set in run)
        help="dataset split of a run folder (default test); a logits file must hold this split",
    )


def _check_options(args: argparse.Namespace) -> None:
    """The CLI's numbers, checked (and named as flags) before logits are computed."""
    if not 0 < args.calib_fraction < 1:
        raise ValueError(f"--calib-fraction must be in (0, 1), got --calib-fraction "
                         f"{args.calib_fraction}")
    match = getattr(args, "match", None)
    if match is not None and not 0 <= match < 1:
        raise ValueError(f"--match must be in [0, 1), got --match {match}")
    tol = getattr(args, "tolerance", None)
    if tol is not None and not -1 <= tol < 1:
        raise ValueError(
            f"--tolerance must be in [-1, 1) (accuracy fraction; 0.005 = 0.5 points), got "
            f"--tolerance {tol}"
        )
    target = getattr(args, "target_accuracy", None)
    if target is not None and not 0 <= target <= 1:
        raise ValueError(f"--target-accuracy must be in [0, 1], got --target-accuracy {target}")
    budget = getattr(args, "budget", None)
    if budget is not None and not (math.isfinite(budget) and budget > 0):  # inf: bad JSON
        raise ValueError(
            f"--budget must be a positive number (expected dims), got --budget {budget}"
        )
    seed = getattr(args, "seed", None)
    if seed is not None and seed < 0:  # numpy said only "expected non-negative integer"
        raise ValueError(f"--seed must be a non-negative int, got --seed {seed}")


def run(args: argparse.Namespace) -> int:
    # which of these were typed: an explicit value that a cascade file would ignore is refused,
    # even when it equals the default
    defaults = {"split": "test", "fewshot_pool": "test", "seeds": "0,1,2", "match": 0.005,
                "calib_fraction": 0.5, "notes": ""}
    args.explicit = {n for n in defaults if getattr(args, n, None) is not None}
    for name, value in defaults.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)
    _check_options(args)
    if args.action == "fit":
        return _fit(args)
    return _eval(args)


# ----------------------------------------------------------------------------- fit
def _fit(args: argparse.Namespace) -> int:
    from mrl.cascade import Cascade, fit_cascade, split_calibration
    from mrl.cascade.core import check_labels, check_scores
    from mrl.cascade.runs import fingerprint, load_source

    out = Path(args.out) if args.out else _default_cascade_path(Path(args.source))
    _check_fit_out(out, Path(args.source))  # before the logits are computed
    _check_budget(args)
    data = load_source(args.source, args.split)
    # checked whole: after the split, an error would show the calibration part's shape
    logits = check_scores(data.logits, data.nesting)
    check_labels(data.labels, logits.shape[1], logits.shape[2])
    cal, held = split_calibration(len(data.labels), args.calib_fraction, args.seed,
                                  name="--calib-fraction")
    tol = args.tolerance
    if tol is None and args.target_accuracy is None and args.budget is None:
        tol = 0.005
    cas = fit_cascade(
        data.logits[:, cal],
        data.labels[cal],
        data.nesting,
        tolerance=tol,
        target_accuracy=args.target_accuracy,
        budget=args.budget,
    )
    held_res = cas.evaluate(data.logits[:, held], data.labels[held])
    info = {
        **cas.info,
        "source": str(Path(args.source).resolve()),
        "split": args.split,
        "seed": args.seed,
        "calib_fraction": args.calib_fraction,
        "num_classes": int(data.logits.shape[2]),
        "fingerprint": fingerprint(data),  # `eval --logits` recognises its source by it
        "heldout": {
            k: held_res[k]
            for k in ("accuracy", "expected_dims", "expected_heads", "expected_head_dims")
        },
    }
    cas = Cascade(cas.nesting, cas.thresholds, info)
    cas.save(out)
    th = ", ".join(f"{t:.4f}" for t in cas.thresholds)
    print(f"cascade for nesting {list(cas.nesting.sizes)}: thresholds [{th}]")
    print(
        f"calibration ({len(cal)}): accuracy {100 * info['calib_accuracy']:.2f} % "
        f"(full size {100 * info['calib_full_accuracy']:.2f} %), "
        f"expected dims {info['calib_expected_dims']:.1f}"
    )
    print(
        f"held out    ({len(held)}): accuracy {100 * held_res['accuracy']:.2f} %, expected "
        f"dims {held_res['expected_dims']:.1f}, head dims {held_res['expected_head_dims']:.1f}"
    )
    if info.get("reached") is False:
        print("note: the fit found no cascade reaching the target on calibration; this one answers"
              " at full size (or where a softmax saturates earlier)")
    print(f"wrote {out}")
    return 0


def _check_budget(args: argparse.Namespace) -> None:
    """``--budget`` against the source's nesting, read before the logits are loaded or computed."""
    from mrl.cascade.runs import source_nesting

    if args.budget is None:
        return
    nesting = source_nesting(args.source, args.split)
    if nesting is not None and not args.budget >= nesting.sizes[0]:
        raise ValueError(
            f"--budget must be >= the smallest prefix of {args.source} ({nesting.sizes[0]} dims; "
            f"nesting {list(nesting.sizes)}), got --budget {args.budget}"
        )


def _default_cascade_path(source: Path) -> Path:
    return source / "cascade.json" if source.is_dir() else source.with_suffix(".cascade.json")


def _check_fit_out(out: Path, source: Path) -> None:
    """The cascade file may replace an older cascade file, never the source or anything else."""
    check_output_path(out, "--out", "file")
    if out.suffix != ".json":
        raise ValueError(f"--out must be a cascade file ending in .json, got --out {str(out)!r}")
    if out.exists() and out.resolve() == source.resolve():
        raise FileExistsError(f"--out {str(out)!r} is the source itself; choose another file")
    if out.is_file() and not _is_cascade_file(out):
        raise FileExistsError(
            f"--out {str(out)!r} exists and is not a cascade file; refusing to overwrite it"
        )


def _is_cascade_file(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == "mrl-cascade"


# ----------------------------------------------------------------------------- eval
def _eval(args: argparse.Namespace) -> int:
    src = Path(args.source)
    if not src.exists():  # before any option is blamed for a source that is not there
        hint = (" (fit one first: mrl cascade fit RUN --out " + str(src) + ")"
                if src.suffix == ".json" else "")
        raise FileNotFoundError(f"source {str(src)!r} does not exist{hint}")
    if src.is_file() and src.suffix == ".json":
        return _eval_file(args, src)
    return _eval_curves(args, src)


def _eval_file(args: argparse.Namespace, path: Path) -> int:
    """Evaluate a fitted cascade file on its held-out part, or on all of ``--logits`` (only its
    held-out part when ``--logits`` is the source the cascade was fitted on)."""
    from mrl.cascade import Cascade
    from mrl.cascade.runs import fingerprint, load_source

    info = Cascade.load(path).info
    _refuse_ignored_options(args, info)
    if args.logits:
        data = load_source(args.logits, args.split)
        fp = fingerprint(data)  # computed once: recognises the source, and tells it changed
        own = _is_own_source(args.logits, args.split, data, info, fp)
        fix = "--logits is its source, and its held-out part is unknown: refit it"
        idx = _heldout_index(path, info, len(data.labels), fix) if own else None
    else:
        if not isinstance(info.get("source"), str):
            raise ValueError(f"{path} does not name its source (info 'source': "
                             f"{info.get('source')!r}); pass --logits RUN_OR_FILE")  # fmt: skip
        data = load_source(info["source"], info.get("split", "test"))
        fp = fingerprint(data)
        idx = _heldout_index(path, info, len(data.labels), "pass --logits RUN_OR_FILE")
    if idx is not None:
        _warn_if_changed(path, info, fp)
    cas = Cascade.load(path, data.nesting)  # checks the nesting against the model's
    classes = info.get("num_classes")
    if classes is not None and classes != data.logits.shape[2]:
        raise ValueError(
            f"{path} was fitted on logits with {classes} classes, but "
            f"{args.logits or info['source']} has {data.logits.shape[2]}"
        )
    logits = data.logits if idx is None else data.logits[:, idx]
    labels = data.labels if idx is None else data.labels[idx]
    res = cas.evaluate(logits, labels)
    print(
        f"{len(labels)} samples ({_eval_where(args, idx, len(data.labels))}): accuracy "
        f"{100 * res['accuracy']:.2f} %, expected dims {res['expected_dims']:.1f}, expected heads "
        f"{res['expected_heads']:.2f}, head dims {res['expected_head_dims']:.1f}, max prefix "
        f"{res['max_prefix']}"
    )
    return 0


def _warn_if_changed(path: Path, info: dict, fp: str) -> None:
    """The source's logits (fingerprint ``fp``) are no longer those the cascade was fitted on
    (the run was resumed or retrained since): its held-out part still holds other samples, but
    the thresholds were calibrated on another model's confidences."""
    import warnings

    if "fingerprint" in info and info["fingerprint"] != fp:
        warnings.warn(f"{info.get('source', 'the source')} changed since {path} was fitted "
                      "(retrained or resumed?): its thresholds were calibrated on other logits; "
                      "refit it with mrl cascade fit", stacklevel=2)


def _heldout_index(path: Path, info: dict, n: int, fix: str) -> np.ndarray:
    """The held-out indices of the split the cascade was fitted with (its info's seed)."""
    from mrl.cascade import split_calibration

    lacking = [k for k in ("calib_fraction", "seed") if k not in info]
    if lacking:
        raise ValueError(f"{path} lacks {lacking} in its info; {fix}")
    seed, frac = info["seed"], info["calib_fraction"]  # a hand-edited file: was a TypeError
    if not is_int(seed) or seed < 0:
        raise ValueError(f"{path}: info 'seed' must be a non-negative int, got {seed!r}; {fix}")
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise ValueError(f"{path}: info 'calib_fraction' must be in (0, 1), got {frac!r}; {fix}")
    return split_calibration(n, frac, seed)[1]


def _is_own_source(given: str, split: str, data: LogitsSet, info: dict, fp: str) -> bool:
    """Whether ``--logits`` holds the samples the cascade was fitted on: the same logits (by
    their fingerprint ``fp``, wherever the file lies), the source itself, its cached logits or
    its run."""
    if "fingerprint" in info and info["fingerprint"] == fp:
        return True
    if not isinstance(info.get("source"), str) or split != info.get("split", "test"):
        return False
    src = Path(info["source"]).resolve()
    run = data.meta.get("run")
    return Path(given).resolve() in (src, src / f"logits-{split}.npz") or (
        run is not None and Path(run).resolve() == src
    )


def _eval_where(args: argparse.Namespace, idx: np.ndarray | None, n: int) -> str:
    if idx is None:
        return "all of --logits"
    if not args.logits:
        return "the held-out part of its source"
    return (f"the held-out part of --logits, which is the source the cascade was fitted on; "
            f"its other {n - len(idx)} samples calibrated it")  # fmt: skip


def _refuse_ignored_options(args: argparse.Namespace, info: dict) -> None:
    """Options of the curve evaluation mean nothing for a fitted cascade file: say so.

    ``--calib-fraction`` and ``--fewshot-pool`` were silently ignored too (the held-out part is
    the one of the fit's own fraction and seed), and so was ``--split`` without ``--logits``
    (the cascade's source is read at the split it was fitted on)."""
    typed = args.explicit  # a value equal to the default, typed, was ignored silently too
    options = (("--ff", args.ff), ("--out", args.out), ("--fewshot", args.fewshot),
               ("--dataset", args.dataset), ("--notes", "notes" in typed),
               ("--seeds", "seeds" in typed), ("--match", "match" in typed),
               ("--calib-fraction", "calib_fraction" in typed),
               ("--fewshot-pool", "fewshot_pool" in typed))  # fmt: skip
    given = [flag for flag, on in options if on]
    if given:
        raise ValueError(
            f"{', '.join(given)} apply to a run folder or logits file, not to a fitted cascade "
            f"file ({args.source}); drop them or evaluate the source instead"
        )
    fitted = info.get("split", "test")
    if not args.logits and "split" in args.explicit and args.split != fitted:
        raise ValueError(
            f"--split {args.split} without --logits: {args.source} is evaluated on the held-out "
            f"part of split {fitted!r} it was fitted on; pass --logits RUN_OR_FILE to evaluate "
            f"it on split {args.split!r}"
        )


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated ints, got {text!r}") from None
    if not seeds:
        raise ValueError(f"--seeds must name at least one seed, got {text!r}")
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct non-negative ints, got --seeds {text}")
    return seeds


def _eval_curves(args: argparse.Namespace, src: Path) -> int:

    from mrl.cascade import evaluate_cascade, summarize
    from mrl.cascade.report import write_outputs
    from mrl.cascade.runs import load_source

    seeds = _parse_seeds(args.seeds)
    if args.logits:
        raise ValueError(f"--logits applies to a cascade file (.json) source, not to {src}")
    if "fewshot_pool" in args.explicit and not args.fewshot:  # was silently ignored
        raise ValueError(f"--fewshot-pool {args.fewshot_pool} applies with --fewshot only; "
                         "add --fewshot or drop it")  # fmt: skip
    out = _eval_out(args, src)  # checked before the logits are computed
    if args.fewshot and args.fewshot_pool == "train" and args.split == "train":
        raise ValueError("--fewshot-pool train with --split train would draw the support from "
                         "the very images it queries; use --split test (the default) or "
                         "--fewshot-pool test")
    if args.fewshot and args.fewshot_pool == "train":
        for f in [src, *args.ff]:
            if not Path(f).is_dir():
                raise ValueError(
                    f"--fewshot-pool train forwards training images and needs run folders; "
                    f"{f} is a logits file (use --fewshot-pool test)"
                )
    data = load_source(src, args.split)
    from mrl.cascade.evaluate import split_calibration

    # its sample count known: the fraction's error names the flag (it named calib_fraction)
    split_calibration(len(data.labels), args.calib_fraction, 0, name="--calib-fraction")
    ff = _load_ff(args.ff, args.split, data, src)
    # Few-shot support pools loaded and checked before the cascade work, not after it.
    pools = _fewshot_pools(src, data, ff, args.fewshot_pool) if args.fewshot else []
    dataset = args.dataset or data.meta.get("dataset")
    context = {"dataset": dataset, "split": args.split} if dataset else {"split": args.split}
    ff_scores = {m: d.logits[0] for m, (_, d) in ff.items()}  # FF-m: one prefix, [N, C]
    records, summaries = evaluate_cascade(
        data.logits,
        data.labels,
        data.nesting,
        ff_scores=ff_scores,
        calib_fraction=args.calib_fraction,
        seeds=seeds,
        match=args.match,
        **context,
    )
    command = _command_line(args)
    meta = {
        "source": str(src),
        "ff": list(args.ff),
        "split": args.split,
        "seeds": seeds,
        "calib_fraction": args.calib_fraction,
        "match": args.match,
        "command": command,
        "notes": args.notes,
        "machine": f"{platform.machine()} {platform.system()}, python {platform.python_version()}",
        **context,
    }
    summary = summarize(summaries)
    write_outputs(out, records, summaries, summary, meta)  # kept should few-shot fail
    if pools:
        print(f"wrote {out}/cascade.json, cascade.md, cascade.png; few-shot next ...",
              file=sys.stderr)  # fmt: skip
        records += _fewshot_records(pools, context, args.fewshot_pool)
        write_outputs(out, records, summaries, summary, meta)
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "reference",
                    "cascade_dims_to_match",
                    "fixed_name",
                    "fixed_dims_to_match",
                    "x_smaller",
                )
            }
        )
    )
    print(f"wrote {out}/cascade.json, cascade.md, cascade.png")
    return 0


def _eval_out(args: argparse.Namespace, src: Path) -> Path:
    """``--out``, or ``RUN/cascade-eval`` for a run folder, ``<stem>-cascade-eval`` beside a
    file (so two logits files in one folder do not share one); never a fitted cascade's place."""
    if args.out:
        out = Path(args.out)
    else:
        out = src / "cascade-eval" if src.is_dir() else src.with_name(f"{src.stem}-cascade-eval")
    check_output_dir_of(out, "--out", ("cascade.json", "cascade.md", "cascade.png"),
                        "a cascade evaluation folder",
                        foreign=("demo.md", "runs"))  # a demo's cascade.png was replaced
    if _is_cascade_file(out / "cascade.json"):
        raise FileExistsError(
            f"--out {str(out)!r} holds a fitted cascade file (cascade.json) that the evaluation "
            "would overwrite; choose another folder"
        )
    return out


def _load_ff(paths: list[str], split: str, data, src: Path) -> dict:
    """FF-m logits ``{m: (path, LogitsSet)}``: one prefix each, same samples, distinct sizes."""
    import numpy as np

    from mrl.cascade.runs import load_source

    ff: dict = {}
    for f in paths:
        d = load_source(f, split)
        if d.logits.shape[0] != 1 or not np.array_equal(d.labels, data.labels):
            raise ValueError(
                f"--ff {f} must hold one prefix of logits on the same samples as "
                f"{src}, got logits {d.logits.shape}"
            )
        if d.logits.shape[2] != data.logits.shape[2]:
            raise ValueError(f"--ff {f} has {d.logits.shape[2]} classes, {src} has "
                             f"{data.logits.shape[2]}")  # fmt: skip
        if d.size in ff:
            raise ValueError(f"--ff {f} and {ff[d.size][0]} are both of size {d.size}; "
                             "give one FF model per size")  # fmt: skip
        if d.size > data.nesting.dim:
            raise ValueError(f"--ff {f} has size {d.size}, above {src}'s full size "
                             f"{data.nesting.dim}")  # fmt: skip
        ff[d.size] = (f, d)
    return ff


def _command_line(args: argparse.Namespace) -> str:
    parts = ["mrl cascade eval", str(args.source)]
    if args.ff:
        parts += ["--ff", *map(str, args.ff)]
    parts += [
        "--seeds",
        args.seeds,
        "--calib-fraction",
        str(args.calib_fraction),
        "--match",
        str(args.match),
        "--split",
        args.split,
    ]
    if args.fewshot:
        parts += ["--fewshot", "--fewshot-pool", args.fewshot_pool]
    if args.dataset:
        parts += ["--dataset", args.dataset]
    if args.out:
        parts += ["--out", str(args.out)]
    return " ".join(parts)


# Few-shot shots per class and long-tail shots per tail class (`--fewshot`).
SHOTS = (1, 5, 10)
TAIL_SHOTS = (1, 5)


@dataclass
class _Pool:
    """One run's few-shot data: support pool and queries (embeddings, labels), its nesting."""

    method: str
    path: str
    nesting: Nesting
    px: np.ndarray
    py: np.ndarray
    qx: np.ndarray
    qy: np.ndarray


def _fewshot_pools(src: Path, data: LogitsSet, ff: dict, pool_split: str) -> list[_Pool]:
    """Support pool and queries of the MRL run (every prefix) and of each FF-m run, checked.

    ``pool_split="test"``: support drawn from a seeded half of the split, queries the other half
    (no extra forward pass); ``"train"``: support from a seeded subset of training images (the
    run folder's train split, one forward pass), queries the whole split.
    """
    from mrl import Nesting
    from mrl.cascade import split_calibration
    from mrl.cascade.runs import load_source

    runs = [("mrl", str(src), data, data.nesting)]
    runs += [("ff", str(path), d, Nesting((m,))) for m, (path, d) in ff.items()]
    folders = all(Path(path).is_dir() for _, path, _, _ in runs)  # can use --fewshot-pool train
    pools = []
    for method, path, test, nesting in runs:
        if test.embeddings is None:
            raise ValueError(f"--fewshot needs embeddings in {path}'s logits")
        if pool_split == "train":
            pool = load_source(path, "train")
            if pool.embeddings is None:
                raise ValueError(f"--fewshot needs embeddings in {path}'s train logits")
            px, py, qx, qy = pool.embeddings, pool.labels, test.embeddings, test.labels
        else:
            sup, qry = split_calibration(len(test.labels), 0.5, seed=0)
            px, py = test.embeddings[sup], test.labels[sup]
            qx, qy = test.embeddings[qry], test.labels[qry]
        pools.append(_Pool(method, path, nesting, px, py, qx, qy))
        _check_coverage(pools[-1], pool_split, folders)
    return pools


def _check_coverage(p: _Pool, pool_split: str, folders: bool) -> None:
    """Every class needs max(SHOTS) support examples in the pool and a query (long-tail
    accuracy per class part); say which option drew the pool, before any work."""
    import numpy as np

    from mrl.cascade.runs import POOL_SIZE

    need = max(SHOTS)
    C = int(max(p.py.max(), p.qy.max())) + 1
    have = np.bincount(p.py, minlength=C)
    queries = np.bincount(p.qy, minlength=C)
    short = np.flatnonzero((have < need) | (queries == 0))
    if not len(short):
        return
    c = int(short[np.argmin(have[short])])  # the worst off
    pool = ("--fewshot-pool test (support: a seeded half of the split, queries: the other half)"
            if pool_split == "test" else
            f"--fewshot-pool train (support: {len(p.py)} training images)")  # fmt: skip
    hint = "drop --fewshot (the cascade evaluation itself needs no support set)"
    if pool_split == "test" and folders and POOL_SIZE >= need * C:
        hint = f"try --fewshot-pool train ({POOL_SIZE} training images), or " + hint
    raise ValueError(
        f"--fewshot needs {need} support examples (shots {list(SHOTS)}) and a query of every "
        f"class; with {pool} {len(short)} of {C} classes of {p.path} fall short (fewest: class "
        f"{c}, {have[c]} support examples, {queries[c]} queries); {hint}"
    )


def _fewshot_records(pools: list[_Pool], context: dict, pool_split: str) -> list:
    """Few-shot and long-tail NCM records for the MRL run (every prefix) and each FF-m run."""
    import numpy as np

    from mrl.fewshot import few_shot_eval, long_tail_eval

    out = []
    for p in pools:
        m = p.nesting.dim
        px, qx = p.px[:, :m], p.qx[:, :m]
        kw = dict(method=p.method, seed=0, draws=5, support_from=pool_split, **context)
        out += few_shot_eval(px, p.py, qx, p.qy, p.nesting, shots=SHOTS, **kw)
        head = int(min(100, np.bincount(p.py).min()))  # head classes: 100 or all they have
        out += long_tail_eval(px, p.py, qx, p.qy, p.nesting, tail_shots=TAIL_SHOTS,
                              head_shots=head, **kw)  # fmt: skip
    return out
