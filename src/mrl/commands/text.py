"""`mrl text ...`: Matryoshka sentence embeddings by fine-tuning or after the fact.

- ``mrl text finetune --model default --corpus cranfield --out DIR``: Matryoshka contrastive
  fine-tuning on pairs from a JSONL file (``--pairs``) or made from a corpus without labels
  (title -> body); saves a sentence-transformers folder with ``mrl.json`` (its nesting).
- ``mrl text adapt --model default --corpus cranfield --out DIR``: a post-hoc orthogonal map
  (PCA start, listwise ranking objective) learned on the corpus embeddings; ``--embeddings X.npy``
  for frozen API embeddings instead of a model.
- ``mrl text compare --dataset cranfield --finetuned DIR --out results/cranfield``: the
  truncate / pca / adapt / finetune table at every prefix, written with `mrl.report`.
- ``mrl text encode --model M --corpus C --out X.npy``: embeddings once, with a JSON sidecar.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from mrl.commands._options import check_minimums
from mrl.io import (
    REPORT_FILES,
    WORKFLOW_FILES,
    atomic_output_dir,
    check_new_output_dir,
    check_output_dir_of,
    check_output_path,
)

if TYPE_CHECKING:  # numpy is imported where it is used: the CLI starts fast
    import numpy as np

NAME = "text"
HELP = "text embeddings: Matryoshka fine-tuning, post-hoc adaptor, encoding"

CORPORA = ("cranfield", "bbc")


def _corpus_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--corpus",
        default=None,
        required=required,
        help="'cranfield', 'bbc' or a BEIR-style folder (only its documents are used)",
    )


def _distill_args(ft: argparse.ArgumentParser) -> None:
    ft.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="weight of the self-distillation term (0 = off; needs --freeze-encoder): corpus "
        "documents' prefix cosines follow a full-size ranking over their neighbours",
    )
    ft.add_argument(
        "--distill-teacher",
        choices=("base", "self"),
        default="base",
        help="whose full-size cosines are the target: the frozen base model's, or the trained "
        "model's own (detached)",
    )
    ft.add_argument("--distill-batch", type=int, default=256, help="pseudo-queries per step")
    ft.add_argument(
        "--distill-neighbours", type=int, default=32, help="full-size neighbours per pseudo-query"
    )
    ft.add_argument("--distill-negatives", type=int, default=256, help="random documents per step")
    ft.add_argument("--distill-temperature", type=float, default=0.05)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="text_command", metavar="ACTION")
    _finetune_arguments(sub.add_parser("finetune", help="Matryoshka fine-tuning on pairs"))
    _adapt_arguments(sub.add_parser("adapt", help="post-hoc Matryoshka map for frozen embeddings"))
    _transform_arguments(sub.add_parser(
        "transform", help="apply an adaptor to embeddings (corpus and queries alike) -> .npy + "
        "JSON sidecar with its nesting"))  # fmt: skip
    _compare_arguments(
        sub.add_parser("compare", help="truncate / pca / adapt / finetune table on a dataset")
    )
    _encode_arguments(sub.add_parser("encode", help="encode a corpus once (.npy + JSON sidecar)"))


def _finetune_arguments(ft: argparse.ArgumentParser) -> None:
    ft.add_argument("--model", default="default", help="sentence-transformers folder or 'default'")
    ft.add_argument("--pairs", default=None, help='JSONL of {"query", "positive"[, "negative"]}')
    _corpus_arg(ft)
    ft.add_argument("--out", required=True, help="output model folder")
    ft.add_argument("--nesting", default=None, help="prefix sizes (default doubling:8)")
    ft.add_argument("--epochs", type=int, default=1, help="passes over the pairs (default 1)")
    ft.add_argument("--batch-size", type=int, default=32,
                    help="pairs per step; the other positives are each query's negatives (32)")
    ft.add_argument("--lr", type=float, default=None,
                    help="peak AdamW learning rate (default 3e-5; 1e-3 with --freeze-encoder)")
    ft.add_argument("--max-seq-length", type=int, default=128)
    ft.add_argument("--max-steps", type=int, default=None,
                    help="stop after this many steps (a cap: --epochs still ends the run first)")
    ft.add_argument("--temperature", type=float, default=0.05)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default="cpu")
    ft.add_argument(
        "--init-rotation",
        default=None,
        help="'pca' (append a Dense layer initialised with the uncentred PCA rotation of the "
        "base model's corpus embeddings) or an adaptor .pt/.npy from `mrl text adapt`",
    )
    ft.add_argument(
        "--rotation-lr", type=float, default=None,
        help="that layer's lr beside the encoder's (default --lr; not with --freeze-encoder: "
        "only the layer trains, at --lr)",
    )
    ft.add_argument("--cache", default=None, help="folder to cache the base corpus embeddings in")
    ft.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted fine-tune into --out from its checkpoint (OUT.partial/)",
    )
    ft.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=10.0,
        help="write OUT.partial/checkpoint.pt at each epoch's end and at least this often "
        "(default 10; 0 = after every step)",
    )
    ft.add_argument(
        "--freeze-encoder",
        action="store_true",
        help="train only the --init-rotation layer, on the frozen model's cached embeddings",
    )
    _distill_args(ft)
    ft.add_argument(
        "--adapt-steps",
        type=int,
        default=0,
        help="after training, re-order the result with the orthogonal adaptor fitted on its own "
        "corpus embeddings (this many steps; a rotation: full size unchanged); 0 = off",
    )
    ft.add_argument(
        "--adapt-pseudo-queries",
        choices=("documents", "queries"),
        default="documents",
        help="the re-ordering's pseudo-queries: the corpus documents or the training pairs' "
        "queries (e.g. titles)",
    )
    ft.add_argument(
        "--adapt-init",
        choices=("identity", "pca"),
        default="identity",
        help="the re-ordering's start: the fine-tuned order (identity) or the PCA of its corpus",
    )
    ft.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction of the pairs (same split for every seed) and write "
        "OUT/validation.json: held-out queries retrieve their positives, every prefix",
    )
    ft.add_argument(
        "--val-fold",
        type=int,
        default=0,
        help="cross-fitting: hold out fold K of the round(1/F) folds of the fixed permutation "
        "(0 = the plain --val-fraction split)",
    )


def _adapt_arguments(ad: argparse.ArgumentParser) -> None:
    src = ad.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default=None, help="sentence-transformers folder or 'default'")
    src.add_argument("--embeddings", default=None, help=".npy corpus embeddings [N, D]")
    _corpus_arg(ad)
    ad.add_argument("--out", required=True, help="output folder (model + adaptor.pt/.npy)")
    ad.add_argument("--nesting", default=None, help="prefix sizes (default doubling:8)")
    ad.add_argument(
        "--queries",
        default=None,
        help="sample queries as pseudo-queries (default: the documents): a .npy [Nq, D] of "
        "query embeddings, or with --model a text file of one query per line or a .jsonl of "
        "{\"text\": ...} objects (BEIR queries.jsonl)",
    )
    ad.add_argument("--steps", type=int, default=300, help="optimisation steps (default 300)")
    ad.add_argument("--neighbours", type=int, default=32,
                    help="full-size neighbours per pseudo-query whose order is kept (default 32)")
    ad.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
    ad.add_argument("--seed", type=int, default=0, help="seed of the pseudo-query draws")


def _transform_arguments(tr: argparse.ArgumentParser) -> None:
    tr.add_argument("--adaptor", required=True,
                    help="an `mrl text adapt --out` folder, or its adaptor.pt / adaptor.npy")
    tr.add_argument("--embeddings", required=True,
                    help=".npy [N, D] embeddings of the space the adaptor was fitted in")
    tr.add_argument("--out", required=True, help="output .npy file (+ a .json sidecar beside it)")
    tr.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file and its sidecar"
    )


def _compare_arguments(cp: argparse.ArgumentParser) -> None:
    cp.add_argument("--dataset", required=True, help="'cranfield', 'bbc' or a BEIR-style folder")
    cp.add_argument(
        "--split", default=None, help="BEIR-style folders: judge by qrels/SPLIT.tsv (default: test)"
    )
    cp.add_argument("--model", default="default", help="the base model (truncate, pca, adapt)")
    cp.add_argument("--finetuned", default=None, help="a model from `mrl text finetune`")
    cp.add_argument(
        "--finetuned-label",
        default="finetune",
        help="method name of the --finetuned model's records (to compare several fine-tunes)",
    )
    cp.add_argument("--out", required=True, help="report folder (results.json, tables, plots)")
    cp.add_argument("--steps", type=int, default=300, help="adaptor steps")
    cp.add_argument("--seed", type=int, default=0, help="adaptor seed")
    cp.add_argument("--cache", default=None, help="folder to cache embeddings in")
    cp.add_argument(
        "--methods",
        default="truncate,pca,adapt,finetune",
        help="comma-separated subset (finetune is skipped without --finetuned)",
    )
    cp.add_argument(
        "--append",
        action="store_true",
        help="keep OUT/results.json records of the methods not run now (refused when they are "
        "of another dataset or, for truncate/pca/adapt, another --model)",
    )


def _encode_arguments(en: argparse.ArgumentParser) -> None:
    en.add_argument("--model", default="default")
    _corpus_arg(en, required=True)
    en.add_argument("--out", required=True, help="output .npy file (+ a .json sidecar beside it)")
    en.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file and its sidecar"
    )
    en.add_argument("--batch-size", type=int, default=32)


def _documents(corpus: str):
    """A corpus for fine-tuning, an adaptor or encoding: a BEIR folder needs only corpus.jsonl."""
    from mrl.text.evaluation import load_text_dataset

    return load_text_dataset(corpus, documents_only=True)


def _check_distill_flags(args: argparse.Namespace) -> None:
    """--distill-* flags given without --distill would be ignored: an error instead. (The CLI
    checks this, not FinetuneConfig: scripts share distillation settings across a grid that
    includes distill=0.)"""
    from dataclasses import fields

    from mrl.text.finetune import FinetuneConfig

    if args.distill != 0:
        return
    given = [f"--{f.name.replace('_', '-')} {getattr(args, f.name)}"
             for f in fields(FinetuneConfig)
             if f.name.startswith("distill_") and getattr(args, f.name) != f.default]
    if given:
        raise ValueError(f"{', '.join(given)} need --distill WEIGHT > 0 (distillation is off)")


def _finetune(args: argparse.Namespace) -> int:
    from mrl.text.finetune import FinetuneConfig, finetune
    from mrl.text.pairs import pairs_from_titles

    if (args.pairs is None) == (args.corpus is None):
        raise ValueError("give exactly one of --pairs FILE.jsonl or --corpus NAME")
    from mrl.devices import check_device

    check_device(args.device, "--device")
    _check_distill_flags(args)
    config = FinetuneConfig(
        nesting=args.nesting,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_seq_length=args.max_seq_length,
        max_steps=args.max_steps,
        temperature=args.temperature,
        seed=args.seed,
        device=args.device,
        init_rotation=args.init_rotation,
        rotation_lr=args.rotation_lr,
        train_encoder=not args.freeze_encoder,
        distill=args.distill,
        distill_teacher=args.distill_teacher,
        distill_batch=args.distill_batch,
        distill_neighbours=args.distill_neighbours,
        distill_negatives=args.distill_negatives,
        distill_temperature=args.distill_temperature,
        val_fraction=args.val_fraction,
        val_fold=args.val_fold,
        adapt_steps=args.adapt_steps,
        adapt_pseudo_queries=args.adapt_pseudo_queries,
        adapt_init=args.adapt_init,
    )
    from mrl.text.checkpoint import check_finished_out

    check_finished_out(args.out, "--out")
    check_new_output_dir(args.out, "--out")  # before training, not after
    _check_cache(args.cache)
    texts = None  # the "pca" rotation's corpus: the documents, else the distinct positives
    if args.pairs is not None:
        pairs = _read_pairs(args.pairs)
    else:
        ds = _documents(args.corpus)
        pairs = pairs_from_titles(ds.titles, ds.bodies)
        texts = ds.documents
    finetune(
        args.model,
        pairs,
        args.out,
        config,
        log=lambda s: print(s, flush=True),
        rotation_texts=texts,
        cache_dir=args.cache,
        resume=args.resume,
        checkpoint_minutes=args.checkpoint_minutes,
    )
    return 0


def _read_pairs(path: str) -> list:
    """``--pairs FILE.jsonl``; its errors name the option (and file:line for a bad line)."""
    from mrl.text.pairs import read_pairs

    try:
        return read_pairs(path)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"--pairs {exc}") from None


def _check_cache(cache: str | None) -> None:
    """``--cache`` must be a folder (or a path one can be made at): checked before slow work."""
    if cache is not None:
        check_output_path(cache, "--cache", "dir", writable=False)  # a read-only cache still serves


def _adapt(args: argparse.Namespace) -> int:
    from mrl.text.adaptor import AdaptorConfig, OrthogonalAdaptor
    from mrl.text.encoders import encode, load_embeddings, load_encoder

    out = check_new_output_dir(args.out, "--out")  # before fitting, not after
    config = AdaptorConfig(
        nesting=args.nesting,
        steps=args.steps,
        neighbours=args.neighbours,
        lr=args.lr,
        seed=args.seed,
    )
    # every input read and checked before the (slow) corpus encoding
    queries = None if args.queries is None else _read_queries(args.queries, args.embeddings)
    encoder = None
    if args.embeddings is not None:
        if args.corpus is not None:
            raise ValueError("--corpus is for --model; --embeddings already holds the corpus")
        x = load_embeddings(args.embeddings)
    else:
        if args.corpus is None:
            raise ValueError("--model needs --corpus (the documents to fit the map on)")
        documents = _documents(args.corpus).documents  # a bad --corpus fails before the load
        encoder = load_encoder(args.model)
        x = encode(encoder, documents, name="documents")
    if isinstance(queries, list):  # query texts: embedded by the same model
        queries = encode(encoder, queries, name="queries")
    adaptor = OrthogonalAdaptor.fit(x, config, log=lambda s: print(s, flush=True), queries=queries)
    with atomic_output_dir(out) as tmp:  # model + adaptor files appear together
        if args.model is not None:
            adaptor.to_sentence_transformer(args.model, tmp)
        adaptor.save(tmp / "adaptor.pt")
    print(f"wrote {out} (adaptor.pt, adaptor.npy{', model' if args.model else ''})")
    if args.embeddings is not None:  # searching raw queries against rotated rows is garbage
        print(f"apply it to the corpus and to every query alike: mrl text transform --adaptor "
              f"{out} --embeddings X.npy --out X-adapted.npy (or x @ adaptor.npy)")
    return 0


def _transform(args: argparse.Namespace) -> int:
    from mrl.text.adaptor import OrthogonalAdaptor
    from mrl.text.encoders import load_embeddings, save_embeddings

    _check_encode_out(args.out, args.overwrite)
    path = Path(args.adaptor)
    if path.is_dir():
        path = path / "adaptor.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--adaptor {args.adaptor!r} is not an adaptor file or a folder "
                                "holding adaptor.pt (`mrl text adapt --out`)")
    adaptor = OrthogonalAdaptor.load(path)
    x = load_embeddings(args.embeddings)
    if x.shape[1] != adaptor.dim:
        raise ValueError(f"--embeddings {args.embeddings!r} are {x.shape[1]}-d, but --adaptor "
                         f"{args.adaptor!r} maps {adaptor.dim}-d vectors")
    carried = _source_rows(Path(args.embeddings), x)
    y = adaptor.transform(x)  # [N, D] @ R
    save_embeddings(args.out, y, adaptor=str(path), source=str(args.embeddings),
                    normalized=_unit_rows(y), nesting=adaptor.nesting.to_dict(), **carried)
    print(f"wrote {args.out} {y.shape} (nesting {adaptor.nesting})")
    return 0


_CARRIED = ("ids", "labels", "classes", "model", "corpus")  # what a row is: unchanged by R


def _source_rows(npy: Path, x) -> dict:
    """The source sidecar's row identity (ids, labels) and model, to carry into the output's
    sidecar (`mrl index build` then returned row numbers, not the documents' ids); a source
    whose sidecar says it was transformed already is refused (rotated twice, it no longer
    matches queries rotated once). A sidecar of other vectors is ignored."""
    from mrl.retrieval.loading import vectors_sidecar

    meta = vectors_sidecar(npy, x.shape)
    if meta is None:
        return {}
    if meta.get("adaptor"):
        raise ValueError(f"--embeddings {str(npy)!r} were transformed already (by "
                         f"{meta['adaptor']!r}, its sidecar says): pass the untransformed "
                         "embeddings")
    return {k: meta[k] for k in _CARRIED if k in meta}


def _read_queries(path: str, embeddings: str | None):
    """``--queries``: a .npy of query embeddings [Nq, D], or (with --model) one query per text
    line, or a .jsonl of objects with a ``text`` field (BEIR's queries.jsonl); texts are
    returned, encoded later by the caller."""
    from mrl.text.encoders import load_embeddings

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--queries file {path!r} does not exist")
    if p.suffix == ".npy":
        return load_embeddings(p)
    if embeddings is not None:
        raise ValueError(f"--queries {path!r} is text: it needs --model to encode it (or a .npy)")
    if p.suffix.lower() == ".jsonl":  # BEIR's queries.jsonl: one {"text": ...} per line
        from mrl.text.beir import read_jsonl

        texts = [r["text"].strip() for r in read_jsonl(p, ("text",)) if r["text"].strip()]
        if not texts:
            raise ValueError(f"--queries file {path!r} has no query with a non-empty 'text'")
        return texts
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise ValueError(f"--queries file {path!r} is not UTF-8 text ({exc})") from None
    texts = [t for t in lines if t]
    if not texts:
        raise ValueError(f"--queries file {path!r} has no non-empty line")
    return texts


def _encode(args: argparse.Namespace) -> int:
    from mrl.text.encoders import encode, load_encoder, model_nesting

    _check_encode_out(args.out, args.overwrite)  # before loading and encoding, not after
    check_minimums(args, (("batch_size", 1),))
    corpus = _documents(args.corpus)  # a bad --corpus fails before the model load
    documents = corpus.documents
    encoder = load_encoder(args.model)
    emb = encode(encoder, documents, batch_size=args.batch_size, name="documents")
    from mrl.text.encoders import save_embeddings

    nesting = model_nesting(args.model)
    save_embeddings(
        args.out,
        emb,
        model=str(args.model),
        corpus=str(args.corpus),
        normalized=_unit_rows(emb),
        nesting=None if nesting is None else nesting.to_dict(),
        **_row_identity(corpus),
    )
    print(f"wrote {args.out} {emb.shape}")
    return 0


def _row_identity(corpus) -> dict:
    """What each row is, for the sidecar: the documents' ids (`mrl index build` takes them:
    Cranfield drops two empty documents, so row i is not document i + 1), or a labelled
    corpus's class per row."""
    from mrl.text.corpus import LabelledCorpus

    if isinstance(corpus, LabelledCorpus):
        return {"labels": [int(v) for v in corpus.labels], "classes": list(corpus.classes)}
    return {"ids": list(corpus.doc_ids)}


def _unit_rows(emb: np.ndarray) -> bool:
    """What the vectors are, not what was asked (most models end in a Normalize module)."""
    import numpy as np

    return bool(np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3))


def _check_encode_out(out: str, overwrite: bool) -> None:
    """``--out X.npy`` and its sidecar ``X.json`` can be written: new, or ``--overwrite``."""
    if not str(out).endswith(".npy"):
        raise ValueError(f"--out must be a .npy file, got --out {out!r}")
    npy = check_output_path(out, "--out", "file")
    sidecar = check_output_path(npy.with_suffix(".json"), f"--out {out!r}: the sidecar", "file")
    for path in (npy, sidecar):
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"--out {out!r}: {str(path)!r} already exists; pass --overwrite to replace "
                "it (the .npy and its .json sidecar)"
            )


def _compare(args: argparse.Namespace) -> int:
    from mrl.report import write_report
    from mrl.text.adaptor import AdaptorConfig
    from mrl.text.evaluation import compare_methods, headline_metrics, relative_table

    check_output_dir_of(args.out, "--out", REPORT_FILES, "a report folder", foreign=WORKFLOW_FILES)
    _check_cache(args.cache)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.finetuned is None and args.finetuned_label != "finetune":
        raise ValueError(f"--finetuned-label {args.finetuned_label!r} names the rows of a "
                         "--finetuned model; give --finetuned MODEL")
    if args.finetuned is None and "finetune" in methods:
        if methods == ["finetune"]:
            raise ValueError("--methods finetune needs --finetuned MODEL (the fine-tuned folder)")
        methods.remove("finetune")
    _check_models(args, methods)
    from mrl.text.evaluation import load_text_dataset

    # loaded once: its name checks --append before any encoding
    ds = load_text_dataset(args.dataset, args.split)
    kept = _appended_records(args, ds, methods) if args.append else []
    records = compare_methods(
        ds,
        base=args.model,
        finetuned=args.finetuned,
        cache_dir=args.cache,
        adaptor_config=AdaptorConfig(steps=args.steps, seed=args.seed),
        methods=methods,
        log=lambda s: print(s, flush=True),
        finetune_label=args.finetuned_label,
    )
    records = kept + records
    metric = headline_metrics(records)[0]  # nDCG@10 or p@10 (@N for fewer than 10 documents)
    table = relative_table(records, metric)
    notes = (
        f"Base model {args.model}; fine-tuned model {args.finetuned}. Prefixes re-normalised "
        "(cosine). pca: uncentred PCA rotation fitted on the corpus; adapt: orthogonal adaptor "
        f"(seed {args.seed}, {args.steps} steps) fitted on the corpus documents only."
    )
    write_report(
        records,
        args.out,
        title=f"mrl text compare: {args.dataset}",
        notes=notes,
        sections=[(f"{metric} relative to full size", table)],
    )
    print(table)
    return 0


def _check_models(args: argparse.Namespace, methods: list[str]) -> None:
    """``--model`` and ``--finetuned`` are model folders (or 'default'): before any slow work."""
    from mrl.text.encoders import resolve_model_path

    if set(methods) - {"finetune"}:
        resolve_model_path(args.model, "--model")
    if "finetune" in methods:
        resolve_model_path(args.finetuned, "--finetuned")


def _appended_records(args: argparse.Namespace, ds, methods: list[str]) -> list:
    """``--append``: OUT/results.json's records of the methods not run now.

    One table compares one dataset and one base model: records of another dataset, or base-model
    records (truncate, pca, adapt) of another ``--model``, are refused, never mixed in.
    """
    from mrl.records import load_records
    from mrl.text.evaluation import BASE_METHODS

    previous = Path(args.out) / "results.json"
    if not previous.is_file():
        return []
    old = load_records(previous)
    dataset, digest = ds.name, ds.digest()
    for r in old:
        # records written before the digest are compared by name only
        other = r.get("dataset_digest", digest) != digest
        if r.get("dataset") != dataset or other:
            raise ValueError(
                f"--append: {str(previous)!r} holds results on dataset {r.get('dataset')!r}"
                f"{' (other documents, queries or judgments)' if other else ''}, not on "
                f"--dataset {args.dataset!r} ({dataset!r}); use another --out"
            )
        if r["method"] in BASE_METHODS and r.get("model") != str(args.model):
            raise ValueError(
                f"--append: {str(previous)!r} holds {r['method']!r} results of base model "
                f"{r.get('model')!r}, not of --model {str(args.model)!r}; pass that --model "
                "or use another --out"
            )
    written = {args.finetuned_label if m == "finetune" else m for m in methods}
    return [r for r in old if r["method"] not in written]


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "text_command", None)
    if action is None:
        raise ValueError("choose an action: mrl text finetune | adapt | transform | compare | "
                         "encode")
    actions = {"finetune": _finetune, "adapt": _adapt, "transform": _transform,
               "encode": _encode, "compare": _compare}
    return actions[action](args)
