"""How much BBC News' exact duplicate articles lift leave-one-out scores (a diagnostic).

BBC News holds 100 texts that appear twice (200 of 2225 rows, each pair with one label). In
leave-one-out retrieval (`mrl text compare --dataset bbc`) a query's own row is excluded but its
twin is not: the twin is an identical vector, ranked first at every prefix, so 1-NN, p@10 and
mAP@10 of those 200 queries are partly right by construction. This script encodes the corpus
once (cached) and evaluates the `truncate` and `pca` rows on all 2225 articles and on the 2125
distinct ones (the first copy of each text kept, in the loader's sorted order), and writes
``duplicates.json`` (tidy records with ``corpus``: ``all`` or ``distinct``) and a table.

    python results/bbc/duplicates.py --cache runs/text/cache
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from mrl.records import save_records
from mrl.text.bbc import load_bbc
from mrl.text.encoders import encode_cached, load_encoder, resolve_model_path
from mrl.text.evaluation import evaluate_corpus
from mrl.text.finetune import default_nesting

HERE = Path(__file__).resolve().parent


def distinct_rows(documents: list[str]) -> list[int]:
    """Rows whose text has not appeared in an earlier row."""
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(documents):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="embedding cache folder")
    parser.add_argument("--out", default=str(HERE / "duplicates.json"))
    args = parser.parse_args()
    corpus = load_bbc()
    docs = corpus.documents
    counts = Counter(docs)
    twins = [i for i, t in enumerate(docs) if counts[t] > 1]
    mixed = {t for t in counts if counts[t] > 1 and len({corpus.labels[i] for i, u in
                                                          enumerate(docs) if u == t}) > 1}
    print(f"{len(docs)} articles, {len(counts)} distinct texts; {len(twins)} rows share their "
          f"text with another row; texts with mixed labels: {len(mixed)}")
    model = resolve_model_path("default")
    emb = encode_cached(model, docs, args.cache, encoder=load_encoder(model), name="documents")
    nesting = default_nesting(emb.shape[1])
    keep = distinct_rows(docs)
    sub = replace(corpus, titles=[corpus.titles[i] for i in keep],
                  bodies=[corpus.bodies[i] for i in keep], labels=corpus.labels[keep])
    records = []
    for name, c, x in (("all", corpus, emb), ("distinct", sub, emb[np.asarray(keep)])):
        for rec in evaluate_corpus(x, c, nesting, method="truncate", pca=True,
                                   context={"corpus": name}):
            records.append(rec)
    save_records(args.out, records)
    value = {(r["method"], r["metric"], r["prefix"], r["corpus"]): r["value"] for r in records}
    print("| method | metric | corpus | " + " | ".join(map(str, nesting.sizes)) + " |")
    print("|---|---|---|" + "---|" * len(nesting.sizes))
    for method in ("truncate", "pca"):
        for metric in ("1nn", "p@10", "map@10"):
            for name in ("all", "distinct"):
                cells = [f"{100 * value[(method, metric, m, name)]:.2f}" for m in nesting.sizes]
                print(f"| {method} | {metric} | {name} | " + " | ".join(cells) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
