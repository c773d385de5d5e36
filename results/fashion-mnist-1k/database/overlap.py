"""Seed 0 of the fashion-mnist-1k small recipe (MRL and plain): 1-NN / mAP@10 at every prefix
against the old database (generator seed 1 = seed 0's 2nd training epoch) and the new one."""
import dataclasses, json, sys, time
from pathlib import Path
from mrl.config import load_config
from mrl.train import train, CHECKPOINT
from mrl.data import load_task_for
from mrl.data.fashion_mnist_1k import fixed_triples
from mrl.commands.eval import compute_embeddings
from mrl.evaluate import evaluate_labelled

cfg0 = load_config("configs/fashion-mnist-1k-mlp.json", ["seed=0"])
task = load_task_for(cfg0)
train_base = task.train.base
old_db = fixed_triples(train_base, 50000, 1, "fashion-mnist-1k/db")
out = {}
for mode in ("mrl", "plain"):
    cfg = load_config("configs/fashion-mnist-1k-mlp.json", [f"model.mode={mode}", "seed=0"])
    run = Path(f"/tmp/fm1k/{mode}")
    t0 = time.time()
    if not (run / CHECKPOINT).is_file() or json.loads((run / "config.json").read_text()) is None:
        train(cfg, run, progress=False, task=task, resume=(run / CHECKPOINT).is_file())
    print(mode, "trained", round(time.time() - t0), "s", flush=True)
    for name, t in (("new", task), ("old", dataclasses.replace(task, db=old_db))):
        e = compute_embeddings(run, task=t)
        recs = evaluate_labelled(e.db, e.db_labels, e.test, e.test_labels, e.nesting, k=10)
        out[f"{mode}/{name}"] = {f"{r['metric']}@{r['prefix']}": round(100 * r["value"], 2)
                                 for r in recs if r["metric"] in ("1nn", "map@10")}
        print(mode, name, out[f"{mode}/{name}"], flush=True)
Path("/tmp/fm1k/overlap.json").write_text(json.dumps(out, indent=1))
