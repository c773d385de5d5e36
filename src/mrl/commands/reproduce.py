"""`mrl reproduce TASK --budget small|full --out DIR [--seed N]`: the paper's comparison.

Trains, with one identical recipe and the same encoder initialisation, an MRL model (independent
heads), an MRL-E model (tied head), one fixed-feature model FF-m per compared prefix size (the full
network whose classifier reads only the first m features) and the full-size plain model (which also
feeds the PCA and random-coordinate baselines, each with a linear probe). Every model is evaluated
at every prefix (`mrl.commands.eval.evaluate_embeddings`) and the records of all seeds accumulate
in ``DIR/results.json`` (rerunning a seed replaces that seed's records), with a markdown table,
plots and an HTML report. Runs live in ``DIR/runs/seed<S>/<method>``; a finished run is not
trained again, an interrupted one resumes.

``--mrl-weights SPEC`` adds one more run, ``mrl-w``: the MRL model with per-prefix loss weights
(``log2``: 1 at the smallest prefix, +1 per doubling; ``full:K``: 1 each and K at the full size;
or G numbers), normalised to mean 1 so that only the share of each prefix changes, not the total
(which matters for SGD). ``mrl`` stays the paper's unweighted sum.

Budgets: ``small`` fits a 2-core CPU (a small CNN, few epochs, FF at 2/4/8/16); ``full`` is meant
for one GPU (a ResNet-18 with a small-image stem, D = 512, 12 epochs, FF at every prefix).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrl.io import atomic_write_json, check_output_dir_of

NAME = "reproduce"
HELP = "train MRL, MRL-E, FF and plain models with one recipe and compare them at every prefix"


@dataclass(frozen=True)
class Recipe:
    """One task x budget: the shared training config (as --set overrides) and the FF sizes."""

    overrides: tuple[str, ...]
    ff_sizes: tuple[int, ...]
    note: str
    probe_iter: int = 200  # L-BFGS iterations of the linear probes (1000 classes: slow on a CPU)
    probe_max_dim: int | None = None  # probes only at prefixes up to this size (None: all)


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
            "model.name=mlp",
            "model.width=1024",
            "model.dim=256",
            "model.nesting=8,16,32,64,128,256",
            "optim.name=adamw",
            "optim.lr=0.002",
            "epochs=6",
            "batch_size=256",
        ),
        (8, 16),
        "MLP (2 hidden layers of 1024, D=256) on 28x84 triples, AdamW lr 2e-3 cosine, 6 epochs "
        "of 60k fresh triples; linear probes only at 8 and 16 dims, 50 L-BFGS iterations (CPU "
        "budget: a 1000-class probe on 50k rows takes minutes per prefix; the small CNN "
        "averages over the whole image, loses which panel holds which item, learns little here)",
        probe_iter=50,
        probe_max_dim=16,
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
    parser.add_argument(
        "--mrl-weights",
        default=None,
        metavar="SPEC",
        help="also train mrl-w, MRL with per-prefix loss weights: log2 (1 at the smallest "
        "prefix, +1 per doubling), full:K (K at the full size, 1 elsewhere) or one number per "
        "prefix; normalised to mean 1",
    )
    parser.add_argument(
        "--probe-iter",
        type=int,
        default=None,
        metavar="N",
        help="L-BFGS iterations of the linear probes (default: the recipe's; 200 except "
        "fashion-mnist-1k small: 50)",
    )
    parser.add_argument("--no-progress", action="store_true")


def mrl_weights(spec: str, sizes: tuple[int, ...]) -> tuple[float, ...]:
    """Per-prefix loss weights for ``sizes`` (the nesting) from ``spec``, normalised to mean 1.

    ``log2``: ``1 + log2(m / m_1)`` (1, 2, 3, ... for a doubling nesting); ``full:K``: 1 at every
    prefix and K at the full size; otherwise one comma-separated non-negative number per prefix.
    Mean 1 keeps the sum of the weights at G, as in the paper's unweighted sum.
    """
    spec = spec.strip()
    if spec == "log2":
        raw = [1.0 + math.log2(m / sizes[0]) for m in sizes]
    elif spec.startswith("full:"):
        k = _number(spec[5:], spec)
        if k <= 0:
            raise ValueError(f"mrl_weights full:K needs K > 0, got mrl_weights={spec!r}")
        raw = [1.0] * (len(sizes) - 1) + [k]
    else:
        raw = [_number(v, spec) for v in spec.split(",")]
        if len(raw) != len(sizes):
            raise ValueError(
                f"mrl_weights must be log2, full:K or one weight per prefix {list(sizes)} "
                f"({len(sizes)}), got mrl_weights={spec!r} ({len(raw)} numbers)"
            )
        if any(w < 0 for w in raw) or sum(raw) == 0:
            raise ValueError(
                f"mrl_weights must be non-negative, not all zero, got mrl_weights={spec!r}"
            )
    mean = sum(raw) / len(raw)
    return tuple(w / mean for w in raw)


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(
            f"mrl_weights must be log2, full:K or comma-separated numbers, got mrl_weights={spec!r}"
        )
    return value


def methods(
    recipe: Recipe, weights: tuple[float, ...] | None = None
) -> list[tuple[str, tuple[str, ...]]]:
    """(run name, extra overrides) of every model: mrl, [mrl-w,] mrl-e, ff-m..., plain."""
    runs = [("mrl", ("model.mode=mrl",))]
    if weights is not None:
        listed = ",".join(repr(w) for w in weights)
        runs.append(("mrl-w", ("model.mode=mrl", f"model.nesting_weights={listed}")))
    runs.append(("mrl-e", ("model.mode=mrl-e",)))
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
    weights: str | None = None,
    probe_iter: int | None = None,
    log=print,
) -> list[dict[str, Any]]:
    """Train and evaluate every model of one seed; merge its records into ``out/results.json``.

    ``weights``: a `mrl_weights` spec; adds the run ``mrl-w`` (method ``mrl-w``).
    ``probe_iter``: L-BFGS iterations of the linear probes (default: the recipe's).
    """
    from mrl.config import load_config, refuse_overrides
    from mrl.data import load_task_for

    if (task, budget) not in RECIPES:
        raise ValueError(f"no recipe for task={task!r} budget={budget!r}")
    recipe = RECIPES[(task, budget)]
    probe_iter = _probe_iter(recipe, probe_iter)
    out = Path(out)
    runs_root = Path(runs) if runs is not None else out / "runs"
    recorded = _recorded(out / "results.json")  # seeds of one --out must share these settings
    _check_task(recorded, out / "results.json", task, budget)
    _check_centring(recorded, out / "results.json", center)
    _check_probe_iter(recorded, out / "results.json", probe_iter)
    _check_database(recorded, out / "results.json", task)
    refuse_overrides(overrides, {
        "seed": "use --seed (it names the run folder seedN and labels the records)",
        "model.mode": "reproduce trains every mode itself (choose runs with --only)",
    })
    base = (*recipe.overrides, f"seed={seed}", *overrides)
    config0 = load_config(None, list(base))
    w = None if weights is None else mrl_weights(weights, config0.model.get_nesting().sizes)
    _check_weight_spec(recorded, out / "results.json", weights)
    _check_out_recipe(out, config0)
    plan = methods(recipe, w)
    names = [name for name, _ in plan]
    _check_only(only, names)
    if runs is not None and not runs_root.is_dir():  # a typo must not start new trainings
        raise FileNotFoundError(
            f"--runs {str(runs)!r} is not a folder of trained runs (OUT/runs of an earlier call)"
        )
    if data_task is None:
        data_task = load_task_for(config0)
    # The recipe binds the --out from the start (a process of another recipe is refused before
    # it trains) and is released if this call fails before any records exist.
    claimed = _claim_out_recipe(out, config0)
    job = _Job(task, budget, seed, base, recipe, runs_root, runs, center, probe_iter, weights,
               data_task, progress, log)  # fmt: skip
    try:
        records: list[dict[str, Any]] = []
        for name, extra in plan:
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            recs = _run_one(job, name, extra)
            records += recs
            # merged as each run finishes: a job killed later (a timeout on a GPU) keeps these;
            # the recipe checked again under the lock (written there if it went missing)
            merge_records(out / "results.json", recs,
                          before=lambda: _save_out_recipe(out, config0))  # fmt: skip
            log(f"[{name}] seed {seed}: done in {time.perf_counter() - t0:.0f} s")
        return merge_records(out / "results.json", records)
    except BaseException:
        if claimed:
            _release_out_recipe(out)
        raise


@dataclass(frozen=True)
class _Job:
    """What every run of one `reproduce` call shares."""

    task: str
    budget: str
    seed: int
    base: tuple[str, ...]  # the recipe's overrides + seed + the user's --set
    recipe: Recipe
    runs_root: Path
    runs: str | Path | None  # --runs as given (None: runs live under --out)
    center: bool
    probe_iter: int
    weights: str | None
    data_task: Any
    progress: bool
    log: Callable[[str], Any]


def _run_one(job: _Job, name: str, extra: tuple[str, ...]) -> list[dict[str, Any]]:
    """Train run ``name`` if needed, evaluate it (or reuse its cached records); its records."""
    from mrl.commands.eval import compute_embeddings, evaluate_embeddings
    from mrl.config import load_config
    from mrl.records import save_records
    from mrl.train import CHECKPOINT, check_same_recipe, train

    run_dir = job.runs_root / f"seed{job.seed}" / name
    cached = _cache_path(run_dir, job.center, job.probe_iter, job.recipe)
    config = load_config(None, [*job.base, *extra])
    check_same_recipe(run_dir, config, "use another --out (or --runs) for another recipe")
    _check_other_seeds(job.runs_root, name, job.seed, config)
    # A checkpoint short of the recipe's epochs is trained on before the cache is looked at
    # (the cache would be the shorter model's); a cache without its checkpoint (deleted to
    # save space) is trusted as before.
    has_ckpt = (run_dir / CHECKPOINT).is_file()
    if (has_ckpt or not cached.is_file()) and _needs_training(run_dir, config, job.runs):
        job.log(f"[{name}] seed {job.seed}: training{' (resuming)' if has_ckpt else ''} ...")
        train(config, run_dir, resume=has_ckpt, progress=job.progress, task=job.data_task)
        for stale in run_dir.glob("records*.json"):  # evaluations of the shorter model
            stale.unlink()
    recs = json.loads(cached.read_text()) if cached.is_file() else None
    if recs is not None and not _stale_random_rows(recs, job.seed) and not _stale_database(
        recs, job.task
    ):
        job.log(f"[{name}] seed {job.seed}: evaluated before, reusing {cached}")
    else:
        e = compute_embeddings(run_dir, task=job.data_task)
        recs = evaluate_embeddings(
            e,
            center=job.center,
            method=name.split("-")[0] if name.startswith("ff") else name,
            dataset=job.task,
            seed=job.seed,
            budget=job.budget,
            run=name,
            probe_all=True,
            probe_iter=job.probe_iter,
            probe_max_dim=job.recipe.probe_max_dim,
            **({"mrl_weights": job.weights} if name == "mrl-w" else {}),
            **_database_tag(job.task),
        )
        save_records(cached, _tag_probes(recs, job.probe_iter))
    recs = _tag_probes(recs, job.probe_iter)  # also a cache written before the tag
    if name == "plain":
        recs = [*recs, _plain_as_ff(run_dir, config.model.dim, job.data_task, dataset=job.task,
                                    seed=job.seed, budget=job.budget,
                                    **_database_tag(job.task))]  # fmt: skip
    return recs


def _stale_random_rows(recs: list[dict[str, Any]], seed: int) -> bool:
    """A plain run's cached records whose random-coordinate rows were drawn with permutation 0
    whatever the seed (before `coords_seed` was recorded): re-evaluated for seeds other than 0,
    so one results file never mixes the two draws."""
    return seed != 0 and any(r["method"] == "random" and "coords_seed" not in r for r in recs)


def _check_only(only: tuple[str, ...] | None, names: list[str]) -> None:
    if only is not None and not only:
        raise ValueError(f"only must name at least one run among {names}, got {only!r}")
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ValueError(f"only must name runs among {names}, got {unknown}")


def _needs_training(run_dir: Path, config: Any, runs: str | Path | None) -> bool:
    """True when ``run_dir`` lacks a checkpoint of all the recipe's epochs (refused with --runs)."""
    from mrl.train import CHECKPOINT, load_checkpoint

    ckpt = run_dir / CHECKPOINT
    if ckpt.is_file() and load_checkpoint(ckpt)["epoch"] >= config.epochs:
        return False
    if runs is not None:  # --runs evaluates trained models; it never trains
        raise FileNotFoundError(
            f"--runs {str(runs)!r} has no fully trained {run_dir.relative_to(runs)} "
            "(checkpoint missing or short of the recipe's epochs); train it without "
            "--runs, or leave it out with --only"
        )
    return True


def _cache_path(run_dir: Path, center: bool, probe_iter: int, recipe: Recipe) -> Path:
    """Where one run's records are cached. Centred and uncentred evaluations, and probes with
    other than the recipe's iterations, are cached apart: all come from one trained model."""
    name = "records" + ("-center" if center else "")
    if probe_iter != recipe.probe_iter:
        name += f"-probe{probe_iter}"
    return run_dir / f"{name}.json"


def _check_other_seeds(runs_root: Path, name: str, seed: int, config) -> None:
    """Seeds are averaged together: refuse a run whose recipe differs from the same method's
    runs of other seeds in this folder (e.g. seed 1 with --set epochs=1 next to seed 0's 3)."""
    from mrl.train import seed_recipe_differences

    for saved in sorted(runs_root.glob(f"seed*/{name}/config.json")):
        if saved.parent.parent.name == f"seed{seed}":
            continue
        other = json.loads(saved.read_text())
        diffs = seed_recipe_differences(other, config)
        if diffs:
            raise ValueError(
                f"{saved.parent} was trained with another recipe ({'; '.join(diffs)}); the "
                "seeds of one --out share one recipe: use another --out for this one"
            )
        if other.get("epochs") != config.epochs:  # allowed while extending seed by seed
            warnings.warn(
                f"{saved.parent} has {other.get('epochs')} epochs, this run {config.epochs}: "
                "bring every seed to the same epochs before reading the claims",
                stacklevel=2,
            )


RECIPE_FILE = "recipe.json"  # the shared training config of an --out's seeds
LOCK_FILE = "results.json.lock"  # the lock of results.json and recipe.json (kept: see io)


def _check_task(recorded: list[dict[str, Any]], results: Path, task: str, budget: str) -> None:
    """Refuse to average records of another task or budget into one results file."""
    for key, value in (("dataset", task), ("budget", budget)):
        other = _other_value(recorded, key, value)
        if other is not None:
            raise ValueError(f"{results} holds records of {key}={other!r}, but this call has "
                             f"{key}={value!r}: write to another --out")


def _check_out_recipe(out: Path, config: Any) -> None:
    """Seeds of one --out are averaged together, wherever their runs were trained (--runs):
    refuse a shared recipe (every setting but the seed) other than the one ``out/recipe.json``
    keeps from the first call (`_save_out_recipe`). More epochs under a length-independent
    schedule are not refused (seeds extended one by one; `_check_other_seeds` warns while the
    runs differ)."""
    from mrl.train import seed_recipe_differences

    path = out / RECIPE_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    diffs = seed_recipe_differences(saved, config)
    if diffs:
        raise ValueError(f"{out} holds seeds of another recipe ({'; '.join(diffs)}; see "
                         f"{path.name}): the seeds of one --out share one recipe; use "
                         "another --out")


def _claim_out_recipe(out: Path, config: Any) -> bool:
    """Under the merge lock: check the --out's recipe and write it when there is none yet.
    True when this call wrote it (`_release_out_recipe` then undoes it on failure)."""
    from mrl.io import exclusive_lock

    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / LOCK_FILE):
        had = (out / RECIPE_FILE).is_file()
        _save_out_recipe(out, config)
    return not had


def _release_out_recipe(out: Path) -> None:
    """Remove the recipe this call wrote if no records exist (of this call or of another
    process of the same recipe): a call that failed before its first records, e.g. a batch
    larger than the data, must not bind the folder."""
    from mrl.io import exclusive_lock

    with exclusive_lock(out / LOCK_FILE):
        if not _recorded(out / "results.json"):
            (out / RECIPE_FILE).unlink(missing_ok=True)


def _save_out_recipe(out: Path, config: Any) -> None:
    """Keep the first call's shared recipe (all but the seed) for `_check_out_recipe` (which
    runs again first: another process may have kept its recipe since this call began)."""
    _check_out_recipe(out, config)
    if not (out / RECIPE_FILE).is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RECIPE_FILE,
                          {k: v for k, v in config.to_dict().items() if k != "seed"})


def _probe_iter(recipe: Recipe, probe_iter: int | None) -> int:
    """The probes' L-BFGS iterations: ``probe_iter``, or the recipe's when None."""
    probe_iter = recipe.probe_iter if probe_iter is None else probe_iter
    if probe_iter <= 0:
        raise ValueError(f"probe_iter must be positive, got probe_iter={probe_iter}")
    return probe_iter


def merge_records(results: Path, records: list[dict[str, Any]],
                  before: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Replace the (seed, run) records of ``records`` in ``results``; all records after it.

    Several processes may share one ``--out`` (``--only``): the read-modify-write happens under
    an exclusive lock on ``results.json.lock``, so no process drops another's records.
    ``before``: called under the lock first (it may refuse, and then nothing is merged).
    """
    from mrl.io import exclusive_lock
    from mrl.records import load_records, save_records

    results.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(results.with_name(results.name + ".lock")):
        if before is not None:
            before()
        done = {(r.get("seed"), r["run"]) for r in records}
        old = load_records(results) if results.is_file() else []
        old = [r for r in old if (r.get("seed"), r.get("run")) not in done]
        save_records(results, old + records)
    return old + records


def _plain_as_ff(run_dir: Path, dim: int, task: Any = None, **context: Any) -> dict[str, Any]:
    """The plain model is FF-D: its own head's test top-1 (the checkpoint's epoch's, which the
    training loop computes on the task's whole test split; computed from the model when no
    record of that epoch is found: a run trained with eval_test=false, or a metrics.jsonl that
    does not end at the checkpoint's epoch, e.g. a run killed between its two writes)."""
    from mrl.records import make_record
    from mrl.train import epoch_records, load_checkpoint

    records = epoch_records(run_dir, load_checkpoint(run_dir))
    last = records[-1] if records else {}
    acc = last.get("test_top1", {}).get(str(dim))
    if acc is None:
        from mrl.commands.eval import compute_embeddings

        e = compute_embeddings(run_dir, task=task)  # test_logits [1, N_test, C] for plain
        acc = 100.0 * (e.test_logits[0].argmax(-1) == e.test_labels).float().mean().item()
    source = "head of the plain model (= FF-D)"
    return make_record("ff", dim, "top1", acc, source=source, run="plain", **context)


def _recorded(results: Path) -> list[dict[str, Any]]:
    """The records ``results`` holds ([] before the first run)."""
    from mrl.records import load_records

    return load_records(results) if results.is_file() else []


def _other_value(recorded: list[dict[str, Any]], key: str, value: Any) -> Any | None:
    """A value of ``key`` in ``recorded`` other than ``value`` (the smallest), or None."""
    others = sorted({r[key] for r in recorded if key in r} - {value})
    return others[0] if others else None


def _check_weight_spec(recorded: list[dict[str, Any]], results: Path, weights: str | None) -> None:
    """Refuse to mix mrl-w records of two weight specs in one results file (one row each)."""
    other = None if weights is None else _other_value(recorded, "mrl_weights", weights)
    if other is not None:
        raise ValueError(
            f"{results} holds mrl-w records with mrl_weights={other!r}, but this call "
            f"has mrl_weights={weights!r}: write to another --out"
        )


def _tag_probes(records: list[dict[str, Any]], probe_iter: int) -> list[dict[str, Any]]:
    """Seeds are averaged per cell: probe records (probe_top1, and the top1 of plain / pca /
    random) say how their probes were fitted."""
    def probed(r: dict[str, Any]) -> bool:
        return r["metric"] == "probe_top1" or (
            r["metric"] == "top1" and r["method"] in ("plain", "pca", "random"))

    return [{**r, "probe_iter": probe_iter} if probed(r) else r for r in records]


def _check_probe_iter(recorded: list[dict[str, Any]], results: Path, probe_iter: int) -> None:
    """Refuse to average probes fitted with another number of L-BFGS iterations (`--probe-iter`)
    into one results file (records written before this check carry no ``probe_iter``)."""
    other = _other_value(recorded, "probe_iter", probe_iter)
    if other is not None:
        raise ValueError(
            f"{results} holds probes fitted with --probe-iter {other}, "
            f"but this call fits them with {probe_iter}: write to another --out (add --runs "
            f"{results.parent / 'runs'} to reuse the trained models)"
        )


def _database_tag(task: str) -> dict[str, Any]:
    """``db_draw`` on fashion-mnist-1k records: which database they were scored against (2: its
    own stream; the records before 2026-11-30 used seed 0's second training epoch)."""
    from mrl.data.fashion_mnist_1k import DB_DRAW

    return {"db_draw": DB_DRAW} if task == "fashion-mnist-1k" else {}


def _stale_database(recs: list[dict[str, Any]], task: str) -> bool:
    """Cached records of a run scored against the earlier fashion-mnist-1k database."""
    tag = _database_tag(task)
    return bool(tag) and any(r.get("db_draw") != tag["db_draw"] for r in recs)


def _check_database(recorded: list[dict[str, Any]], results: Path, task: str) -> None:
    """Refuse to merge records scored against another fashion-mnist-1k database."""
    if _stale_database([r for r in recorded if r.get("dataset") == task], task):
        raise ValueError(
            f"{results} holds fashion-mnist-1k records scored against the earlier database (seed "
            "0's second training epoch, before 2026-11-30); this version draws it apart: write "
            "to another --out (add --runs to reuse the trained models)"
        )


def _check_centring(recorded: list[dict[str, Any]], results: Path, center: bool) -> None:
    """Refuse to mix centred and uncentred retrieval records in one results file."""
    other = _other_value(recorded, "center", center)
    if other is not None:
        raise ValueError(
            f"{results} holds records evaluated with center={other}, but this call "
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


def _parse_only(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:  # an empty list must not mean "everything"
        raise ValueError(f"--only must name at least one run (e.g. mrl,ff-2), got {text!r}")
    return names


def run(args: argparse.Namespace) -> int:
    recipe = RECIPES[(args.task, args.budget)]
    # not the report files: an `mrl eval` folder holds them too, and its records would be
    # pooled with the seeds' (a reproduction writes its lock and recipe before any record)
    out = check_output_dir_of(args.out, "--out", ("runs", "claims.md", RECIPE_FILE, LOCK_FILE),
                              "a reproduction folder", foreign=("demo.md",))
    reproduce(
        args.task,
        args.budget,
        out,
        seed=args.seed,
        overrides=tuple(args.overrides),
        center=args.center,
        progress=not args.no_progress,
        only=_parse_only(args.only),
        runs=args.runs,
        weights=args.mrl_weights,
        probe_iter=args.probe_iter,
    )
    from mrl.io import exclusive_lock
    from mrl.records import load_records

    # Under the merge lock, from the file as it is now: another --only process merging between
    # our last merge and this report would lose its records to our older snapshot.
    with exclusive_lock(out / LOCK_FILE):
        records = load_records(out / "results.json")
        tables, claims = _write_report(args, recipe, records, out)
    print(tables + "\n\n" + claims)
    print(f"\nreport: {out / 'report.html'}; records: {out / 'results.json'}")
    return 0


def _write_report(args: argparse.Namespace, recipe: Recipe, records: list[dict[str, Any]],
                  out: Path) -> tuple[str, str]:
    """The report files and claims.md of ``records``; returns (tables, claims) as markdown."""
    from mrl.claims import check_claims, claims_markdown
    from mrl.commands.eval import probe_recipe
    from mrl.io import atomic_write_text

    seeds = sorted({r["seed"] for r in records})
    probe_iter = _probe_iter(recipe, args.probe_iter)  # as reproduce() resolved it
    notes = (
        f"{args.task}, budget {args.budget}: {recipe.note}. Seeds {seeds} (mean ± std over "
        "seeds where more than one). Values in percent. top1: trained heads (mrl, mrl-e, ff); "
        f"linear probe for plain / pca / random ({probe_recipe(probe_iter)}) Retrieval: "
        "test images against the training images, cosine on re-normalised prefixes"
        f"{' after centring (the training images mean subtracted)' if args.center else ''}."
    )
    specs = sorted({r["mrl_weights"] for r in records if "mrl_weights" in r})
    if specs:
        notes += f" mrl-w: MRL with per-prefix loss weights {specs[0]} (normalised to mean 1)."
    tables = write_tables(records, out, f"mrl reproduce {args.task} ({args.budget})", notes)
    claims = claims_markdown(check_claims(records, args.task, recipe.ff_sizes), seeds)
    atomic_write_text(out / "claims.md", claims + "\n")
    return tables, claims
