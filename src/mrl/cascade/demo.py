"""The cascade (and few-shot) section of `mrl demo` and the HTML report.

`demo_section(ctx)` takes any object with these attributes (missing ones count as None):

* ``out_dir``: folder for ``cascade.png`` (required);
* ``test_logits [G, N, C]`` and ``test_labels [N]`` (MRL model), or ``run_dir`` to compute them
  (`mrl.cascade.runs.load_source`, test split);
* ``nesting``: the model's `Nesting` (taken from the run when ``run_dir`` is used);
* ``calib_logits`` / ``calib_labels``: a separate calibration set (both or neither); without it
  the test set is split in half at random (seeded by ``seed``);
* ``ff_logits``: ``{m: [N, C]}`` logits of FF-m models on the test set, if trained;
* ``train_embeddings [N_train, D]``, ``train_labels``, ``test_embeddings [N, D]``: for the
  few-shot section (skipped without them);
* ``dataset``: a name for the records;
* ``seed``: the run's seed (default 0): the random half split and the few-shot draws use it, and
  the records carry it, as the demo's other records carry theirs.

Returns ``(markdown, records)``: a short section (headline, plot, curve) and tidy records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mrl.records import Record

__all__ = ["demo_section"]

# A short sweep keeps the demo quick; the CLI uses the full default sweep.
DEMO_TOLERANCES = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 1.0)


def _get(ctx: Any, name: str) -> Any:
    return getattr(ctx, name, None)


def _seed(ctx: Any) -> int:
    from mrl.params import check_int

    seed = _get(ctx, "seed")
    return 0 if seed is None else check_int(seed, "ctx.seed")


def _inputs(ctx: Any):
    """(logits [G, N, C], labels [N], nesting, calib_index or None, embeddings or None)."""
    logits, labels, nesting = _get(ctx, "test_logits"), _get(ctx, "test_labels"), None
    emb = _get(ctx, "test_embeddings")
    if logits is None:
        if _get(ctx, "run_dir") is None:
            raise ValueError("demo_section needs ctx.test_logits + ctx.test_labels or ctx.run_dir")
        from mrl.cascade.runs import load_source

        data = load_source(ctx.run_dir, "test")
        logits, labels, nesting = data.logits, data.labels, data.nesting
        emb = emb if emb is not None else data.embeddings
    nesting = _get(ctx, "nesting") or nesting
    if nesting is None:
        raise ValueError("demo_section needs ctx.nesting with ctx.test_logits")
    logits, labels = _np(logits), _np(labels)
    calib_index = None
    if (_get(ctx, "calib_logits") is None) != (_get(ctx, "calib_labels") is None):
        raise ValueError("demo_section needs ctx.calib_logits and ctx.calib_labels together, got "
                         "only ctx." + ("calib_logits" if _get(ctx, "calib_labels") is None
                                        else "calib_labels"))
    if _get(ctx, "calib_logits") is not None:  # separate calibration set: stack it first
        cl, cy = _np(ctx.calib_logits), _np(ctx.calib_labels)
        if cl.ndim != 3 or cl.shape[::2] != logits.shape[::2] or cy.shape != cl.shape[1:2]:
            raise ValueError(f"ctx.calib_logits must be [G, N_calib, C] with the test logits' "
                             f"(G, C) {logits.shape[::2]} and ctx.calib_labels [N_calib], got "
                             f"{cl.shape} and {cy.shape}")
        calib_index = np.arange(cl.shape[1])
        logits = np.concatenate([cl, logits], axis=1)
        labels = np.concatenate([cy, labels])
    return logits, labels, nesting, calib_index, emb


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def demo_section(ctx: Any) -> tuple[str, list[Record]]:
    from mrl.cascade.evaluate import evaluate_cascade, summarize
    from mrl.cascade.report import curve_table, headline_markdown, plot_curves

    logits, labels, nesting, calib_index, emb = _inputs(ctx)
    ff = {int(m): _np(v) for m, v in (_get(ctx, "ff_logits") or {}).items()}
    if calib_index is not None and ff:
        raise ValueError("ff_logits cannot be combined with calib_logits in the demo section")
    context = {"dataset": ctx.dataset} if _get(ctx, "dataset") else {}
    records, summaries = evaluate_cascade(
        logits, labels, nesting, ff_scores=ff, seeds=(_seed(ctx),), tolerances=DEMO_TOLERANCES,
        calib_index=calib_index, **context,
    )  # fmt: skip
    out = Path(ctx.out_dir)
    plot_curves(summaries, out / "cascade.png", title="Adaptive classification (cascade)")
    s = summaries[0]
    split = (
        "a separate calibration set"
        if calib_index is not None
        else f"a random half of the test set (seed {_seed(ctx)}; {s['n_calib']} calibration, "
        f"{s['n_test']} test)"
    )
    md = [
        "## Adaptive classification (cascade)",
        "",
        "Smallest prefix first; move to the next prefix only when the max softmax probability is "
        f"below a threshold tuned on {split}. Numbers are on the test part.",
        "",
        headline_markdown(summarize(summaries)),
        "",
        "![cascade: accuracy vs expected dims](cascade.png)",
        "",
        curve_table(s),
    ]
    few_md, few_recs = _fewshot(ctx, nesting, emb, labels, calib_index, context)
    return "\n".join(md) + few_md, records + few_recs


def _fewshot(ctx, nesting, test_emb, labels, calib_index, context) -> tuple[str, list[Record]]:
    from mrl.fewshot import few_shot_eval
    from mrl.records import to_markdown

    pool, pool_y = _get(ctx, "train_embeddings"), _get(ctx, "train_labels")
    if pool is None or pool_y is None or test_emb is None:
        return "", []
    test_y = labels if calib_index is None else labels[len(calib_index) :]
    recs = few_shot_eval(_np(pool), _np(pool_y), _np(test_emb), test_y, nesting,
                         shots=(1, 5, 10), draws=3, seed=_seed(ctx), **context)  # fmt: skip
    table = to_markdown([{**r, "value": 100 * r["value"]} for r in recs])
    md = (
        "\n\n## Few-shot nearest class mean at every prefix (accuracy %)\n\n"
        "Class means of n train embeddings per class (3 seeded draws), re-normalised prefixes, "
        "cosine to the test embeddings.\n\n" + table + "\n"
    )
    return md, recs
