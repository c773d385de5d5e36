"""Matryoshka fine-tuning of all-MiniLM-L6-v2 on one GPU in a few minutes; prints the table.

Pairs are made from the Cranfield corpus alone (title -> abstract; never its queries or
relevance judgments). The base model's prefixes (plain truncation and uncentred PCA) and the
fine-tuned model's prefixes are then evaluated on Cranfield's queries, every prefix in one pass.

    python benchmarks/gpu_text.py --data ../shared/data/cranfield --epochs 3 --batch-size 128
    python benchmarks/gpu_text.py ... --init-rotation pca   # start from the corpus PCA rotation
    # on the device machine (no internet, mrl not installed): see benchmarks/prepare_gpu_carry.py
    python3 benchmarks/gpu_text.py --data .gpu/text/cranfield --model .gpu/text/minilm-fp16 \
        --out /tmp/gpu-text --json "$OUT/gpu_text.json"

Prints each prefix's nDCG@10 as a fraction of its model's full-size value, with the full-size
nDCG@10 as the reference column, table last (absolute values at every prefix: --json).
A rerun into an --out that holds a finished model reuses it when its settings are these (a
call that failed in evaluation on a warm machine) and refuses otherwise, naming what differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # mrl, installed or not


def _check_reusable(info_file: Path, config, model: str) -> None:
    """Refuse to reuse a finished model trained with other settings (its table would be labelled
    with this call's settings): the device does not change the model."""
    from dataclasses import asdict

    info = json.loads(info_file.read_text(encoding="utf-8"))
    saved = dict(info.get("config") or {}, base_model=info.get("base_model"))
    now = dict(asdict(config), base_model=str(model))
    differ = [f"{k}: saved {saved.get(k)!r} vs now {now.get(k)!r}" for k in sorted(now)
              if k != "device" and saved.get(k) != now.get(k)]
    if differ:
        raise SystemExit(f"--out {info_file.parent} holds a model fine-tuned with other settings "
                         f"({'; '.join(differ)}): give another --out or delete it")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Cranfield folder (default: mrl's search order)")
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="runs/text/gpu-cranfield-ft", help="fine-tuned model folder")
    p.add_argument("--json", default=None, help="also write the records here (e.g. $OUT/...)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--init-rotation", default=None, help="'pca' or an adaptor .pt/.npy file")
    p.add_argument("--rotation-lr", type=float, default=None)
    args = p.parse_args()

    import torch

    from mrl.records import save_records
    from mrl.text.cranfield import load_cranfield
    from mrl.text.encoders import embedding_dim, encode, load_encoder
    from mrl.text.evaluation import evaluate_retrieval, relative_table
    from mrl.text.finetune import FinetuneConfig, default_nesting, finetune
    from mrl.text.pairs import pairs_from_titles

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; pass --device cpu to run (slowly) on CPU")
    ds = load_cranfield(args.data, download=False)
    pairs = pairs_from_titles(ds.titles, ds.bodies)
    config = FinetuneConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_seq_length=args.max_seq_length,
        seed=args.seed,
        device=args.device,
        init_rotation=args.init_rotation,
        rotation_lr=args.rotation_lr,
    )
    t0 = time.time()
    if (Path(args.out) / "mrl.json").is_file():
        # a rerun on a still-warm device machine (e.g. after a failure in evaluation): reuse the
        # finished model instead of failing on the existing --out, if it is this call's model
        _check_reusable(Path(args.out) / "mrl.json", config, args.model)
        print(f"reusing the fine-tuned model in {args.out} (delete it to train again)", flush=True)
        train_note = "reused from an earlier call"
    else:
        # resume="auto": a call cut short by the device's time limit continues from its last
        # checkpoint (OUT.partial/) on a rerun while the machine is warm
        finetune(args.model, pairs, args.out, config, rotation_texts=ds.documents,
                 log=lambda s: print(s, file=sys.stderr, flush=True), resume="auto")
        train_note = f"{time.time() - t0:.0f} s"

    records = []
    for name, model in (("truncate", args.model), ("finetune", args.out)):
        enc = load_encoder(model, device=args.device)
        nesting = default_nesting(embedding_dim(enc))
        docs = encode(enc, ds.documents, batch_size=256, name="documents")
        queries = encode(enc, ds.queries, batch_size=256, name="queries")
        records += evaluate_retrieval(
            queries,
            docs,
            ds,
            nesting,
            method=name,
            pca=(name == "truncate"),
            context={
                "seed": args.seed,
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            },
        )
    save_records(os.path.join(args.out, "results.json"), records)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        save_records(args.json, records)
    print(f"fine-tuning: {len(pairs)} pairs, {args.epochs} epochs, {train_note}")
    print(relative_table(records, "ndcg@10"))


if __name__ == "__main__":
    main()
