"""Blind choice of the Cranfield fine-tuning setting, then three seeds of it on the test queries.

``select``: every setting of GRID (fixed before any run) x seeds 0/1/2, a frozen-encoder fine-tune
from the PCA rotation trained on 80% of the corpus's title -> body pairs; each held-out title
retrieves its body among all 1398 bodies (nDCG@10 at every prefix, `FinetuneConfig.val_fraction`).
No Cranfield query or relevance judgment is used. The rule, fixed before any run:
  1. keep the settings whose validation full-size nDCG@10 is >= the base model's on every seed;
  2. among them take the highest minimum over seeds of (64-dim nDCG@10 / own full size);
  3. ties (within 0.1 point): the smaller distill weight.
Writes ``finetune_select.json``: records (method ``base`` / ``finetune``, prefix, metric
``ndcg@10``, value) of every run's validation numbers at 64 dims and full size, with the run's
``setting``, ``seed`` and ``config``; the chosen setting's records carry ``chosen: true``.

``final``: the chosen setting on all pairs, seeds 0/1/2, evaluated on Cranfield's queries
(`compare_methods`, method ``finetune``); writes ``finetune_seeds.json`` (records with a ``seed``
and ``setting`` context) and prints the relative table per seed.

``diagnose`` (run after ``final``, never used to choose): every other setting of GRID on all
pairs, seeds 0/1/2, on Cranfield's queries, to see whether the validation ranking of settings
matches the test ranking; writes ``finetune_grid_test.json``.

``select-cv`` (third round, cross-fitting; this rule was written and committed before any of its
runs, but after the second round's Cranfield numbers had been seen, so the round is not fully
blind): the same GRID, seeds 0/1/2, and 5 folds (``val_fraction=0.2``, ``val_fold`` 0..4: the
fixed permutation of the 1398 title -> body pairs cut into 5 folds of 279-280; fold 0 is the
``select`` split). Each of the 75 runs trains on 4 folds and validates on the fifth (each held-out
title retrieves its body among all 1398 bodies, nDCG@10 at every prefix). For each (setting,
seed) the held-out titles of the 5 folds are pooled: the validation nDCG@10 at a prefix is the
mean over all 1398 titles, each scored by the model that did not train on it (= the fold
averages weighted by fold size); the base model's is pooled the same way. The rule, the same as
``select``'s, on the pooled numbers:
  1. keep the settings whose pooled full-size nDCG@10 is >= the base model's on every seed;
  2. among them take the highest minimum over seeds of (pooled 64-dim / pooled own full size);
  3. ties (within 0.1 point): the smaller distill weight (then GRID order).
No Cranfield query or relevance judgment is read. Writes ``finetune_select_cv.json``: every
run's validation records (method ``base`` / ``finetune``, every prefix, ``ndcg@10``, with
``n_queries``, ``setting``, ``seed``, ``fold``, ``config``) and the pooled ones (``split``
``validation_pooled``, ``fold`` None); the chosen setting's records carry ``chosen: true``.
It changes neither ``results.json`` nor ``finetune_select.json``. Runs whose folder already holds
``validation.json`` from the same config are read, not retrained (the job can be resumed);
``cv-table`` prints the pooled table of the (setting, seed) pairs whose 5 folds are done.
Run order (changed after 12 runs, for time; not the rule): seed-major, with fold 0 of seeds 1
and 2 last, because fold 0 is ``select``'s split: seed 0's fold-0 runs here reproduced
finetune_select.json's numbers exactly, so if the job must stop early, ``cv-finish`` applies the
rule with the missing fold-0 runs' 64-dim and full-size numbers taken from that file (marked
``source: finetune_select.json``).

Usage (from the repository root):
    python results/cranfield/finetune_select.py select --work /tmp/mrl_select
    python results/cranfield/finetune_select.py final --work /tmp/mrl_select
    python results/cranfield/finetune_select.py diagnose --work /tmp/mrl_select
    python results/cranfield/finetune_select.py select-cv --work /tmp/mrl_select   # 75 runs
    python results/cranfield/finetune_select.py cv-table --work /tmp/mrl_select    # progress
    python results/cranfield/finetune_select.py cv-finish --work /tmp/mrl_select   # if stopped
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mrl.records import load_records, save_records
from mrl.text.evaluation import compare_methods, load_text_dataset, relative_table
from mrl.text.finetune import FinetuneConfig, finetune
from mrl.text.pairs import pairs_from_titles

HERE = Path(__file__).resolve().parent
CACHE = "/tmp/mrl_text_cache"
SEEDS = (0, 1, 2)
CV_FRACTION, CV_FOLDS = 0.2, 5  # select-cv: n_folds(0.2) = 5 folds, each held out once
COMMON = dict(
    init_rotation="pca", train_encoder=False, batch_size=32, max_seq_length=128,
    distill_batch=128, distill_negatives=128,
)  # fmt: skip
GRID: dict[str, dict[str, Any]] = {
    "lr1e-3_e15": dict(lr=1e-3, epochs=15),  # the earlier setting (chosen on test queries)
    "lr1e-3_e15_d0.5": dict(lr=1e-3, epochs=15, distill=0.5),
    "lr1e-3_e15_d2": dict(lr=1e-3, epochs=15, distill=2.0),
    "lr1e-3_e15_d2_self": dict(lr=1e-3, epochs=15, distill=2.0, distill_teacher="self"),
    "lr2e-3_e15_d2": dict(lr=2e-3, epochs=15, distill=2.0),
}


def _pairs() -> tuple[list, list[str]]:
    ds = load_text_dataset("cranfield")  # only titles, bodies and documents are read
    return pairs_from_titles(ds.titles, ds.bodies), list(ds.documents)


def _ndcg(records: list[dict[str, Any]], method: str) -> dict[int, float]:
    return {r["prefix"]: r["value"] for r in records if r["method"] == method and
            r["metric"] == "ndcg@10"}  # fmt: skip


def select(work: Path) -> str:
    pairs, docs = _pairs()
    runs = []
    for name, setting in GRID.items():
        for seed in SEEDS:
            cfg = FinetuneConfig(**COMMON, **setting, seed=seed, val_fraction=0.2)
            out = work / f"{name}_s{seed}"
            finetune("default", pairs, out, cfg, log=lambda s: None, rotation_texts=docs,
                     cache_dir=CACHE, resume="auto")  # fmt: skip
            recs = load_records(out / "validation.json")
            base, ft = _ndcg(recs, "base"), _ndcg(recs, "finetune")
            run = {"setting": name, "seed": seed, "base_full": base[384], "full": ft[384],
                   "at64": ft[64], "ratio64": ft[64] / ft[384]}  # fmt: skip
            print(json.dumps(run), flush=True)
            runs.append(run)
    choice = _choose(runs)
    save_records(HERE / "finetune_select.json", selection_records(runs, choice))
    print("choice:", choice)
    return choice


def selection_records(runs: list[dict[str, Any]], choice: str) -> list[dict[str, Any]]:
    """The runs of `select` in the project's record format (validation nDCG@10)."""
    records = []
    for run in runs:
        name = run["setting"]
        ctx = {"setting": name, "seed": run["seed"], "split": "validation",
               "config": {**COMMON, **GRID[name], "val_fraction": 0.2},
               "chosen": name == choice}  # fmt: skip
        for method, prefix, value in (("base", 384, run["base_full"]),
                                      ("finetune", 64, run["at64"]),
                                      ("finetune", 384, run["full"])):  # fmt: skip
            records.append({"method": method, "prefix": prefix, "metric": "ndcg@10",
                            "value": value, **ctx})  # fmt: skip
    return records


def _chosen() -> str:
    return next(r["setting"] for r in load_records(HERE / "finetune_select.json") if r["chosen"])


def _choose(runs: list[dict[str, Any]]) -> str:
    scores = []
    for name in GRID:
        rs = [r for r in runs if r["setting"] == name]
        if all(r["full"] >= r["base_full"] for r in rs):
            scores.append((min(r["ratio64"] for r in rs), -GRID[name].get("distill", 0.0), name))
    if not scores:
        raise SystemExit("no setting keeps the base model's validation full size on every seed")
    best = max(s[0] for s in scores)
    near = [s for s in scores if s[0] >= best - 1e-3]  # ties: the smaller distill weight
    return max(near, key=lambda s: s[1])[2]


def _cv_run(work: Path, pairs: list, docs: list[str], name: str, seed: int, fold: int) -> list:
    """One cross-fitting run (trained unless its folder already has it): validation records."""
    cfg = FinetuneConfig(**COMMON, **GRID[name], seed=seed, val_fraction=CV_FRACTION,
                         val_fold=fold)  # fmt: skip
    out = work / f"cv_{name}_s{seed}_f{fold}"
    meta = out / "mrl.json"
    done = (out / "validation.json").is_file() and meta.is_file() and (
        json.loads(meta.read_text()).get("config") == asdict(cfg))  # fmt: skip
    if not done:
        finetune("default", pairs, out, cfg, log=lambda s: None, rotation_texts=docs,
                 cache_dir=CACHE, resume="auto")  # fmt: skip
    ctx = {
        "setting": name,
        "seed": seed,
        "fold": fold,
        "split": "validation",
        "config": {**COMMON, **GRID[name], "val_fraction": CV_FRACTION, "val_fold": fold},
    }
    return [
        {
            "method": r["method"],
            "prefix": r["prefix"],
            "metric": "ndcg@10",
            "value": r["value"],
            "n_queries": r["n_queries"],
            **ctx,
        }
        for r in load_records(out / "validation.json")
        if r["metric"] == "ndcg@10"
    ]


def pool_folds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pooled records per (setting, seed, method, prefix) of the (setting, seed) with all folds.

    Value: the mean over every held-out query of the folds (fold means weighted by n_queries).
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["setting"], r["seed"], r["method"], r["prefix"]), []).append(r)
    pooled = []
    for (name, seed, method, prefix), rs in groups.items():
        if sorted(r["fold"] for r in rs) != list(range(CV_FOLDS)):
            continue  # incomplete: not every title held out yet
        n = sum(r["n_queries"] for r in rs)
        value = sum(r["value"] * r["n_queries"] for r in rs) / n
        pooled.append({"method": method, "prefix": prefix, "metric": "ndcg@10", "value": value,
                       "n_queries": n, "setting": name, "seed": seed, "fold": None,
                       "split": "validation_pooled",
                       "config": {**COMMON, **GRID[name], "val_fraction": CV_FRACTION,
                                  "folds": CV_FOLDS}})  # fmt: skip
    return pooled


def _pooled_runs(pooled: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per (setting, seed) in `_choose`'s form, from pooled records."""
    val = {(r["setting"], r["seed"], r["method"], r["prefix"]): r["value"] for r in pooled}
    runs = []
    for name, seed in sorted({(k[0], k[1]) for k in val}, key=lambda k: (list(GRID).index(k[0]),
                                                                         k[1])):  # fmt: skip
        full, at64 = val[name, seed, "finetune", 384], val[name, seed, "finetune", 64]
        runs.append({"setting": name, "seed": seed, "base_full": val[name, seed, "base", 384],
                     "full": full, "at64": at64, "ratio64": at64 / full})  # fmt: skip
    return runs


def cv_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: pooled validation full size and 64-dim share per seed, their min, rule 1."""
    rows = ["| setting | seeds | pooled full size | pooled 64 / own full | min 64 share | "
            "full >= base on every seed |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name in GRID:
        rs = [r for r in runs if r["setting"] == name]
        if not rs:
            continue
        full = " / ".join(f"{r['full']:.4f}" for r in rs)
        share = " / ".join(f"{100 * r['ratio64']:.2f}" for r in rs)
        ok = all(r["full"] >= r["base_full"] for r in rs)
        seeds = ",".join(str(r["seed"]) for r in rs)
        rows.append(
            f"| `{name}` | {seeds} | {full} | {share} | "
            f"{100 * min(r['ratio64'] for r in rs):.2f} | {'yes' if ok else 'no'} |"
        )
    base = {r["base_full"] for r in runs}
    return "\n".join(rows) + f"\nbase pooled full size: {sorted(base)}"


def _cv_order() -> list[tuple[int, int]]:
    """(seed, fold) in run order: seed-major, but fold 0 of seeds 1 and 2 last.

    Fold 0 is the second round's split (`select`), whose runs already gave the 64-dim and
    full-size numbers (finetune_select.json; seed 0's fold 0 here reproduced them exactly), so
    if the job is stopped early those runs are the ones `cv-finish` can take from there.
    """
    order = [(seed, fold) for seed in SEEDS for fold in range(CV_FOLDS)]
    return [k for k in order if k[0] == SEEDS[0] or k[1] > 0] + [(seed, 0) for seed in SEEDS[1:]]


def select_cv(work: Path) -> str:
    pairs, docs = _pairs()
    records: list[dict[str, Any]] = []
    for seed, fold in _cv_order():
        for name in GRID:
            records += _cv_run(work, pairs, docs, name, seed, fold)
            save_records(work / "select_cv_partial.json", records)
            print(f"done {name} seed {seed} fold {fold}", flush=True)
    return _finish_cv(records)


def _finish_cv(records: list[dict[str, Any]]) -> str:
    """Pool, apply the rule, write finetune_select_cv.json; the choice ("" when incomplete)."""
    pooled = pool_folds(records)
    runs = _pooled_runs(pooled)
    if len(runs) < len(GRID) * len(SEEDS):  # stopped early: the records so far, no choice
        save_records(HERE / "finetune_select_cv.json", [{**r, "chosen": False}
                                                        for r in records + pooled])  # fmt: skip
        print(cv_table(runs))
        print(f"partial: {len(runs)} of {len(GRID) * len(SEEDS)} (setting, seed): no choice")
        return ""
    choice = _choose(runs)
    out = [{**r, "chosen": r["setting"] == choice} for r in records + pooled]
    save_records(HERE / "finetune_select_cv.json", out)
    print(cv_table(runs))
    print("choice:", choice)
    return choice


def _fold0_from_select(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold-0 records missing here, taken from the second round (finetune_select.json).

    Only what that file holds (base full size, finetune at 64 and full size; 280 held-out
    titles), each marked ``source: finetune_select.json``.
    """
    have = {(r["setting"], r["seed"]) for r in records if r["fold"] == 0}
    fill = []
    for r in load_records(HERE / "finetune_select.json"):
        if (r["setting"], r["seed"]) in have:
            continue
        ctx = {"setting": r["setting"], "seed": r["seed"], "fold": 0, "split": "validation",
               "config": {**COMMON, **GRID[r["setting"]], "val_fraction": CV_FRACTION,
                          "val_fold": 0}, "source": "finetune_select.json"}  # fmt: skip
        fill.append({"method": r["method"], "prefix": r["prefix"], "metric": "ndcg@10",
                     "value": r["value"], "n_queries": 280, **ctx})  # fmt: skip
    return fill


def cv_finish(work: Path) -> None:
    """The rule on the runs done so far, fold 0 of missing runs from the second round."""
    records = load_records(work / "select_cv_partial.json")
    _finish_cv(records + _fold0_from_select(records))


def cv_progress(work: Path) -> None:
    records = load_records(work / "select_cv_partial.json")
    print(f"{len({(r['setting'], r['seed'], r['fold']) for r in records})} runs done")
    print(cv_table(_pooled_runs(pool_folds(records))))
    print("with fold 0 from finetune_select.json where missing (64 and full size only):")
    print(cv_table(_pooled_runs(pool_folds(records + _fold0_from_select(records)))))


def _test_runs(work: Path, names: list[str], prefix: str) -> list[dict[str, Any]]:
    """Each named setting on all pairs, seeds 0/1/2, scored on Cranfield's queries."""
    pairs, docs = _pairs()
    records = []
    for name in names:
        for seed in SEEDS:
            cfg = FinetuneConfig(**COMMON, **GRID[name], seed=seed)
            out = work / f"{prefix}_{name}_s{seed}"
            finetune("default", pairs, out, cfg, log=lambda s: None, rotation_texts=docs,
                     cache_dir=CACHE, resume="auto")  # fmt: skip
            recs = compare_methods("cranfield", finetuned=out, cache_dir=CACHE,
                                   methods=["finetune"], log=lambda s: None)  # fmt: skip
            recs = [{**r, "seed": seed, "setting": name, "model": str(out)} for r in recs]
            print(f"{name} seed {seed}\n{relative_table(recs, 'ndcg@10')}", flush=True)
            records += recs
    return records


def final(work: Path) -> None:
    choice = _chosen()
    save_records(HERE / "finetune_seeds.json", _test_runs(work, [choice], "final"))


def diagnose(work: Path) -> None:
    choice = _chosen()
    others = [name for name in GRID if name != choice]
    save_records(HERE / "finetune_grid_test.json", _test_runs(work, others, "diag"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    phases = ("select", "final", "diagnose", "select-cv", "cv-table", "cv-finish")
    p.add_argument("phase", choices=phases)
    p.add_argument("--work", type=Path, required=True, help="folder for the model folders")
    args = p.parse_args()
    phases = {"select": select, "final": final, "diagnose": diagnose, "select-cv": select_cv,
              "cv-table": cv_progress, "cv-finish": cv_finish}  # fmt: skip
    phases[args.phase](args.work)


if __name__ == "__main__":
    main()
