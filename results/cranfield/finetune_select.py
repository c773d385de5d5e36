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

Usage (from the repository root):
    python results/cranfield/finetune_select.py select --work /tmp/mrl_select
    python results/cranfield/finetune_select.py final --work /tmp/mrl_select
    python results/cranfield/finetune_select.py diagnose --work /tmp/mrl_select
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mrl.records import load_records, save_records
from mrl.text.evaluation import compare_methods, load_text_dataset, relative_table
from mrl.text.finetune import FinetuneConfig, finetune
from mrl.text.pairs import pairs_from_titles

HERE = Path(__file__).resolve().parent
CACHE = "/tmp/mrl_text_cache"
SEEDS = (0, 1, 2)
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
                     cache_dir=CACHE)  # fmt: skip
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


def _test_runs(work: Path, names: list[str], prefix: str) -> list[dict[str, Any]]:
    """Each named setting on all pairs, seeds 0/1/2, scored on Cranfield's queries."""
    pairs, docs = _pairs()
    records = []
    for name in names:
        for seed in SEEDS:
            cfg = FinetuneConfig(**COMMON, **GRID[name], seed=seed)
            out = work / f"{prefix}_{name}_s{seed}"
            finetune("default", pairs, out, cfg, log=lambda s: None, rotation_texts=docs,
                     cache_dir=CACHE)  # fmt: skip
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
    p.add_argument("phase", choices=("select", "final", "diagnose"))
    p.add_argument("--work", type=Path, required=True, help="folder for the model folders")
    args = p.parse_args()
    {"select": select, "final": final, "diagnose": diagnose}[args.phase](args.work)


if __name__ == "__main__":
    main()
