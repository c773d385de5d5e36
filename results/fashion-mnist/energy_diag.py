"""Why MRL's 1-NN trails the truncated plain model at 32-256 dims: where the norm sits.

For the 3 seeds' `mrl` and `plain` runs of the small-budget reproduction (their checkpoints),
embeds the 60k database and 10k test images once and records
- ``energy@m``: mean over database rows of ||z[:m]||^2 / ||z||^2 (how much of the squared norm,
  hence of a full-size cosine, the first m coordinates carry);
- ``1nn`` at 32/64/128/256 as `mrl eval` computes it (cosine on re-normalised prefixes), and
  ``1nn_std``: the same after standardising every coordinate by the database mean and std
  (each coordinate weighted equally in the cosine).
An evaluation diagnostic only: nothing is trained.

    python results/fashion-mnist/energy_diag.py RUNS_DIR   # RUNS_DIR/seed{0,1,2}/{mrl,plain}
"""

from __future__ import annotations

import sys
from pathlib import Path

from mrl.commands.eval import compute_embeddings
from mrl.evaluate import evaluate_labelled
from mrl.records import save_records

HERE = Path(__file__).resolve().parent
PREFIXES = (32, 64, 128, 256)


def records_for(run: Path, method: str, seed: int) -> list[dict]:
    e = compute_embeddings(run, "cpu")
    db, q = e.db.float(), e.test.float()  # [N, D], [Q, D]
    ctx = {"method": method, "seed": seed, "n_db": len(db), "n_queries": len(q)}
    norm2 = db.pow(2).sum(1)
    recs = [{**ctx, "prefix": m, "metric": "energy", "value": (db[:, :m].pow(2).sum(1) / norm2)
             .mean().item()} for m in (8, 16, 32, 64, 128)]  # fmt: skip
    mu, sd = db.mean(0), db.std(0) + 1e-6
    variants = {"1nn": (db, q), "1nn_std": ((db - mu) / sd, (q - mu) / sd)}
    for metric, (x_db, x_q) in variants.items():  # the 1-NN of `mrl eval`, every prefix at once
        nn = evaluate_labelled(x_db.numpy(), e.db_labels.numpy(), x_q.numpy(),
                               e.test_labels.numpy(), PREFIXES)  # fmt: skip
        recs += [{**ctx, "prefix": r["prefix"], "metric": metric, "value": 100.0 * r["value"]}
                 for r in nn if r["metric"] == "1nn"]  # fmt: skip
    return recs


def main() -> None:
    runs = Path(sys.argv[1])
    records = []
    for seed in (0, 1, 2):
        for method in ("mrl", "plain"):
            records += records_for(runs / f"seed{seed}" / method, method, seed)
            print(f"seed {seed} {method} done", flush=True)
    save_records(HERE / "energy_diag.json", records)


if __name__ == "__main__":
    main()
