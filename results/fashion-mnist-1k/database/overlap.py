"""Seed 0 of the fashion-mnist-1k small recipe (MRL and plain): 1-NN / mAP@10 at every prefix
against the old database (generator seed 1 = seed 0's 2nd training epoch) and the new one.
Run from the repository root; writes overlap.json (records) beside this file."""
import dataclasses
import time
from pathlib import Path

from mrl.commands.eval import compute_embeddings
from mrl.config import load_config
from mrl.data import load_task_for
from mrl.data.fashion_mnist_1k import fixed_triples
from mrl.evaluate import evaluate_labelled
from mrl.records import make_record, save_records
from mrl.train import CHECKPOINT, train

cfg0 = load_config("configs/fashion-mnist-1k-mlp.json", ["seed=0"])
task = load_task_for(cfg0)
train_base = task.train.base
old_db = fixed_triples(train_base, 50000, 1, "fashion-mnist-1k/db")
records = []
for mode in ("mrl", "plain"):
    cfg = load_config("configs/fashion-mnist-1k-mlp.json", [f"model.mode={mode}", "seed=0"])
    run = Path(f"/tmp/fm1k/{mode}")
    t0 = time.time()
    if not (run / CHECKPOINT).is_file():
        train(cfg, run, progress=False, task=task)
    print(mode, "trained", round(time.time() - t0), "s", flush=True)
    for name, t, draw in (("new: its own stream", task, 2),
                          ("old: seed 0's second training epoch",
                           dataclasses.replace(task, db=old_db), 1)):
        e = compute_embeddings(run, task=t)
        for r in evaluate_labelled(e.db, e.db_labels, e.test, e.test_labels, e.nesting, k=10):
            if r["metric"] in ("1nn", "map@10"):  # percent, as the results tables
                records.append(make_record(mode, r["prefix"], r["metric"],
                                           round(100 * r["value"], 2), dataset="fashion-mnist-1k",
                                           seed=0, budget="small", database=name, db_draw=draw))
        print(mode, name, {(r["metric"], r["prefix"]): r["value"] for r in records
                           if r["method"] == mode and r["database"] == name}, flush=True)
save_records(Path(__file__).with_name("overlap.json"), records)
