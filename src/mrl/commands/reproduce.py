"""`mrl reproduce TASK --budget small|full --out DIR [--seed N]`: the paper's comparison.

Trains, with one identical recipe and the same encoder initialisation, an MRL model (independent
heads), an MRL-E model (tied head), one fixed-feature model FF-m per compared prefix size (the full
network whose classifier reads only the first m features) and the full-size plain model (which also
feeds the PCA and random-coordinate baselines, each with a linear probe). Every model is evaluated
at every prefix (`mrl.commands.eval.evaluate_embeddings`) and the records of all seeds accumulate
in ``DIR/results.json`` (rerunning a seed replaces that seed's records), with a markdown table,
plots and an HTML report. Runs live in ``DIR/runs/seed<S>/<method>``; a finished run is not
trained again, an interrupted one resumes.

Budgets: ``small`` fits a 2-core CPU (a small CNN, few epochs, FF at 2/4/8/16); ``full`` is meant
for one GPU (a ResNet-18 with a small-image stem, D = 512, 12 epochs, FF at every prefix).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME = "reproduce"
HELP = "train MRL, MRL-E, FF and plain models with one recipe and compare them at every prefix"


@dataclass(frozen=True)
class Recipe:
    """One task x budget: the shared training config (as --set overrides) and the FF sizes."""

    overrides: tuple[str, ...]
    ff_sizes: tuple[int, ...]
    note: str


_CNN = ("model.name=cnn", "model.dim=256", "model.nesting=2,4,8,16,32,64,128,256")
_RESNET = ("model.name=resnet18", "model.stem=small", "model.dim=512", "model.nesting=doubling:8")
_SGD = ("optim.name=sgd", "optim.lr=0.2", "optim.momentum=0.9", "optim.weight_decay=5e-4",
        "optim.warmup_epochs=1", "batch_size=512")  # fmt: skip
RECIPES: dict[tuple[str, str], Recipe] = {
    ("fashion-mnist", "small"): Recipe(
        (
            "data.dataset=fashion-mnist",
            *_CNN,
            "optim.name=adamw",
            "optim.lr=0.003",
            "epochs=3",
            "batch_size=128",
        ),
        (2, 4, 8, 16),
        "small CNN (D=256), AdamW lr 3e-3 cosine, 3 epochs, batch 128 (CPU budget)",
    ),
    ("fashion-mnist", "full"): Recipe(
        (
            "data.dataset=fashion-mnist",
            *_RESNET,
            "model.nesting=2,4,8,16,32,64,128,256,512",
            *_SGD,
            "epochs=12",
            "data.flip=true",
            "data.crop_pad=2",
        ),
        (2, 4, 8, 16, 32, 64, 128, 256),
        "ResNet-18 small stem (D=512), SGD lr 0.2 cosine, 12 epochs, batch 512, flip+crop (GPU)",
    ),
    ("fashion-mnist-1k", "small"): Recipe(
        (
            "data.dataset=fashion-mnist-1k",
            "model.name=cnn",
            "model.dim=256",
            "model.nesting=8,16,32,64,128,256",
            "optim.name=adamw",
            "optim.lr=0.003",
            "epochs=2",
            "batch_size=256",
        ),
        (8, 16),
        "small CNN (D=256) on 28x84 triples, AdamW, 2 epochs of 60k fresh triples (CPU budget)",
    ),
    ("fashion-mnist-1k", "full"): Recipe(
        ("data.dataset=fashion-mnist-1k", *_RESNET, *_SGD, "epochs=12", "data.crop_pad=2"),
        (8, 16, 32, 64, 128, 256),
        "ResNet-18 small stem (D=512), SGD lr 0.2 cosine, 12 epochs of 60k fresh triples (GPU)",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=sorted({t for t, _ in RECIPES}))
    parser.add_argument("--budget", choices=("small", "full"), default="small")
    parser.add_argument("--out", required=True, help="results folder (records accumulate)")
    parser.add_argument("--seed", type=int, default=0, help="seed of this repetition")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the shared recipe (all models)",
    )
    parser.add_argument("--center", action="store_true", help="centre before cosine retrieval")
    parser.add_argument(
        "--runs",
        default=None,
        metavar="DIR",
        help="folder of the trained runs (default OUT/runs): evaluate the same models again, "
        "e.g. with --center, into another --out without retraining",
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="RUNS",
        help="comma-separated runs to do now (e.g. mrl,ff-2; default all): lets "
        "several processes or machines share one seed",
    )
    parser.add_argument("--no-progress", action="store_true")


def methods(recipe: Recipe) -> list[tuple[str, tuple[str, ...]]]:
    """(run name, extra overrides) of every model: mrl, mrl-e, ff-m..., plain."""
    runs = [("mrl", ("model.mode=mrl",)), ("mrl-e", ("model.mode=mrl-e",))]
    runs += [(f"ff-{m}", ("model.mode=ff", f"model.ff_dim={m}")) for m in recipe.ff_sizes]
    return runs + [("plain", ("model.mode=plain",))]


def reproduce(
    task: str,
    budget: str,
    out: str | Path,
    *,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
    center: bool = False,
    progress: bool = True,
    data_task: Any = None,
    only: tuple[str, ...] | None = None,
    runs: str | Path | None = None,
    log=print,
) -> list[dict[str, Any]]:
    """Train and evaluate every model of one seed; merge its records into ``out/results.json``."""
    from mrl.commands.eval import compute_embeddings, evaluate_embeddings
    from mrl.config import load_config
    from mrl.data import load_task_for
    from mrl.records import load_records, save_records
    from mrl.train import CHECKPOINT, load_checkpoint, train

    if (task, budget) not in RECIPES:
        raise ValueError(f"no recipe for task={task!r} budget={budget!r}")
    recipe = RECIPES[(task, budget)]
    out = Path(out)
    runs_root = Path(runs) if runs is not None else out / "runs"
    _check_centring(out / "results.json", center)
    base = (*recipe.overrides, f"seed={seed}", *overrides)
    config0 = load_config(None, list(base))
    if data_task is None:
        data_task = load_task_for(config0)
    names = [name for name, _ in methods(recipe)]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ValueError(f"only must name runs among {names}, got {unknown}")
    records: list[dict[str, Any]] = []
    for name, extra in methods(recipe):
        if only and name not in only:
            continue
        run_dir = runs_root / f"seed{seed}" / name
        # Evaluations with and without centring are cached apart: both come from one model.
        cached = run_dir / ("records-center.json" if center else "records.json")
        config = load_config(None, [*base, *extra])
        t0 = time.perf_counter()
        if cached.is_file():
            recs = json.loads(cached.read_text())
            log(f"[{name}] seed {seed}: evaluated before, reusing {cached}")
        else:
            ckpt = run_dir / CHECKPOINT
            resume = ckpt.is_file()
            if not resume or load_checkpoint(ckpt)["epoch"] < config.epochs:
                log(f"[{name}] seed {seed}: training{' (resuming)' if resume else ''} ...")
                train(config, run_dir, resume=resume, progress=progress, task=data_task)
            e = compute_embeddings(run_dir, task=data_task)
            recs = evaluate_embeddings(
                e,
                center=center,
                method=name.split("-")[0] if name.startswith("ff") else name,
                dataset=task,
                seed=seed,
                budget=budget,
                run=name,
                probe_all=True,
            )
            save_records(cached, recs)
        if name == "plain":
            recs = [*recs, _plain_as_ff(run_dir, config.model.dim, dataset=task, seed=seed,
                                        budget=budget)]  # fmt: skip
        records += recs
        log(f"[{name}] seed {seed}: done in {time.perf_counter() - t0:.0f} s")
    results = out / "results.json"
    done = {(seed, r["run"]) for r in records}
    old = load_records(results) if results.is_file() else []
    old = [r for r in old if (r.get("seed"), r.get("run")) not in done]
    save_records(results, old + records)
    return old + records


def _plain_as_ff(run_dir: Path, dim: int, **context: Any) -> dict[str, Any]:
    """The plain model is FF-D: its own head's test top-1 (the last epoch's, from metrics.jsonl,
    which the training loop computes on the task's whole test split)."""
    from mrl.records import make_record

    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    acc = last["test_top1"][str(dim)]
    source = "head of the plain model (= FF-D)"
    return make_record("ff", dim, "top1", acc, source=source, run="plain", **context)


def _check_centring(results: Path, center: bool) -> None:
    """Refuse to mix centred and uncentred retrieval records in one results file."""
    from mrl.records import load_records

    if not results.is_file():
        return
    found = {r["center"] for r in load_records(results) if "center" in r}
    if found and found != {center}:
        raise ValueError(
            f"{results} holds records evaluated with center={sorted(found)[0]}, but this call "
            f"has center={center}: write to another --out (add --runs {results.parent / 'runs'} "
            "to evaluate the same trained models without retraining)"
        )


def write_tables(records: list[dict[str, Any]], out: Path, title: str, notes: str) -> str:
    """Report files (results.json, results.md, plots, report.html); returns the markdown tables."""
    from mrl.records import to_markdown
    from mrl.report import write_report

    write_report(records, out, title=title, notes=notes)
    parts = []
    for metric in ("top1", "probe_top1", "1nn", "map@10"):
        parts.append(f"### {metric} (%)\n\n" + to_markdown(records, metric=metric))
    return "\n\n".join(parts)


def run(args: argparse.Namespace) -> int:
    recipe = RECIPES[(args.task, args.budget)]
    out = Path(args.out)
    records = reproduce(
        args.task,
        args.budget,
        out,
        seed=args.seed,
        overrides=tuple(args.overrides),
        center=args.center,
        progress=not args.no_progress,
        only=tuple(args.only.split(",")) if args.only else None,
        runs=args.runs,
    )
    seeds = sorted({r["seed"] for r in records})
    from mrl.commands.eval import PROBE_RECIPE

    notes = (
        f"{args.task}, budget {args.budget}: {recipe.note}. Seeds {seeds} (mean ± std over "
        "seeds where more than one). Values in percent. top1: trained heads (mrl, mrl-e, ff); "
        f"linear probe for plain / pca / random ({PROBE_RECIPE}) Retrieval: test images "
        "against the training images, cosine on re-normalised prefixes."
    )
    tables = write_tables(records, out, f"mrl reproduce {args.task} ({args.budget})", notes)
    from mrl.claims import check_claims, claims_markdown
    from mrl.io import atomic_write_text

    claims = claims_markdown(check_claims(records, args.task), seeds)
    atomic_write_text(out / "claims.md", claims + "\n")
    print(tables + "\n\n" + claims)
    print(f"\nreport: {out / 'report.html'}; records: {out / 'results.json'}")
    return 0
