"""Cascade audit: results re-computed by an independent per-sample loop, and the bad input and
ignored options that used to give tracebacks, unnamed errors or silent no-ops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_cascade_cli import NEST, synthetic

from mrl import Nesting
from mrl.cascade import Cascade, evaluate_cascade, fit_cascade, oracle, split_calibration
from mrl.cascade.runs import LogitsSet, save_logits
from mrl.cli import main


def _loop(logits, y, sizes, thresholds):
    """Accuracy, expected dims and expected head dims, one sample and one prefix at a time:
    answer at the first prefix whose max softmax probability is >= its threshold, else the last."""
    G, N, _ = logits.shape
    right = dims = head_dims = 0
    for i in range(N):
        for g in range(G):
            z = np.asarray(logits[g, i], dtype=np.float64)
            p = np.exp(z - z.max())
            if g == G - 1 or (p / p.sum()).max() >= thresholds[g]:
                right += int(z.argmax() == y[i])
                dims += sizes[g]
                head_dims += sum(sizes[: g + 1])
                break
    return right / N, dims / N, head_dims / N


def _held_out(n, fraction, seed):
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[int(round(n * fraction)):])


@pytest.fixture
def src(tmp_path):
    mrl, y, _, emb = synthetic()
    path = tmp_path / "mrl.npz"
    save_logits(path, LogitsSet(mrl, y, NEST, emb, {"dataset": "toy"}))
    return path


# ----------------------------------------------------------------------------- re-computation
def test_cli_fit_results_match_an_independent_loop_over_the_saved_thresholds(src, capsys):
    mrl, y, _, _ = synthetic()
    out = src.with_name("c.json")
    assert main(["cascade", "fit", str(src), "--seed", "3", "--calib-fraction", "0.4",
                 "--tolerance", "0.01", "--out", str(out)]) == 0  # fmt: skip
    saved = json.loads(out.read_text())
    th, info = saved["thresholds"], saved["info"]
    held = _held_out(len(y), 0.4, 3)
    cal = np.setdiff1d(np.arange(len(y)), held)
    acc, dims, head_dims = _loop(mrl[:, held], y[held], list(NEST.sizes), th)
    assert info["heldout"]["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert info["heldout"]["expected_dims"] == pytest.approx(dims, abs=1e-9)
    assert info["heldout"]["expected_head_dims"] == pytest.approx(head_dims, abs=1e-9)
    acc, dims, _ = _loop(mrl[:, cal], y[cal], list(NEST.sizes), th)
    assert info["calib_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert info["calib_expected_dims"] == pytest.approx(dims, abs=1e-9)
    capsys.readouterr()
    assert main(["cascade", "eval", str(out)]) == 0
    assert f"accuracy {100 * info['heldout']['accuracy']:.2f} %" in capsys.readouterr().out


def test_curve_matched_point_and_oracle_match_an_independent_loop():
    mrl, y, _, _ = synthetic(seed=5, n=300)
    sizes = list(NEST.sizes)
    _, summaries = evaluate_cascade(mrl, y, NEST, seeds=(0, 7), tolerances=(0.0, 0.01, 0.1))
    for s in summaries:
        tst = _held_out(len(y), 0.5, s["seed"])
        for p in [*s["curve"], s["matched"]]:
            th = p["thresholds"]  # None: the curve's full-size end, every sample at the last
            th = [2.0] * (len(sizes) - 1) if th is None else th
            acc, dims, head_dims = _loop(mrl[:, tst], y[tst], sizes, th)
            assert p["accuracy"] == pytest.approx(acc, abs=1e-12)
            assert p["expected_dims"] == pytest.approx(dims, abs=1e-9)
            assert p["expected_head_dims"] == pytest.approx(head_dims, abs=1e-9)
        right = dims = 0
        for i in tst:  # the oracle: the first prefix that is right, else the last
            g = next((g for g in range(len(sizes)) if mrl[g, i].argmax() == y[i]), len(sizes) - 1)
            right += int(mrl[g, i].argmax() == y[i])
            dims += sizes[g]
        assert s["oracle_accuracy"] == pytest.approx(right / len(tst), abs=1e-12)
        assert s["oracle_expected_dims"] == pytest.approx(dims / len(tst), abs=1e-9)
        labels, used = oracle(mrl[:, tst], y[tst], NEST)
        assert used.mean() == pytest.approx(dims / len(tst))


@pytest.mark.parametrize("seed", range(6))
def test_fit_never_needs_more_dims_than_a_fixed_prefix_reaching_the_target(seed):
    # docs/cascade.md: "on calibration the cascade is never worse than a fixed prefix"
    # Tolerances down to where prefixes 8, 4 and 2 reach the target (accuracies about 0.44 /
    # 0.67 / 0.86 / 0.96): with only 16 reaching it (as once) the check could not fail.
    mrl, y, _, _ = synthetic(seed=seed, n=200)
    accs = (mrl.argmax(axis=2) == y[None]).mean(axis=1)
    checked_below_full = 0
    for tol in (-0.01, 0.0, 0.05, 0.15, 0.3, 0.55):
        cas = fit_cascade(mrl, y, NEST, tolerance=tol)
        for g, m in enumerate(NEST.sizes):
            if accs[g] >= cas.info["target"] - 1e-12:
                assert cas.info["calib_expected_dims"] <= m + 1e-9, (tol, m)
                checked_below_full += m < NEST.dim
    assert checked_below_full >= 3


# ----------------------------------------------------------------------------- bad input
def test_thresholds_that_are_not_numbers_are_named():
    # was: TypeError "float() argument must be ... not 'NoneType'" / "'float' object is not
    # iterable", and "could not convert string to float: '.'" for "0.5,0.5"
    with pytest.raises(ValueError, match=r"thresholds\[1\] must be a number in \[0, 1\], got None"):
        Cascade(NEST, (0.5, None, 0.5))
    with pytest.raises(ValueError, match=r"thresholds\[0\] must be a number in \[0, 1\], got 'a'"):
        Cascade(NEST, ("a", 0.5, 0.5))
    with pytest.raises(ValueError, match=r"a sequence of G-1=3 numbers, got 0.5"):
        Cascade(NEST, 0.5)
    with pytest.raises(ValueError, match="thresholds must be a sequence of G-1=3 numbers"):
        Cascade(NEST, "0.5,0.5,0.5")
    assert Cascade(NEST, np.array([0.5, 1, 0])).thresholds == (0.5, 1.0, 0.0)


def test_fit_options_that_are_not_numbers_are_named():
    mrl, y, _, _ = synthetic(n=50)
    for kw, name in [({"tolerance": "x"}, "tolerance"), ({"target_accuracy": "x"},
                     "target_accuracy"), ({"budget": "x"}, "budget"), ({"budget": None,
                     "tolerance": [0.1]}, "tolerance")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"^{name} must be a number, got"):
            fit_cascade(mrl, y, NEST, **kw)


def test_negative_seeds_are_named():
    # numpy's message was "expected non-negative integer", naming no parameter
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        split_calibration(10, 0.5, -1)
    with pytest.raises(ValueError, match="seed must be a non-negative int, got 1.5"):
        split_calibration(10, 0.5, 1.5)


def test_cli_negative_seeds_are_named(src, capsys):
    assert main(["cascade", "fit", str(src), "--seed", "-1"]) == 2
    assert "--seed must be a non-negative int, got --seed -1" in capsys.readouterr().err
    assert main(["cascade", "eval", str(src), "--seeds", "0,-2"]) == 2
    assert "--seeds must be distinct non-negative ints, got --seeds 0,-2" in capsys.readouterr().err
    assert main(["cascade", "eval", str(src), "--seeds", "1,1"]) == 2  # was: n=2, std 0
    assert "--seeds must be distinct non-negative ints, got --seeds 1,1" in capsys.readouterr().err
    mrl, y, _, _ = synthetic(n=60)
    with pytest.raises(ValueError, match=r"seeds must be distinct, got \[0, 0\]"):
        evaluate_cascade(mrl, y, NEST, seeds=(0, 0))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"thresholds": [None, 0.5, 0.5]}, "thresholds[0] must be a number in [0, 1], got None"),
        ({"info": {"seed": "x"}}, "info 'seed' must be a non-negative int, got 'x'"),
        ({"info": {"seed": -3}}, "info 'seed' must be a non-negative int, got -3"),
        ({"info": {"calib_fraction": "a"}}, "info 'calib_fraction' must be in (0, 1), got 'a'"),
        ({"info": {"source": 5}}, "does not name its source (info 'source': 5)"),
    ],
)
def test_hand_edited_cascade_files_are_one_line_errors(src, capsys, edit, message):
    out = src.with_name("c.json")
    assert main(["cascade", "fit", str(src), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    for key, value in edit.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    out.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["cascade", "eval", str(out)]) == 2  # was a traceback for most of these
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- ignored options
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--calib-fraction", "0.3"], "--calib-fraction"),
        (["--fewshot-pool", "train"], "--fewshot-pool"),
        # typed at their defaults' values: ignored silently, before (only the split was tracked)
        (["--calib-fraction", "0.5"], "--calib-fraction"),
        (["--seeds", "0,1,2"], "--seeds"),
        (["--match", "0.005"], "--match"),
        (["--notes", ""], "--notes"),
    ],
)
def test_eval_of_a_cascade_file_refuses_options_it_would_ignore(src, capsys, argv, flag):
    out = src.with_name("c.json")
    assert main(["cascade", "fit", str(src), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["cascade", "eval", str(out), *argv]) == 2  # was: rc 0, the option unused
    assert f"{flag} apply to a run folder or logits file" in capsys.readouterr().err


def test_eval_of_a_cascade_file_refuses_another_split_without_logits(src, capsys):
    out = src.with_name("c.json")
    assert main(["cascade", "fit", str(src), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["cascade", "eval", str(out), "--split", "train"]) == 2  # was: the test split
    assert "--split train without --logits" in capsys.readouterr().err
    assert main(["cascade", "eval", str(out), "--split", "test"]) == 0
    # fitted on train: an explicit --split test (the default's value) is refused too
    mrl, y, _, emb = synthetic()
    train_src = src.with_name("train.npz")
    save_logits(train_src, LogitsSet(mrl, y, NEST, emb, {"dataset": "toy", "split": "train"}))
    fitted = src.with_name("ctrain.json")
    assert main(["cascade", "fit", str(train_src), "--split", "train", "--out", str(fitted)]) == 0
    capsys.readouterr()
    assert main(["cascade", "eval", str(fitted), "--split", "test"]) == 2
    assert "--split test without --logits" in capsys.readouterr().err
    assert main(["cascade", "eval", str(fitted)]) == 0  # its own split


@pytest.mark.parametrize("pool", ["train", "test"])
def test_fewshot_pool_without_fewshot_is_refused(src, capsys, tmp_path, pool):
    rc = main(["cascade", "eval", str(src), "--fewshot-pool", pool, "--out",
               str(tmp_path / "e")])  # fmt: skip
    assert rc == 2  # was: rc 0, --fewshot-pool ignored (test: the default's value, too)
    assert f"--fewshot-pool {pool} applies with --fewshot only" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- atomic outputs
def test_an_interrupted_plot_leaves_the_previous_png_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from mrl.cascade.report import plot_curves

    mrl, y, _, _ = synthetic(n=100)
    _, summaries = evaluate_cascade(mrl, y, NEST, seeds=(0,), tolerances=(0.0, 0.1))
    png = tmp_path / "cascade.png"
    plot_curves(summaries, png)
    before = png.read_bytes()

    def interrupted(self, fname, *args, **kwargs):  # writes a little, then dies
        f = open(fname, "wb") if isinstance(fname, (str, Path)) else fname  # noqa: SIM115
        f.write(b"\x89PNG half")
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plot_curves(summaries, png)
    assert png.read_bytes() == before  # was truncated to the half-written bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cascade.png"]


def test_evaluation_takes_a_nesting_as_a_list_or_spec_as_fit_does():
    # fit_cascade, Cascade and oracle coerce a nesting; these raised AttributeError on .sizes
    mrl, y, _, _ = synthetic(n=60)
    want, _ = evaluate_cascade(mrl, y, NEST, seeds=(0,), tolerances=(0.0,))
    for nesting in ([2, 4, 8, 16], "2,4,8,16"):
        got, _ = evaluate_cascade(mrl, y, nesting, seeds=(0,), tolerances=(0.0,))
        assert got == want
    from mrl.cascade import cascade_costs

    stop = np.array([0, 3])
    assert cascade_costs(stop, [2, 4, 8, 16]) == cascade_costs(stop, NEST)


def test_evaluate_cascade_names_bad_numbers_and_ff_sizes():
    mrl, y, ff, _ = synthetic(n=60)
    with pytest.raises(ValueError, match=r"^match must be a number, got 'x'"):
        evaluate_cascade(mrl, y, NEST, match="x")  # was: could not convert string to float
    with pytest.raises(ValueError, match=r"^calib_fraction must be a number, got 'x'"):
        evaluate_cascade(mrl, y, NEST, calib_fraction="x")
    with pytest.raises(ValueError, match=r"^calib_fraction must be a number, got None"):
        split_calibration(10, None)
    for key in (8.5, "x", 0, "\u00b2"):  # 8.5 was silently FF-8; "x", "²" unnamed int() errors
        with pytest.raises(ValueError, match=rf"ff_scores keys must be FF sizes .*got {key!r}"):
            evaluate_cascade(mrl, y, NEST, ff_scores={key: ff[8]}, seeds=(0,))
    kw = {"seeds": (0,), "tolerances": (0.0,)}
    assert (evaluate_cascade(mrl, y, NEST, ff_scores={"8": ff[8]}, **kw)[0]
            == evaluate_cascade(mrl, y, NEST, ff_scores={8: ff[8]}, **kw)[0])  # fmt: skip
    once = evaluate_cascade(mrl, y, NEST, seeds=iter((0, 1)), tolerances=(0.0,))[0]  # an iterator
    assert once == evaluate_cascade(mrl, y, NEST, seeds=(0, 1), tolerances=(0.0,))[0]


def test_records_of_a_fixed_calibration_part_give_its_fraction():
    mrl, y, _, _ = synthetic(n=400)
    recs, summaries = evaluate_cascade(mrl, y, NEST, calib_index=np.arange(100),
                                       tolerances=(0.0,))  # fmt: skip
    per_seed = [r for r in recs if r.get("seed") is not None]
    assert {r["n_calib"] for r in per_seed} == {100}
    assert {r["calib_fraction"] for r in per_seed} == {0.25}  # was 0.5, the unused default


# ----------------------------------------------------------------------------- saturation, budget
def test_fast_greedy_matches_the_reference_under_heavy_saturation():
    """Small calibration sets where many (or all) confidences are exactly 1.0: the fast fit once
    left threshold 0 on an all-saturated prefix it could not use (the reference keeps 1) and put
    1.0 where the reference puts the midpoint below the saturated samples."""
    from mrl import Nesting
    from mrl.cascade.core import _greedy_thresholds, confidence, fit_cascade_reference

    rng = np.random.default_rng(11)
    for _ in range(150):
        G, C, N = int(rng.integers(2, 5)), int(rng.integers(2, 4)), int(rng.integers(1, 25))
        nest = Nesting(tuple(2 ** np.arange(1, G + 1)))
        y = rng.integers(0, C, N)
        logits = np.round(rng.normal(size=(G, N, C)) * rng.choice([1, 3]))
        logits[:, :, 0] += np.where(rng.random((G, N)) < rng.choice([0.0, 0.3, 0.9, 1.0]), 60, 0)
        conf, pred = confidence(logits, nest)
        correct = pred == y
        target = float(rng.choice([correct[-1].mean(), rng.random(), 0.0, 1.0]))
        for start in range(G):
            fast = _greedy_thresholds(conf, correct, target, start)
            ref = fit_cascade_reference(logits, y, nest, target, start=start)
            assert tuple(fast) == tuple(ref), (fast, ref)


def test_an_all_saturated_wrong_prefix_keeps_threshold_one():
    """Prefix 2 saturated and wrong everywhere on calibration: the fit cannot use it, so it must
    not answer there on unseen data either (threshold 0 answered everything at 2 dims)."""
    n, c = 20, 3
    y = np.arange(n) % c
    cal = np.zeros((2, n, c))
    cal[0, np.arange(n), (y + 1) % c] = 50.0  # softmax exactly 1.0, wrong class
    cal[1, np.arange(n), y] = 3.0
    cas = fit_cascade(cal, y, (2, 4), tolerance=0.0)
    assert cas.thresholds == (1.0,)
    unseen = np.zeros((2, n, c))
    unseen[0, np.arange(n), (y + 1) % c] = 0.2  # no longer saturated
    unseen[1, np.arange(n), y] = 3.0
    res = cas.evaluate(unseen, y)
    assert res["accuracy"] == 1.0 and res["expected_dims"] == 4.0


def test_budget_finds_a_cascade_more_accurate_than_every_single_prefix():
    """Prefix 2 is right and sure on half the samples, prefix 4 right on another 60 %: a cascade
    is right on all at 3 dims. The budget sweep stopped at the best single prefix (0.6)."""
    n, c = 100, 4
    y = np.arange(n) % c
    logits = np.zeros((2, n, c))
    for i in range(n):
        if i < 50:
            logits[0, i, y[i]] = 4.0
        else:
            logits[0, i, (y[i] + 1) % c] = 0.5 + 0.01 * i
        logits[1, i, y[i] if i >= 40 else (y[i] + 1) % c] = 2.0
    cas = fit_cascade(logits, y, (2, 4), budget=4)
    assert cas.info["calib_accuracy"] == 1.0
    assert cas.info["calib_expected_dims"] == 3.0
    acc, dims, _ = _loop(logits, y, (2, 4), cas.thresholds)
    assert (acc, dims) == (1.0, 3.0)


def test_budget_is_never_less_accurate_than_a_fixed_prefix_within_it():
    mrl, y, _, _ = synthetic(seed=2, n=200)
    accs = (mrl.argmax(axis=2) == y[None]).mean(axis=1)
    for budget in (2, 4.5, 8, 12, 16):
        cas = fit_cascade(mrl, y, NEST, budget=budget)
        assert cas.info["calib_expected_dims"] <= budget + 1e-9
        best_fixed = max(a for a, m in zip(accs, NEST.sizes) if m <= budget)
        assert cas.info["calib_accuracy"] >= best_fixed - 1e-12


def test_an_infinite_budget_is_refused_by_name(tmp_path, capsys):
    mrl, y, _, _ = synthetic(seed=0, n=40)
    with pytest.raises(ValueError, match=r"budget must be a finite number .* got inf"):
        fit_cascade(mrl, y, NEST, budget=float("inf"))
    src = tmp_path / "l.npz"
    save_logits(src, LogitsSet(mrl.astype(np.float32), y, NEST))
    assert main(["cascade", "fit", str(src), "--budget", "1e999"]) == 2
    assert "--budget must be a positive number (expected dims), got --budget inf" in (
        capsys.readouterr().err)


def test_seeds_that_are_not_non_negative_ints_are_named():
    mrl, y, ff, _ = synthetic(seed=0, n=60)
    for bad in ((0.5,), ("x",), (0, -1)):
        with pytest.raises(ValueError, match=r"seeds\[\d\] must be a non-negative int"):
            evaluate_cascade(mrl, y, NEST, ff_scores=ff, seeds=bad)


def test_cli_fit_checks_the_whole_source_and_names_calib_fraction(tmp_path, capsys):
    rng = np.random.default_rng(0)
    one_class = tmp_path / "one.npz"
    save_logits(one_class, LogitsSet(rng.normal(size=(2, 50, 1)).astype(np.float32),
                                     np.zeros(50, dtype=np.int64), Nesting((2, 4))))
    assert main(["cascade", "fit", str(one_class)]) == 2
    assert "got shape (2, 50, 1)" in capsys.readouterr().err  # the source's, not a half's
    tiny = tmp_path / "tiny.npz"
    save_logits(tiny, LogitsSet(rng.normal(size=(2, 1, 3)).astype(np.float32),
                                np.zeros(1, dtype=np.int64), Nesting((2, 4))))
    assert main(["cascade", "fit", str(tiny)]) == 2
    assert "--calib-fraction=0.5 of 1 samples" in capsys.readouterr().err


def test_plot_reference_is_the_seed_mean():
    from mrl.cascade.report import _seed_mean

    a = {"mrl_accuracy": {2: 0.5, 4: 0.7}, "ff_accuracy": {2: 0.6}, "oracle_expected_dims": 3.0,
         "oracle_accuracy": 0.9, "reference_test_accuracy": 0.8, "reference": "ff-4"}
    b = {**a, "mrl_accuracy": {2: 0.7, 4: 0.9}, "ff_accuracy": {2: 0.8},
         "oracle_expected_dims": 5.0, "oracle_accuracy": 0.7, "reference_test_accuracy": 0.6}
    m = _seed_mean([a, b])
    assert m["mrl_accuracy"] == pytest.approx({2: 0.6, 4: 0.8})
    assert m["ff_accuracy"] == pytest.approx({2: 0.7})
    assert (m["oracle_expected_dims"], m["oracle_accuracy"]) == pytest.approx((4.0, 0.8))
    assert m["reference_test_accuracy"] == pytest.approx(0.7)


def test_fewshot_table_says_the_head_classes_support_it_used():
    """The text said heads get 100 examples; the command gives min(100, the smallest class)."""
    from mrl.cascade.report import _fewshot_tables
    from mrl.records import make_record

    recs = [make_record("mrl", 8, "ncm_1shot", 0.5, seed=0),
            make_record("mrl", 8, "lt1_all", 0.4, seed=0, head_shots=37)]
    assert "the others 37;" in _fewshot_tables(recs)
    recs[1]["head_shots"] = None
    assert "the others all they have;" in _fewshot_tables(recs)


def test_fewshot_train_pool_with_the_train_split_is_refused(src, capsys, tmp_path):
    """Support and queries were the same training images (records said support_from train)."""
    run = tmp_path / "run"
    run.mkdir()
    rc = main(["cascade", "eval", str(run), "--split", "train", "--fewshot", "--fewshot-pool",
               "train", "--out", str(tmp_path / "e")])  # fmt: skip
    assert rc == 2
    assert "--fewshot-pool train with --split train would draw the support from the very" in (
        capsys.readouterr().err)


def test_eval_refuses_a_demo_folder_and_names_a_too_small_calib_fraction(src, capsys, tmp_path):
    demo = tmp_path / "demo"
    (demo / "runs").mkdir(parents=True)
    (demo / "demo.md").write_text("demo")
    (demo / "cascade.png").write_bytes(b"the demo's plot")
    assert main(["cascade", "eval", str(src), "--out", str(demo)]) == 2
    assert "holds demo.md: it is another command's folder" in capsys.readouterr().err
    assert (demo / "cascade.png").read_bytes() == b"the demo's plot"
    assert main(["cascade", "eval", str(src), "--calib-fraction", "0.0001", "--out",
                 str(tmp_path / "e")]) == 2  # fmt: skip
    assert "--calib-fraction=0.0001 of" in capsys.readouterr().err
