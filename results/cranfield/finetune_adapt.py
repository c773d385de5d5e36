"""Fine-tune, then re-order post hoc (``--adapt-steps 200``): one declared pipeline, 3 seeds.

Declared before any of its runs (this file was committed first; nothing below is tuned):
- the fine-tune is the blind choice of `finetune_select.py` (``lr1e-3_e15_d0.5``: PCA start,
  frozen encoder, 15 epochs of batch 32, lr 1e-3, distill 0.5 with 128 pseudo-queries and 128
  random documents, 128 training tokens) on the corpus's own title -> body pairs;
- then ``adapt_steps=200``: the orthogonal adaptor of the ``adapt`` row (its default settings,
  200 steps as in Cranfield's ``adapt`` row, seed = the fine-tune's seed) fitted on the
  fine-tuned model's embeddings of the corpus documents and folded into its last layer
  (`mrl.text.reorder`). A rotation: the fine-tuned full size is unchanged, only prefixes move;
- seeds 0, 1, 2 on Cranfield and on BBC News; every run is reported, whatever it gives. No
  Cranfield query or judgment and no BBC label is used for training or for any choice.

Writes ``results/<dataset>/finetune_adapt_seeds.json`` (records of every seed, method
``finetune+adapt``) and puts seed 0's records into ``results/<dataset>/results.json`` beside
the other methods (the ``finetune`` row stays the plain fine-tune).

    python results/cranfield/finetune_adapt.py --work /tmp/mrl_ftadapt

Second variant, ``--variant queries`` (declared after the first variant's results, committed
before any of its runs; method ``finetune+adapt-q``, ``finetune_adapt_q_seeds.json``): the
same, but the adaptor's pseudo-queries are the training pairs' queries (the titles, as the
fine-tuned model embeds them: ``adapt_pseudo_queries="queries"``) instead of the documents.
Hypothesis, from the first variant (16 dims up, 32-64 dims down on Cranfield): document
pseudo-queries keep document-to-document rankings, while search queries are short like titles.
Nothing else changes; every run is reported.

    python results/cranfield/finetune_adapt.py --work /tmp/mrl_ftadapt --variant queries

Third variant, ``--variant identity`` (declared after the second variant's results, committed
before any of its runs; method ``finetune+adapt-i``, ``finetune_adapt_i_seeds.json``): the
first variant (document pseudo-queries) but the adaptor starts from the identity, i.e. from the
fine-tuned model's own order, instead of the PCA of its corpus embeddings (``adapt_init``).
Why: both earlier variants started from that PCA, which throws away the order the Matryoshka
fine-tune had trained before refining it (found by reading the code after the second variant;
both earlier variants are re-run with ``adapt_init="pca"``, as they ran). Every run is reported.

    python results/cranfield/finetune_adapt.py --work /tmp/mrl_ftadapt --variant identity
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mrl.records import load_records, save_records
from mrl.text.evaluation import compare_methods, load_text_dataset, relative_table
from mrl.text.finetune import FinetuneConfig, finetune
from mrl.text.pairs import pairs_from_titles

RESULTS = Path(__file__).resolve().parent.parent
CACHE = "/tmp/mrl_text_cache"
SEEDS = (0, 1, 2)
SETTING = dict(
    init_rotation="pca", train_encoder=False, batch_size=32, max_seq_length=128, lr=1e-3,
    epochs=15, distill=0.5, distill_batch=128, distill_negatives=128, adapt_steps=200,
)  # fmt: skip
# variant -> (method label, records file, extra settings)
VARIANTS = {
    "documents": ("finetune+adapt", "finetune_adapt_seeds.json", {"adapt_init": "pca"}),
    "queries": ("finetune+adapt-q", "finetune_adapt_q_seeds.json",
                {"adapt_pseudo_queries": "queries", "adapt_init": "pca"}),
    "identity": ("finetune+adapt-i", "finetune_adapt_i_seeds.json", {"adapt_init": "identity"}),
}  # fmt: skip


def run(dataset: str, work: Path, variant: str) -> list[dict]:
    label, _, extra = VARIANTS[variant]
    ds = load_text_dataset(dataset)  # titles, bodies and documents only for training
    pairs = pairs_from_titles(ds.titles, ds.bodies)
    records = []
    for seed in SEEDS:
        out = work / (f"{dataset}_s{seed}" if variant == "documents" else
                      f"{dataset}_{variant}_s{seed}")  # fmt: skip
        cfg = FinetuneConfig(**SETTING, **extra, seed=seed)
        finetune("default", pairs, out, cfg, log=lambda s: None,
                 rotation_texts=list(ds.documents), cache_dir=CACHE, resume="auto")  # fmt: skip
        recs = compare_methods(dataset, finetuned=out, cache_dir=CACHE, methods=["finetune"],
                               finetune_label=label, log=lambda s: None)  # fmt: skip
        recs = [{**r, "seed": seed, "model": str(out)} for r in recs]
        metric = "p@10" if any(r["metric"] == "p@10" for r in recs) else "ndcg@10"
        print(f"{dataset} seed {seed}\n{relative_table(recs, metric)}", flush=True)
        records += recs
    return records


def report(dataset: str) -> None:
    """Rewrite ``results/<dataset>/``'s tables, plots and page from its results.json."""
    from mrl.report import write_report

    records = load_records(RESULTS / dataset / "results.json")
    metric = "p@10" if any(r["metric"] == "p@10" for r in records) else "ndcg@10"
    models = {r["method"]: r.get("model") for r in records}
    steps = {r.get("adaptor_steps") for r in records if r["method"] == "adapt"}
    variants = "; ".join(f"{label}: {models[label]} (variant {v!r})"
                         for v, (label, _, _) in VARIANTS.items() if label in models)  # fmt: skip
    notes = (
        f"Base model default (all-MiniLM-L6-v2); finetune: {models.get('finetune')}; "
        f"the same recipe with --adapt-steps 200: {variants}; seed 0 rows, other seeds: "
        "README.md and finetune_adapt*_seeds.json. Prefixes re-normalised "
        "(cosine). pca: uncentred PCA rotation fitted on the corpus; adapt: orthogonal "
        f"adaptor (seed 0, {', '.join(str(s) for s in sorted(steps))} steps) fitted on the "
        "corpus documents only."
    )
    write_report(records, RESULTS / dataset, title=f"mrl text compare: {dataset}", notes=notes,
                 sections=[(f"{metric} relative to full size", relative_table(records, metric))])
    print(relative_table(records, metric))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the model folders")
    p.add_argument("--datasets", default="cranfield,bbc")
    p.add_argument("--variant", choices=tuple(VARIANTS), default="documents")
    p.add_argument("--report-only", action="store_true", help="only rewrite the reports")
    args = p.parse_args()
    label, seeds_file, _ = VARIANTS[args.variant]
    for dataset in args.datasets.split(","):
        if not args.report_only:
            records = run(dataset, args.work, args.variant)
            save_records(RESULTS / dataset / seeds_file, records)
            main_file = RESULTS / dataset / "results.json"
            kept = [r for r in load_records(main_file) if r["method"] != label]
            save_records(main_file, kept + [r for r in records if r["seed"] == 0])
        report(dataset)


if __name__ == "__main__":
    main()
