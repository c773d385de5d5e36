"""Evaluate text embeddings at every prefix in one pass, and `mrl eval` for text models.

Encode once (`mrl.text.encoders`), then `mrl.evaluate` scores every prefix of the nesting:
nDCG@10, recall@100 and MRR for query sets (Cranfield, BEIR-style folders); precision@10, 1-NN
and mAP@10 for labelled corpora (BBC News), each document a query against all the others
(leave-one-out).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrl.nesting import Nesting
from mrl.params import check_int
from mrl.records import Record
from mrl.text.corpus import LabelledCorpus, RetrievalDataset

__all__ = [
    "index_qrels",
    "evaluate_retrieval",
    "evaluate_corpus",
    "load_text_dataset",
    "eval_command",
    "rename_method",
]

# `mrl.evaluate` calls the uncentred PCA baseline "pca_uncentered"; the text tables call it "pca"
# (uncentred, so that it is a rotation and full-size cosines are unchanged).
_BASELINE_NAMES = {"pca_uncentered": "pca"}
METHODS = ("truncate", "pca", "adapt", "finetune")
BASE_METHODS = ("truncate", "pca", "adapt")  # the base model's embeddings, or a rotation of them


def index_qrels(ds: RetrievalDataset) -> dict[int, dict[int, float]]:
    """``{query index: {doc index: gain > 0}}`` for `mrl.evaluate.evaluate_ranking`."""
    col = {d: j for j, d in enumerate(ds.doc_ids)}
    out: dict[int, dict[int, float]] = {}
    for i, q in enumerate(ds.query_ids):
        judged = {col[d]: float(g) for d, g in ds.qrels.get(q, {}).items() if g > 0 and d in col}
        if judged:
            out[i] = judged
    if not out:
        raise ValueError(f"dataset {ds.name!r} has no query with a relevant document")
    return out


def rename_method(records: list[Record]) -> list[Record]:
    for r in records:
        r["method"] = _BASELINE_NAMES.get(r["method"], r["method"])
    return records


def evaluate_retrieval(
    queries: np.ndarray,
    docs: np.ndarray,
    ds: RetrievalDataset,
    nesting: Nesting,
    *,
    method: str,
    pca: bool = False,
    center: bool = False,
    context: dict[str, Any] | None = None,
) -> list[Record]:
    """Records for ``queries [Q, D]`` against ``docs [N, D]`` (rows in ``ds`` order).

    ``pca``: also the uncentred-PCA baseline (fitted on ``docs``), recorded as method "pca".
    ``center``: subtract the documents' mean from both sides before cosine.
    """
    from mrl.evaluate import evaluate_ranking

    if queries.shape[0] != len(ds.queries) or docs.shape[0] != len(ds.doc_ids):
        raise ValueError(
            f"embeddings do not match dataset {ds.name!r}: queries {queries.shape[0]} vs "
            f"{len(ds.queries)}, docs {docs.shape[0]} vs {len(ds.doc_ids)}"
        )
    ks = (min(10, docs.shape[0]), min(100, docs.shape[0]))  # a tiny corpus: k = its size
    records = evaluate_ranking(
        queries,
        docs,
        index_qrels(ds),
        nesting,
        method=method,
        ks=tuple(sorted(set(ks))),
        center=center,
        baselines=("pca_uncentered",) if pca else (),
        context={"dataset": ds.name, "dataset_digest": ds.digest(), **(context or {})},
    )
    return rename_method(records)


_WARNED_REPEATS: set[tuple[str, int, int]] = set()


def evaluate_corpus(
    emb: np.ndarray,
    corpus: LabelledCorpus,
    nesting: Nesting,
    *,
    method: str,
    pca: bool = False,
    k: int = 10,
    center: bool = False,
    context: dict[str, Any] | None = None,
) -> list[Record]:
    """Leave-one-out ``p@k``, ``1nn``, ``map@k`` of ``emb [N, D]`` with the corpus labels
    (``center``: subtract the corpus mean before cosine).

    Only a query's own row is left out: a document whose text repeats another's finds that copy
    first at every prefix (BBC News has 100 such pairs: ``results/bbc/duplicates.py``), which
    a warning says."""
    from mrl.evaluate import evaluate_labelled

    if emb.shape[0] != len(corpus.labels):
        raise ValueError(
            f"embeddings have {emb.shape[0]} rows, corpus {corpus.name!r} has {len(corpus.labels)}"
        )
    if emb.shape[0] < 2:
        raise ValueError(f"corpus {corpus.name!r} needs at least 2 documents for leave-one-out "
                         f"retrieval, got {emb.shape[0]}")
    k = min(check_int(k, "k", minimum=1), emb.shape[0] - 1)  # a tiny corpus: every other
    # document (p@N-1), as queries' k; "10" was a bare TypeError
    docs = corpus.documents
    repeats = len(docs) - len(set(docs))
    if repeats and (key := (corpus.name, len(docs), repeats)) not in _WARNED_REPEATS:
        _WARNED_REPEATS.add(key)  # once per corpus and process (a comparison evaluates many)
        warnings.warn(
            f"corpus {corpus.name!r}: {repeats} of {len(docs)} documents repeat an earlier "
            "document's text; leave-one-out retrieval counts such a copy as a hit",
            stacklevel=2,
        )
    records = evaluate_labelled(
        emb,
        corpus.labels,
        emb,
        corpus.labels,
        nesting,
        method=method,
        k=k,
        center=center,
        baselines=("pca_uncentered",) if pca else (),
        exclude_self=True,
        context={"dataset": corpus.name, "dataset_digest": corpus.digest(), **(context or {})},
    )
    return rename_method(records)


def load_text_dataset(
    name: str | os.PathLike, split: str | None = None, documents_only: bool = False
) -> RetrievalDataset | LabelledCorpus:
    """ "cranfield", "bbc", "bbc:N" or a BEIR-style folder (corpus.jsonl, queries.jsonl,
    qrels/SPLIT.tsv).

    ``split``: the BEIR judgment file (None = "test"; refused for the built-in datasets, which
    have one set of judgments). ``documents_only``: a BEIR folder needs only its corpus.jsonl
    (for fine-tuning, an adaptor or encoding; no queries are loaded).
    """
    from mrl.text.beir import is_beir_folder, load_beir, load_beir_documents

    text = str(name)
    built_in = _built_in(text)
    if split is not None and built_in:
        raise ValueError(f"split={split!r} is for BEIR-style folders; {text!r} has one split")
    if built_in and Path(text).is_dir():  # the name wins; say so, and how to get the folder
        warnings.warn(f"dataset {text!r} is the built-in data set; the folder {text!r} here is "
                      f"not read (pass ./{text} for it)", stacklevel=2)
    if text == "cranfield":
        from mrl.text.cranfield import load_cranfield

        return load_cranfield()
    if text == "bbc" or text.startswith("bbc:"):
        from mrl.text.bbc import load_bbc

        if text == "bbc":
            return load_bbc()
        try:
            limit = int(text.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"dataset 'bbc:N' needs an integer N, got {text!r}") from None
        if limit < 1:  # load_bbc's own error named limit_per_class, not the dataset given
            raise ValueError(f"dataset 'bbc:N' needs N >= 1 articles per class, got {text!r}")
        corpus = load_bbc(limit_per_class=limit)  # the first N articles of each class
        corpus.name = f"bbc:{limit}"
        return corpus
    folder = Path(text)
    if documents_only and folder.is_dir() and (folder / "corpus.jsonl").is_file():
        return load_beir_documents(folder)
    if folder.is_dir() and is_beir_folder(folder):
        ds = load_beir(folder, "test" if split is None else split)
        if _built_in(ds.name.split(":")[0]):  # records named "cranfield" would pass for the
            ds.name = f"folder:{ds.name}"  # built-in one (--append would mix the two)
        return ds
    if folder.is_dir():  # meant as a BEIR folder: say which file is missing
        need = ("corpus.jsonl",) if documents_only else ("corpus.jsonl", "queries.jsonl")
        missing = [f for f in need if not (folder / f).is_file()]
        raise FileNotFoundError(
            f"dataset folder {text!r} is not a BEIR-style folder: it lacks {', '.join(missing)}"
        )
    raise ValueError(
        f"dataset must be 'cranfield', 'bbc' or a BEIR-style folder (corpus.jsonl, "
        f"queries.jsonl, qrels/test.tsv), got {text!r}"
    )


def _built_in(text: str) -> bool:
    return text in ("cranfield", "bbc") or text.startswith("bbc:")


def evaluate_model(
    model: str | os.PathLike,
    dataset: str | os.PathLike | RetrievalDataset | LabelledCorpus,
    nesting: Nesting | str | None = None,
    *,
    method: str | None = None,
    pca: bool = True,
    center: bool = False,
    device: str = "cpu",
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    nesting_param: str = "nesting",
    split: str | None = None,
) -> tuple[list[Record], Nesting]:
    """Encode ``dataset`` with ``model`` once and evaluate every prefix (plus the PCA baseline).

    ``center``: cosine after subtracting the documents' mean; ``device``: where the model encodes;
    ``nesting_param``: the name a bad ``nesting``'s error gives it (the CLI's ``--nesting``);
    ``split``: a BEIR folder's judgment file (None = qrels/test.tsv).
    """
    from mrl.text.encoders import embedding_dim, encode_cached, load_encoder, model_nesting

    loaded = isinstance(dataset, (RetrievalDataset, LabelledCorpus))
    ds = dataset if loaded else load_text_dataset(dataset, split)  # before the model loads
    encoder = load_encoder(model, device=device)
    dim = embedding_dim(encoder)
    recorded = model_nesting(model)
    if nesting is None:
        nesting = recorded or Nesting.doubling(8, dim)
    else:
        nesting = _parse_nesting(nesting, dim, nesting_param)
    nesting.check_dim(dim, "the model's embeddings")
    extra = [m for m in nesting.sizes if recorded is not None and m not in recorded]
    if extra:
        warnings.warn(
            f"nesting sizes {extra} are not prefix sizes the model was trained for "
            f"{list(recorded.sizes)}: they are evaluated, but as plain truncation",
            stacklevel=2,
        )
    if method is None:
        method = "mrl" if recorded is not None else "truncate"
    ctx = {"model": str(model), **({"center": True} if center else {})}
    docs = encode_cached(
        model, ds.documents, cache_dir, encoder=encoder, batch_size=batch_size, name="documents"
    )
    kw = dict(method=method, pca=pca, center=center, context=ctx)
    if isinstance(ds, LabelledCorpus):
        return evaluate_corpus(docs, ds, nesting, **kw), nesting
    queries = encode_cached(
        model, ds.queries, cache_dir, encoder=encoder, batch_size=batch_size, name="queries"
    )
    return evaluate_retrieval(queries, docs, ds, nesting, **kw), nesting


def _parse_nesting(spec: Nesting | str | Sequence[int], dim: int, param: str) -> Nesting:
    """A nesting ending at the model's dimension ``dim``; a ValueError naming ``param``."""
    try:
        nesting = spec if isinstance(spec, Nesting) else Nesting.parse(spec, dim=dim)
        nesting.check_dim(dim, "the model's embeddings")
    except ValueError as exc:
        shown = list(spec.sizes) if isinstance(spec, Nesting) else spec
        raise ValueError(f"{param} {shown}: {exc} (the model's D is {dim})") from None
    return nesting


def eval_command(args: Any) -> int:
    """`mrl eval RUN_DIR --dataset ... --out ...` for a sentence-transformers folder.

    ``args``: ``run_dir`` (the model folder, or "default": the packaged model), ``dataset``
    ("cranfield", "bbc" or a BEIR folder; default "cranfield"), ``split`` (a BEIR folder's qrels
    file; None = test), ``out`` (report folder; default RUN_DIR/eval-DATASET[-SPLIT], for
    "default" ./eval-default-DATASET[-SPLIT]), ``nesting`` (spec or None: the model's recorded
    nesting, else doubling from 8), ``no_baselines`` (skip the PCA baseline), ``center``
    (subtract the documents' mean before cosine), ``device`` (None: CUDA when available, else
    CPU).
    """
    from mrl.devices import default_device
    from mrl.io import REPORT_FILES, WORKFLOW_FILES, check_output_dir_of
    from mrl.report import write_report

    dataset = getattr(args, "dataset", None) or "cranfield"
    split = getattr(args, "split", None)
    named = split not in (None, "test")  # records name the dataset FOLDER:SPLIT then
    # DATASET[-SPLIT]; a folder by its real name ("." was "eval-")
    base = Path(str(dataset)).resolve().name if Path(str(dataset)).is_dir() else str(dataset)
    report = base + (f"-{split}" if named else "")
    model: str | Path = args.run_dir
    if Path(args.run_dir).is_dir():
        if str(args.run_dir) == "default":  # a folder called default, not the packaged model
            model = Path(args.run_dir).absolute()
        out = getattr(args, "out", None) or Path(args.run_dir) / f"eval-{report}"
    else:  # the packaged model ('default') has no folder of its own: the working folder
        out = getattr(args, "out", None) or Path(f"eval-{args.run_dir}-{report}")
    # before encoding, not when writing the report
    out = check_output_dir_of(out, "--out", REPORT_FILES, "a report folder",
                              foreign=WORKFLOW_FILES)
    ds = load_text_dataset(dataset, split)
    if getattr(args, "out", None) is None:
        _check_default_report(out, ds)
    center = bool(getattr(args, "center", False))
    pca = not getattr(args, "no_baselines", False)
    records, nesting = evaluate_model(
        model,
        ds,
        getattr(args, "nesting", None),
        pca=pca,
        center=center,
        device=default_device(getattr(args, "device", None)),
        nesting_param="--nesting",
        split=split,
    )
    notes = (
        f"Model {args.run_dir}, dataset {dataset}"
        + (f" (judgments qrels/{split}.tsv)" if split else "")
        + f", nesting {list(nesting.sizes)}. Every prefix is "
        f"re-normalised (cosine{', after subtracting the mean document' if center else ''})."
        + (" 'pca' is an uncentred PCA rotation fitted on the searched corpus." if pca else "")
    )
    write_report(
        records, out, title=f"mrl eval: {Path(str(args.run_dir)).name} on {dataset}", notes=notes
    )
    for metric in headline_metrics(records):  # as `mrl eval` prints top1 / 1nn for images
        print(summary_table(records, metric))
    print(f"report: {out / 'report.html'}")
    return 0


def _check_default_report(out: Path, ds: RetrievalDataset | LabelledCorpus) -> None:
    """The default report folder (named after the data set) holds another data set's report:
    two folders called data both wrote MODEL/eval-data, the second replacing the first."""
    from mrl.records import load_records

    previous = out / "results.json"
    if not previous.is_file():
        return
    try:
        digests = {r.get("dataset_digest") for r in load_records(previous)} - {None}
    except ValueError:  # not records: check_output_dir_of has judged the folder
        return
    if digests and digests != {ds.digest()}:
        raise FileExistsError(
            f"{str(out)!r} holds the report of another data set named {ds.name!r} (other "
            "documents, queries or judgments); pass --out to choose the report folder"
        )


def headline_metrics(records: Sequence[Record]) -> list[str]:
    """The metrics `mrl eval` prints: nDCG@10 for queries, p@10 and 1-NN for a labelled corpus
    (@k as recorded: a corpus of fewer than 10 documents records nDCG@N)."""
    present = {r["metric"] for r in records}
    shown = []
    for family in ("ndcg@", "p@"):
        ks = sorted(int(m[len(family):]) for m in present
                    if m.startswith(family) and m[len(family):].isdigit())  # fmt: skip
        if ks:
            shown.append(f"{family}{10 if 10 in ks else ks[0]}")
    return shown + (["1nn"] if "1nn" in present else [])


def summary_table(records: Sequence[Record], metric: str) -> str:
    from mrl.records import to_markdown

    return to_markdown(records, metric=metric)


def _evaluate(
    ds: RetrievalDataset | LabelledCorpus,
    docs: np.ndarray,
    queries: np.ndarray | None,
    nesting: Nesting,
    method: str,
    pca: bool,
    context: dict[str, Any],
) -> list[Record]:
    if isinstance(ds, LabelledCorpus):
        return evaluate_corpus(docs, ds, nesting, method=method, pca=pca, context=context)
    assert queries is not None
    return evaluate_retrieval(queries, docs, ds, nesting, method=method, pca=pca, context=context)


def compare_methods(
    dataset: str | os.PathLike | RetrievalDataset | LabelledCorpus,
    *,
    base: str | os.PathLike = "default",
    finetuned: str | os.PathLike | None = None,
    adaptor_config: Any = None,
    cache_dir: str | os.PathLike | None = None,
    methods: Sequence[str] = METHODS,
    log: Any = print,
    reuse_base: bool = True,
    finetune_label: str = "finetune",
) -> list[Record]:
    """The text results table: ``truncate``, ``pca``, ``adapt`` (and ``finetune``) per prefix.

    ``dataset``: a name or folder for `load_text_dataset`, or a dataset already loaded.
    ``methods`` picks a subset (``finetune`` needs ``finetuned``); embeddings are encoded once
    per model (cached in ``cache_dir`` when given).

    - truncate: the base model's embeddings, prefixes re-normalised;
    - pca: uncentred PCA rotation fitted on the searched corpus (documents only);
    - adapt: `OrthogonalAdaptor` fitted on the corpus documents (no queries, no labels);
    - finetune: the ``finetuned`` model's own prefixes (its recorded nesting, else doubling
      from 8).

    ``reuse_base``: a model fine-tuned with a frozen encoder (``train_encoder=False``: ``base``
    plus a trained last Dense layer W) is evaluated as ``base embeddings @ W^T`` instead of
    encoding the corpus again (the same numbers up to float rounding; False encodes anyway).
    ``finetune_label``: the method name of the fine-tuned model's records.
    """
    from mrl.text.adaptor import AdaptorConfig, OrthogonalAdaptor
    from mrl.text.encoders import encode_cached, resolve_model_path

    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    if not isinstance(finetune_label, str) or not finetune_label.strip():
        raise ValueError(f"finetune_label must be a non-empty name, got {finetune_label!r}")
    if finetune_label in METHODS and finetune_label != "finetune":
        raise ValueError(f"finetune_label {finetune_label!r} is another method's name")
    if "finetune" in methods and finetuned is None:
        raise ValueError("method 'finetune' needs a fine-tuned model (finetuned=None)")
    if "finetune" in methods:  # before the base model's encoding and the adaptor's fitting
        resolve_model_path(finetuned, "finetuned")
    loaded = isinstance(dataset, (RetrievalDataset, LabelledCorpus))
    ds = dataset if loaded else load_text_dataset(dataset)
    labelled = isinstance(ds, LabelledCorpus)

    def embed(model: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
        docs = encode_cached(model, ds.documents, cache_dir, name="documents")
        queries = None if labelled else encode_cached(model, ds.queries, cache_dir, name="queries")
        return docs, queries

    records: list[Record] = []
    if {"truncate", "pca", "adapt"} & set(methods):
        docs, queries = embed(base)
        nesting = Nesting.doubling(8, docs.shape[1])
        ctx = {"model": str(base)}
        if {"truncate", "pca"} & set(methods):
            recs = _evaluate(ds, docs, queries, nesting, "truncate", "pca" in methods, ctx)
            records += [r for r in recs if r["method"] in methods]
    if "adapt" in methods:
        config = adaptor_config or AdaptorConfig()
        adaptor = OrthogonalAdaptor.fit(docs, config, log=log)
        ad_q = None if queries is None else adaptor.transform(queries)
        ctx_ad = {**ctx, "adaptor_seed": config.seed, "adaptor_steps": config.steps}
        records += _evaluate(ds, adaptor.transform(docs), ad_q, nesting, "adapt", False, ctx_ad)
    if "finetune" in methods:
        assert finetuned is not None
        head = frozen_head(finetuned, base) if reuse_base else None
        if head is None:
            docs_ft, queries_ft = embed(finetuned)
        else:  # the frozen base model's embeddings, then the trained last layer
            log(f"finetune: {finetuned} = {base} + a trained Dense layer; reusing its embeddings")
            docs_b, queries_b = embed(base)
            docs_ft = docs_b @ head.T  # [N, D]
            queries_ft = None if queries_b is None else queries_b @ head.T  # [Q, D]
        nesting = finetuned_nesting(finetuned, docs_ft.shape[1])
        ctx_ft = {"model": str(finetuned)}
        records += _evaluate(ds, docs_ft, queries_ft, nesting, finetune_label, False, ctx_ft)
    return records


def finetuned_nesting(finetuned: str | os.PathLike, dim: int) -> Nesting:
    """The prefix sizes ``finetuned`` was trained for (its ``mrl.json``), else doubling from 8."""
    from mrl.text.encoders import model_nesting

    nesting = model_nesting(finetuned)
    if nesting is None:
        return Nesting.doubling(8, dim)
    nesting.check_dim(dim, f"the embeddings of {str(finetuned)!r}")
    return nesting


def frozen_head(finetuned: str | os.PathLike, base: str | os.PathLike) -> np.ndarray | None:
    """``W [D, D]`` when ``finetuned`` is ``base`` plus a trained last Dense layer, else None.

    That is a folder from `mrl.text.finetune.finetune` with ``train_encoder=False`` whose recorded
    base model is ``base``: its embeddings are ``base(x) @ W^T``.
    """
    import json

    from mrl.text.encoders import MRL_CONFIG, load_encoder, resolve_model_path

    meta = resolve_model_path(finetuned) / MRL_CONFIG
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    config = info.get("config") or {}
    if info.get("kind") != "finetune" or config.get("train_encoder", True):
        return None
    if "base_fingerprint" in info:  # the base's bytes: a folder replaced at the same path (or
        # another spelling of the same one) was taken by name
        from mrl.text.checkpoint import folder_fingerprint

        if info["base_fingerprint"] != folder_fingerprint(resolve_model_path(base)):
            return None
    elif str(info.get("base_model")) != str(base):  # a folder saved before the fingerprint
        return None
    last = load_encoder(finetuned)[-1]
    linear = getattr(last, "linear", None)
    if linear is None or linear.bias is not None:
        return None
    return linear.weight.detach().cpu().numpy().astype(np.float32)


def relative_table(records: Sequence[Record], metric: str) -> str:
    """Markdown: each method's ``metric`` per prefix as a fraction of the base model's full size.

    The reference is the ``truncate`` method's full-size value for the base model's methods
    (truncate, pca, adapt); any other method (``finetune`` or a fine-tune's own label) is a
    different model and is measured against its own full size, its largest prefix (stated in
    the last column).
    """
    rows: dict[str, dict[int, float]] = {}
    for r in records:
        if r["metric"] == metric and r["value"] is not None:
            rows.setdefault(r["method"], {})[r["prefix"]] = r["value"]
    if not rows:
        raise ValueError(f"no records with metric={metric!r}")
    prefixes = sorted({p for v in rows.values() for p in v})
    base_full = rows.get("truncate", {}).get(prefixes[-1])
    lines = [
        f"| method | {' | '.join(str(p) for p in prefixes)} | reference |",
        "|---|" + "---|" * (len(prefixes) + 1),
    ]
    for method, vals in rows.items():
        own = method not in BASE_METHODS or base_full is None
        # own full size: the method's largest prefix (a fine-tuned model of a smaller D ends
        # below the table's last column; looking up that column gave None and a TypeError)
        ref = vals[max(vals)] if own else base_full
        cells = [f"{vals[p] / ref:.1%}" if p in vals and ref else "" for p in prefixes]
        which = "own full size" if own else "base full size"
        lines.append(f"| {method} | {' | '.join(cells)} | {which} ({ref:.4f}) |")
    return "\n".join(lines)
