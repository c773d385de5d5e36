"""Make frozen embeddings Matryoshka after the fact with an orthogonal adaptor.

You have embeddings from any source (an API, a model you cannot fine-tune) as a numpy array
[N, D]. `mrl.text.adaptor.OrthogonalAdaptor` learns a rotation R [D, D] on the corpus alone (no
queries, no labels) so that prefixes of x @ R keep the ranking of full-size search; full-size
cosines are unchanged exactly. This script compares, at several prefixes m, the recall@10 of
plain truncation x[:, :m], of the adaptor's starting point (uncentred PCA, 0 steps) and of the
learned adaptor, each against exact full-size search (`mrl.retrieval.exact_search`).

Default data: synthetic embeddings whose information is spread over all D coordinates (MRL-like
rows from `mrl.retrieval.synthetic.mrl_like`, then a random rotation, as a frozen model gives).
On such Gaussian clusters the PCA start already does most of the work; on real text embeddings
the learned steps add more (Cranfield and BBC tables in docs/text.md).

Run:
    python examples/frozen_embeddings_adaptor.py                 # ~30 s on a CPU
    python examples/frozen_embeddings_adaptor.py --quick         # a few seconds (the tests)
    python examples/frozen_embeddings_adaptor.py --model default --texts my_texts.txt
        # one text per line, encoded with sentence-transformers ('default': all-MiniLM-L6-v2,
        # offline; needs the `text` extra); every 10th line is a query, the rest the corpus
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from mrl.records import make_record, to_markdown
from mrl.retrieval import exact_search
from mrl.retrieval.synthetic import mrl_like
from mrl.retrieval.tune import recall_at_k
from mrl.text.adaptor import AdaptorConfig, OrthogonalAdaptor

K = 10


def synthetic_embeddings(n: int, q: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """corpus [N, D], queries [Q, D]: shared clusters, energy spread over every coordinate."""
    docs, _ = mrl_like(n, dim, clusters=n // 20, decay=1.0, seed=seed)
    queries, _ = mrl_like(q, dim, clusters=n // 20, decay=1.0, seed=seed + 1)
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))  # [D, D]
    rotation = rotation.astype(np.float32)
    return docs @ rotation, queries @ rotation


def text_embeddings(model: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode the lines of ``path`` once: every 10th line a query [Q, D], the others [N, D]."""
    from mrl.text.encoders import encode, load_encoder

    lines = [t.strip() for t in open(path, encoding="utf-8") if t.strip()]
    emb = encode(load_encoder(model), lines, name=path)  # [N + Q, D]
    is_query = np.arange(len(lines)) % 10 == 9
    return emb[~is_query], emb[is_query]


def recall_by_prefix(docs: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                     prefixes: Sequence[int]) -> list[float]:  # fmt: skip
    """recall@K at each prefix m of cosine search (prefix re-normalised) against ``truth``."""
    return [recall_at_k(exact_search(docs, queries, K, dims=m)[1], truth) for m in prefixes]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="synthetic corpus rows N (5000; quick 2000)")
    p.add_argument("--queries", type=int, default=None, help="synthetic queries Q (500; quick 200)")
    p.add_argument("--dim", type=int, default=None, help="embedding size D (256; quick 128)")
    p.add_argument("--steps", type=int, default=None, help="adaptor steps (200; quick 60)")
    p.add_argument("--model", default=None, help="sentence-transformers model ('default', path)")
    p.add_argument("--texts", default=None, help="with --model: a text file, one text a line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run (seconds on a CPU)")
    args = p.parse_args(argv)
    if (args.model is None) != (args.texts is None):
        p.error("--model and --texts go together")
    sizes = {"n": (5000, 2000), "queries": (500, 200), "dim": (256, 128), "steps": (200, 60)}
    for name, (full, quick) in sizes.items():  # an option given explicitly wins over --quick
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.model:
        docs, queries = text_embeddings(args.model, args.texts)
    else:
        docs, queries = synthetic_embeddings(args.n, args.queries, args.dim, args.seed)
    d = docs.shape[1]
    prefixes = [m for m in (8, 16, 32, 64) if m < d] + [d]
    truth = exact_search(docs, queries, K)[1]  # [Q, K]: full-size exact search, the target
    pca = OrthogonalAdaptor.fit(docs, AdaptorConfig(steps=0))  # the adaptor's starting rotation
    adaptor = OrthogonalAdaptor.fit(docs, AdaptorConfig(steps=args.steps, seed=args.seed))
    records = []
    for method, (x, q) in {
        "truncate": (docs, queries),
        "pca": (pca.transform(docs), pca.transform(queries)),
        "adaptor": (adaptor.transform(docs), adaptor.transform(queries)),  # [N, D], [Q, D]
    }.items():
        for m, r in zip(prefixes, recall_by_prefix(x, q, truth, prefixes)):
            records.append(make_record(method, m, f"recall@{K}", r))
    print(f"N={len(docs)} corpus, Q={len(queries)} queries, D={d}; recall@{K} of prefix search "
          "vs full-size exact search (columns: prefix m)")  # fmt: skip
    print(to_markdown(records))
    return records


if __name__ == "__main__":
    main()
