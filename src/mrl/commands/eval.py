"""`mrl eval RUN_DIR`: evaluate a trained run at every prefix size and write a report.

Embeddings of the database (the training images, or the task's database triples) and of the test
set are computed once; every prefix is then a slice. Per prefix:

- ``top1``: the trained head's accuracy (MRL / MRL-E heads at every prefix, FF at its size); for a
  plain model, a linear probe on the truncated features (recipe in `mrl.probe`);
- ``1nn``, ``map@10``, ``p@10``: retrieval of test images among the database images, cosine on
  re-normalised prefixes (``--center``: subtract the database mean first), relevant = same class;
- plain models only: the same metrics for the PCA and random-coordinate baselines.

Text models (a sentence-transformers folder, i.e. RUN_DIR holds ``modules.json``) are handed to
`mrl.text.evaluation.eval_command`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrl.io import REPORT_FILES, WORKFLOW_FILES, check_output_dir_of

NAME = "eval"
HELP = "evaluate a trained run (or a text model folder) at every prefix size; write a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir",
        help="run folder written by `mrl train`, a text model folder, or 'default' (the "
        "packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="report folder (default RUN_DIR/eval; text models: RUN_DIR/eval-DATASET[-SPLIT], "
        "for 'default' ./eval-default-DATASET[-SPLIT])",
    )
    parser.add_argument(
        "--center", action="store_true", help="subtract the database mean before cosine retrieval"
    )
    parser.add_argument(
        "--nesting", default=None, help="prefix sizes to evaluate (default: the run's nesting)"
    )
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="plain models: skip the PCA / random baselines (text models: the PCA one)",
    )
    parser.add_argument(
        "--probe-iter",
        type=int,
        default=None,
        help="image runs: L-BFGS iterations of the linear probes (default 200)",
    )
    parser.add_argument("--device", default=None, help="device for the embeddings (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--dataset",
        default=None,
        help="text models only: cranfield (default), bbc, bbc:N or a BEIR-style folder "
        "(corpus.jsonl, queries.jsonl, qrels/test.tsv)",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="text models, BEIR-style folders only: judge by qrels/SPLIT.tsv (default: test)",
    )


@dataclass
class RunEmbeddings:
    """A run's embeddings, computed once: db [N, D], test [Q, D], test_logits [G_head, Q, C]."""

    run_dir: Path
    mode: str
    nesting: Any  # Nesting of the embedding (last size D)
    head_nesting: Any  # Nesting of the head's G outputs
    num_classes: int
    db: Any
    db_labels: Any
    test: Any
    test_labels: Any
    test_logits: Any
    config: Any = None
    epoch: int | None = None  # epochs trained (of config.epochs)
    device: str = "cpu"  # where the embeddings were computed (retrieval scoring runs there too)


def compute_embeddings(
    run_dir: str | os.PathLike, device: str | None = None, task: Any = None
) -> RunEmbeddings:
    """Load the run's checkpoint and embed its task's database and test sets once."""
    from mrl.data import load_task_for
    from mrl.devices import default_device
    from mrl.nesting import Nesting
    from mrl.train import check_task, load_run, predict

    dev = default_device(device)
    model, config, saved = load_run(run_dir, dev)
    if task is None:
        name = saved["task"]["name"]
        if name != config.data.dataset:
            raise ValueError(
                f"run {run_dir} was trained on a custom task {name!r} (Python API), not on "
                f"data.dataset={config.data.dataset!r}; evaluate it with "
                "compute_embeddings(run, task=...)"
            )
        task = load_task_for(config, saved=True)
    check_task(saved, task, run_dir)
    db, _ = predict(model, task.db, config.eval_batch_size, dev, with_logits=False)
    test, logits = predict(model, task.test, config.eval_batch_size, dev)
    return RunEmbeddings(
        Path(run_dir),
        config.model.mode,
        Nesting.from_dict(saved["nesting"]),
        Nesting.from_dict(saved["head_nesting"]),
        task.num_classes,
        db,
        task.db.labels.cpu(),
        test,
        task.test.labels.cpu(),
        logits,
        config,
        int(saved.get("epoch", 0)),
        str(dev),
    )


def evaluate_embeddings(
    e: RunEmbeddings,
    *,
    center: bool = False,
    nesting: Any = None,
    baselines: bool = True,
    probe_iter: int = 200,
    method: str | None = None,
    probe_all: bool = False,
    probe_max_dim: int | None = None,
    **context: Any,
) -> list[dict[str, Any]]:
    """Tidy records (method, prefix, metric, value, ...) for one run; see the module doc.

    ``probe_all``: also fit the linear probe on the features of models with trained heads, so that
    metric ``probe_top1`` compares every method with one classifier recipe (for plain, pca and
    random, ``probe_top1`` equals their ``top1``). ``probe_max_dim``: fit probes only at prefixes
    up to this size (1000-class probes on 50k rows take minutes per prefix on a CPU).
    """
    from mrl.nesting import Nesting
    from mrl.probe import baseline_features, probe_top1
    from mrl.records import make_record

    method = method or e.mode
    if "seed" not in context and getattr(e.config, "seed", None) is not None:
        # the run's own seed on every record: the retrieval records said seed 0 for any run
        # (and two seeds' appended records replaced each other), the heads' said none
        context = {**context, "seed": int(e.config.seed)}
    records: list[dict[str, Any]] = []
    if e.mode == "ff":
        sizes = e.head_nesting  # FF-m: the classifier and the retrieval read z[:, :m]
        db, test = e.db[:, : sizes.dim], e.test[:, : sizes.dim]
    else:
        sizes = Nesting.parse(nesting, dim=e.nesting.dim) if nesting else e.nesting
        db, test = e.db, e.test
    # The prefixes that get a linear probe (None: none is <= probe_max_dim).
    kept = [m for m in sizes.sizes if probe_max_dim is None or m <= probe_max_dim]
    probe_sizes = Nesting.parse(kept) if kept else None

    def probe(x_db: Any, x_test: Any) -> tuple[Any, Any]:
        """(probed sizes, top-1 [G'] of a linear probe at each)."""
        ps = probe_sizes
        if ps is None:
            raise ValueError(
                f"probe_max_dim={probe_max_dim} is below every prefix {list(sizes.sizes)}"
            )
        acc = probe_top1(x_db[:, : ps.dim], e.db_labels, x_test[:, : ps.dim], e.test_labels, ps,
                         e.num_classes, max_iter=probe_iter)  # fmt: skip
        return ps, acc

    if e.mode in ("mrl", "mrl-e", "ff"):
        acc = 100.0 * (e.test_logits.argmax(-1) == e.test_labels[None]).float().mean(1)  # [G_head]
        for m, a in zip(e.head_nesting.sizes, acc.tolist()):
            if m in sizes:
                records.append(make_record(method, m, "top1", a, source="head", **context))
        if probe_all and probe_sizes is not None:
            ps, acc = probe(db, test)
            records += [
                make_record(method, m, "probe_top1", a, source="probe", **context)
                for m, a in zip(ps.sizes, acc.tolist())
            ]
    else:  # plain: a probe on the truncated features
        ps, acc = probe(db, test)
        records += _probe_records(method, ps, acc, probe_all, context)
    records += _retrieval(
        db, e.db_labels, test, e.test_labels, sizes, method, center, context, e.device
    )
    if e.mode == "plain" and baselines:
        # the random coordinates follow the run's seed (they were seed 0's for every seed,
        # under records labelled with the run's seed: seeds never varied them)
        seed = getattr(e.config, "seed", None)
        seed = int(context.get("seed", 0) if seed is None else seed)  # no config: the label's
        for kind in ("pca", "random"):
            bdb, btest = baseline_features(db, test, kind, seed=seed)
            ctx = {**context, "coords_seed": seed} if kind == "random" else context
            ps, acc = probe(bdb, btest)
            records += _probe_records(kind, ps, acc, probe_all, ctx)
            records += _retrieval(
                bdb, e.db_labels, btest, e.test_labels, sizes, kind, center, ctx, e.device
            )
    return records


def _probe_records(
    method: str, sizes: Any, acc: Any, probe_all: bool, context: dict[str, Any]
) -> list[dict[str, Any]]:
    """top1 records of a probe (and the same values as probe_top1 when ``probe_all``)."""
    from mrl.records import make_record

    metrics = ("top1", "probe_top1") if probe_all else ("top1",)
    return [
        make_record(method, m, metric, a, source="probe", **context)
        for metric in metrics
        for m, a in zip(sizes.sizes, acc.tolist())
    ]


def _retrieval(
    db: Any,
    db_labels: Any,
    queries: Any,
    query_labels: Any,
    sizes: Any,
    method: str,
    center: bool,
    context: dict[str, Any],
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """1nn, map@10, p@10 (in percent) of test queries [Q, D] against the database [N, D].

    On an accelerator the scoring runs there (Q x N x G scores: about 40 s per method on one CPU
    thread for Fashion-MNIST's 10k x 60k); labels and metrics stay on the host."""
    from mrl.evaluate import evaluate_labelled

    if len(db) < 10:  # k is fixed at 10 so that every run's map@10 / p@10 compare
        raise ValueError(f"the database (the training split) has {len(db)} items; the retrieval "
                         "metrics map@10 and p@10 need at least 10: train on more data")
    recs = evaluate_labelled(
        db.to(device), db_labels.numpy(), queries.to(device), query_labels.numpy(), sizes,
        method=method, k=10, center=center,
    )  # fmt: skip
    for r in recs:  # evaluate_labelled reports fractions; tables here are in percent
        if r["value"] is not None and r["metric"] in ("1nn", "map@10", "p@10"):
            r["value"] = 100.0 * r["value"]
        r.update(context)
        r.setdefault("center", center)
    return recs


def evaluate_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    center: bool = False,
    nesting: str | None = None,
    baselines: bool = True,
    probe_iter: int = 200,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Embed once, evaluate every prefix, write the report into ``out_dir``; returns records.

    ``log``: progress lines (the CLI prints them to stderr; None = silent).
    """
    from mrl.report import write_report

    say = log or (lambda s: None)
    t0 = time.perf_counter()
    say(f"eval {run_dir}: embedding the database and the test set ...")
    e = compute_embeddings(run_dir, device)
    trained = f"epoch {e.epoch} of {e.config.epochs}"
    if e.epoch is not None and e.epoch < e.config.epochs:
        warnings.warn(
            f"{run_dir} is trained to {trained} only (interrupted?); evaluating it as it is "
            "(finish it with mrl train CONFIG --out RUN --resume)",
            stacklevel=2,
        )
    say(f"eval: {len(e.db)} database and {len(e.test)} test embeddings in "
        f"{time.perf_counter() - t0:.0f} s; scoring every prefix (retrieval"
        f"{', linear probes' if e.mode == 'plain' else ''}) ...")
    records = evaluate_embeddings(
        e,
        center=center,
        nesting=nesting,
        baselines=baselines,
        probe_iter=probe_iter,
        dataset=e.config.data.dataset,
        seed=e.config.seed,
    )
    out = Path(out_dir) if out_dir else Path(run_dir) / "eval"
    notes = (
        f"Run `{run_dir}` ({trained}): mode {e.mode}, model {e.config.model.name}, "
        f"D={e.nesting.dim}, "
        f"nesting {list(e.nesting.sizes)}, dataset {e.config.data.dataset}. "
        f"Values in percent. Retrieval: database {len(e.db)} items, {len(e.test)} queries, "
        f"cosine on re-normalised prefixes{' after centring' if center else ''}. "
        "top1 from the trained heads, or (plain/pca/random) a linear probe: "
        + probe_recipe(probe_iter)
    )
    # the folder's real name ("." gave an empty title)
    write_report(records, out, title=f"mrl eval: {Path(run_dir).resolve().name}", notes=notes)
    say(f"eval: done in {time.perf_counter() - t0:.0f} s")
    return records


def probe_recipe(max_iter: int = 200) -> str:
    """The linear probe's recipe in words (for reports)."""
    return (
        "standardised features, multinomial logistic regression with L2 1e-4 on the "
        f"weights, full-batch L-BFGS (strong Wolfe) up to {max_iter} iterations."
    )


PROBE_RECIPE = probe_recipe()


def _check_nesting_option(run_dir: Path, spec: str | None) -> None:
    """``--nesting`` against the run's saved config: a valid spec ending at D, not for ff runs."""
    if spec is None:
        return
    from mrl.config import config_from_dict
    from mrl.nesting import Nesting
    from mrl.train import load_checkpoint

    saved = run_dir / "config.json"
    raw = json.loads(saved.read_text()) if saved.is_file() else load_checkpoint(run_dir)["config"]
    model = config_from_dict(raw).model
    if model.mode == "ff":
        raise ValueError(f"--nesting does not apply to an ff run ({run_dir} is evaluated at its "
                         f"ff_dim={model.ff_dim}), got --nesting {spec}")  # fmt: skip
    try:
        Nesting.parse(spec, dim=model.dim)
    except ValueError as exc:
        raise ValueError(f"--nesting {spec}: {exc} (the run's D is {model.dim})") from None


def _check_run_folder(run_dir: Path) -> None:
    """A folder given to `mrl eval` holds a training checkpoint or is a text model folder."""
    from mrl.train import CHECKPOINT

    if run_dir.is_file() and run_dir.suffix != ".pt":
        raise ValueError(
            f"{str(run_dir)!r} is a file, not a run folder (or its {CHECKPOINT}) nor a "
            "sentence-transformers model folder"
        )
    if run_dir.is_dir() and not (run_dir / CHECKPOINT).is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} is neither a training run (no {CHECKPOINT}; train first: mrl "
            "train CONFIG --out DIR) nor a sentence-transformers model folder (no modules.json)"
        )


def run(args: argparse.Namespace) -> int:
    from mrl.devices import check_device

    if args.device is not None:
        check_device(args.device, "--device")
    run_dir = Path(args.run_dir)
    packaged = str(args.run_dir) == "default" and not run_dir.exists()
    if not packaged and not run_dir.exists():  # before any progress line or other check
        raise FileNotFoundError(
            f"{str(run_dir)!r} does not exist: give a run folder (mrl train CONFIG --out DIR), "
            "a sentence-transformers model folder or 'default'"
        )
    if packaged or (run_dir / "modules.json").is_file():  # a sentence-transformers model
        from mrl.text.evaluation import eval_command

        if args.probe_iter is not None:  # text models get no linear probes: it would be ignored
            raise ValueError(f"--probe-iter is for image runs (their linear probes); "
                             f"{str(run_dir)!r} is a text model")

        return int(eval_command(args) or 0)
    if args.split is not None:
        raise ValueError(f"--split {args.split!r} is for text model folders and BEIR-style "
                         f"datasets; {str(run_dir)!r} is not a sentence-transformers model folder")
    if args.dataset is not None:
        raise ValueError(f"--dataset is for text model folders (with modules.json); "
                         f"{str(run_dir)!r} is not a sentence-transformers model folder")
    _check_run_folder(run_dir)  # before the progress lines and the model's loading
    probe_iter = 200 if args.probe_iter is None else args.probe_iter
    if probe_iter <= 0:
        raise ValueError(f"--probe-iter must be positive, got {args.probe_iter}")
    from mrl.records import to_markdown

    if run_dir.is_file() and run_dir.suffix == ".pt":  # a checkpoint: its folder is the run
        from mrl.train import CHECKPOINT

        if run_dir.name != CHECKPOINT:  # the run's checkpoint is what gets loaded
            raise ValueError(
                f"{str(run_dir)!r}: mrl eval takes a run folder or its {CHECKPOINT}, not "
                f"another checkpoint file (it would evaluate {run_dir.parent / CHECKPOINT}); "
                f"put the file as {CHECKPOINT} in a folder of its own"
            )
        run_dir = run_dir.parent
    out = check_output_dir_of(args.out if args.out else run_dir / "eval", "--out", REPORT_FILES,
                              "a report folder", foreign=WORKFLOW_FILES)
    _check_nesting_option(run_dir, args.nesting)  # before minutes of embedding
    records = evaluate_run(
        run_dir,
        out,
        center=args.center,
        nesting=args.nesting,
        baselines=not args.no_baselines,
        probe_iter=probe_iter,
        device=args.device,
        log=None if args.no_progress else lambda s: print(s, file=sys.stderr, flush=True),
    )
    for metric in ("top1", "1nn"):
        print(to_markdown(records, metric=metric))
    print(f"report: {out / 'report.html'}")
    return 0
