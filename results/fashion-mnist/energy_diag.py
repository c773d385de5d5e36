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

import torch
import torch.nn.functional as F

from mrl.commands.eval import compute_embeddings
from mrl.records import save_records

HERE = Path(__file__).resolve().parent
PREFIXES = (32, 64, 128, 256)


def one_nn(db: torch.Tensor, db_y: torch.Tensor, q: torch.Tensor, q_y: torch.Tensor) -> float:
    """Top-1 accuracy (%) of cosine 1-NN; db [N, m], q [Q, m]."""
    db, q = F.normalize(db, dim=-1), F.normalize(q, dim=-1)
    hits = 0
    for i in range(0, len(q), 2000):  # [2000, N] similarity blocks
        hits += (db_y[(q[i : i + 2000] @ db.T).argmax(1)] == q_y[i : i + 2000]).sum().item()
    return 100.0 * hits / len(q)


def records_for(run: Path, method: str, seed: int) -> list[dict]:
    e = compute_embeddings(run, "cpu")
    db, q = e.db.float(), e.test.float()  # [N, D], [Q, D]
    ctx = {"method": method, "seed": seed, "n_db": len(db), "n_queries": len(q)}
    norm2 = db.pow(2).sum(1)
    recs = [{**ctx, "prefix": m, "metric": "energy", "value": (db[:, :m].pow(2).sum(1) / norm2)
             .mean().item()} for m in (8, 16, 32, 64, 128)]  # fmt: skip
    mu, sd = db.mean(0), db.std(0) + 1e-6
    zdb, zq = (db - mu) / sd, (q - mu) / sd
    for m in PREFIXES:
        raw = one_nn(db[:, :m], e.db_labels, q[:, :m], e.test_labels)
        std = one_nn(zdb[:, :m], e.db_labels, zq[:, :m], e.test_labels)
        recs += [{**ctx, "prefix": m, "metric": "1nn", "value": raw},
                 {**ctx, "prefix": m, "metric": "1nn_std", "value": std}]  # fmt: skip
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
