"""`mrl demo`: the project's main job in one command (sized for 10 minutes on a 2-core CPU).

Trains a Matryoshka (MRL) model and a plain model with the same recipe on Fashion-MNIST, embeds
the training and test images once, evaluates every prefix size against the plain model's
truncated features and the PCA / random-coordinate baselines, writes an HTML report and prints a
short table.

The report is a list of sections. A section is a function ``section(ctx) -> (markdown, records)``
taking a `DemoContext`; `SECTIONS` names them as ``"module:function"`` strings, imported when the
demo runs, so adding one (e.g. retrieval or cascades) is a one-line change to that list.
"""

from __future__ import annotations

import argparse
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrl.commands._options import check_minimums
from mrl.io import check_output_dir_of

NAME = "demo"
HELP = "train an MRL model on Fashion-MNIST, compare every prefix with baselines, write a report"

# Report sections in order; each is "module:function" with function(ctx) -> (markdown, records).
SECTIONS = [
    "mrl.commands.demo:classification_section",
    "mrl.retrieval.demo:demo_section",
    "mrl.cascade:demo_section",
]
# Sections whose records are tabled in their own markdown, not in the per-metric tables and plots
# of results.md: the cascade's curve has several operating points (and the headline's records)
# per prefix, which a mean ± std cell over seeds would mix.
OWN_TABLES = {"mrl.cascade:demo_section"}

DEMO_RECIPE = (
    "data.dataset=fashion-mnist",
    "model.name=cnn",
    "model.dim=256",
    "model.nesting=2,4,8,16,32,64,128,256",
    "optim.name=adamw",
    "optim.lr=0.003",
    "batch_size=128",
)


@dataclass
class DemoContext:
    """What sections receive. Arrays are torch tensors on the CPU.

    run_dir / baseline_run_dir: the MRL and plain runs; nesting: the embedding's `Nesting`;
    train_embeddings [N, D] / test_embeddings [Q, D] (MRL model) with train_labels / test_labels;
    test_logits [G, Q, C] of the MRL heads; baseline: the plain model's `RunEmbeddings`;
    records: everything measured so far (sections may read it).
    """

    out_dir: Path
    run_dir: Path
    baseline_run_dir: Path
    nesting: Any
    dataset: str
    train_embeddings: Any
    train_labels: Any
    test_embeddings: Any
    test_labels: Any
    test_logits: Any
    mrl: Any  # mrl.commands.eval.RunEmbeddings of the MRL model
    baseline: Any  # ... of the plain model
    seed: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="mrl-demo", help="report folder (default ./mrl-demo)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="training epochs per model (default 3: the reproduction's small recipe)",
    )
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="train on a seeded subset of this many images (default: all 60k)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the training recipe (both models)",
    )
    parser.add_argument("--no-progress", action="store_true")


def classification_section(ctx: DemoContext) -> tuple[str, list[dict[str, Any]]]:
    """Top-1 and 1-NN at every prefix: MRL vs truncation of the plain model, PCA and random."""
    from mrl.commands.eval import evaluate_embeddings
    from mrl.records import to_markdown

    records = evaluate_embeddings(ctx.mrl, dataset=ctx.dataset, seed=ctx.seed, probe_all=True)
    records += evaluate_embeddings(
        ctx.baseline,
        nesting=",".join(map(str, ctx.nesting.sizes)),
        probe_all=True,
        dataset=ctx.dataset,
        seed=ctx.seed,
    )
    md = "\n".join([
        "## Classification and retrieval at every prefix size",
        "",
        "MRL: one network trained with a classifier at every prefix (summed losses). plain: the "
        "same network trained with one full-size classifier, its features truncated. pca / random: "
        "PCA components / random coordinates of the plain model's features. top1 of mrl comes "
        "from its heads, of the others from a linear probe; probe_top1: the same linear probe "
        "for every method; 1nn: nearest training image (cosine on the re-normalised prefix) has "
        "the test image's class. Values in percent.",
        "",
        "### top1", "", to_markdown(records, metric="top1"),
        "", "### probe_top1", "", to_markdown(records, metric="probe_top1"),
        "", "### 1nn", "", to_markdown(records, metric="1nn"),
    ])  # fmt: skip
    return md, records


def _load_section(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _train_or_reuse(config, run_dir: Path, task, progress: bool, log) -> None:
    from mrl.train import CHECKPOINT, check_same_recipe, load_checkpoint, train

    # A folder from an earlier demo with other options (e.g. --epochs) is never silently reused.
    check_same_recipe(run_dir, config, "use another --out, or delete that folder to retrain")
    ckpt = run_dir / CHECKPOINT
    if ckpt.is_file() and load_checkpoint(ckpt)["epoch"] >= config.epochs:
        log(f"reusing the trained model in {run_dir}")
        return
    t0 = time.perf_counter()
    train(config, run_dir, resume=ckpt.is_file(), progress=progress, task=task)
    log(f"trained {config.model.mode} model in {time.perf_counter() - t0:.0f} s -> {run_dir}")


def demo(
    out: str | Path = "mrl-demo",
    *,
    epochs: int = 3,
    train_size: int | None = None,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
    progress: bool = True,
    task: Any = None,
    sections: list[str] | None = None,
    log=print,
) -> tuple[list[dict[str, Any]], str]:
    """Run the demo into ``out``; returns (records, the report's markdown)."""
    from mrl.commands.eval import compute_embeddings
    from mrl.config import load_config, refuse_overrides
    from mrl.data import load_task_for
    from mrl.io import atomic_write_text
    from mrl.report import write_report

    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got epochs={epochs}")
    out = Path(out)
    t0 = time.perf_counter()
    refuse_overrides(overrides, {
        "seed": "use --seed", "epochs": "use --epochs",
        "model.mode": "the demo trains an mrl and a plain model itself",
    })
    base = [*DEMO_RECIPE, f"epochs={epochs}", f"seed={seed}", *overrides]
    if train_size is not None:
        base.append(f"data.train_size={train_size}")
    mrl_cfg = load_config(None, [*base, "model.mode=mrl"])
    plain_cfg = load_config(None, [*base, "model.mode=plain"])
    if task is None:
        task = load_task_for(mrl_cfg, size_name="--train-size")  # what demo users typed
    runs = out / "runs"
    _train_or_reuse(mrl_cfg, runs / "mrl", task, progress, log)
    _train_or_reuse(plain_cfg, runs / "plain", task, progress, log)
    mrl = compute_embeddings(runs / "mrl", task=task)
    plain = compute_embeddings(runs / "plain", task=task)
    ctx = DemoContext(
        out_dir=out, run_dir=runs / "mrl", baseline_run_dir=runs / "plain", nesting=mrl.nesting,
        dataset=mrl_cfg.data.dataset, train_embeddings=mrl.db, train_labels=mrl.db_labels,
        test_embeddings=mrl.test, test_labels=mrl.test_labels, test_logits=mrl.test_logits,
        mrl=mrl, baseline=plain, seed=seed,
    )  # fmt: skip
    markdown, tables = [], []
    for spec in sections if sections is not None else SECTIONS:
        md, recs = _load_section(spec)(ctx)
        markdown.append(md)
        ctx.records += recs
        if spec not in OWN_TABLES:
            tables += recs
    minutes = (time.perf_counter() - t0) / 60
    notes = (
        f"mrl demo: {mrl_cfg.data.dataset}, {len(task.train)} training images, small CNN "
        f"(D={mrl_cfg.model.dim}), {epochs} epoch(s) per model, seed {seed}; "
        f"{minutes:.1f} min in all."
    )
    write_report(
        ctx.records,
        out,
        title="mrl demo: Matryoshka representations on Fashion-MNIST",
        notes=notes,
        sections=[_heading_and_body(md) for md in markdown],
        tables=tables,
    )
    atomic_write_text(out / "demo.md", "\n\n".join([f"# mrl demo\n\n{notes}", *markdown]) + "\n")
    return ctx.records, "\n\n".join(markdown)


def _heading_and_body(markdown: str) -> tuple[str, str]:
    """A section's markdown -> (heading, body) for `mrl.report.write_report`."""
    first, _, rest = markdown.strip().partition("\n")
    if first.startswith("#"):
        return first.lstrip("#").strip(), rest.strip()
    return "", markdown


def _short_table(records: list[dict[str, Any]]) -> str:
    """top1 and 1nn of mrl / plain / pca / random at the smallest prefixes and at D."""
    from mrl.records import to_markdown

    keep = sorted({r["prefix"] for r in records if r["prefix"] is not None})
    keep = set(keep[:4] + keep[-1:])
    rows = [
        r
        for r in records
        if r["prefix"] in keep
        and r["metric"] in ("top1", "1nn")
        and r["method"] in ("mrl", "plain", "pca", "random")
    ]
    return to_markdown(rows)


def run(args: argparse.Namespace) -> int:
    check_output_dir_of(args.out, "--out", ("runs", "demo.md"), "a demo folder",
                        foreign=("claims.md", "recipe.json"))  # not an eval's report files
    check_minimums(args, (("epochs", 1), ("train_size", 1)))  # named as the user typed them
    records, _ = demo(
        args.out,
        epochs=args.epochs,
        train_size=args.train_size,
        seed=args.seed,
        overrides=tuple(args.overrides),
        progress=not args.no_progress,
    )
    print(_short_table(records))
    out = Path(args.out)
    print(f"\nreport: {(out / 'report.html').resolve()}")
    print(f"tables: {out / 'results.md'}  records: {out / 'results.json'}")
    return 0
