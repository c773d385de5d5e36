"""`mrl cascade fit|eval` end to end on synthetic logits files; evaluation records and headline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mrl import Nesting
from mrl.cascade import evaluate_cascade, split_calibration, summarize
from mrl.cascade.runs import LogitsSet, load_logits, save_logits
from mrl.cli import main
from mrl.records import load_records

NEST = Nesting((2, 4, 8, 16))


def synthetic(seed: int = 0, n: int = 400, c: int = 5):
    """MRL logits whose accuracy grows with the prefix, and FF logits of each size."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    mrl = rng.normal(size=(len(NEST), n, c))
    mrl[:, np.arange(n), y] += np.array([0.8, 1.6, 2.4, 3.2])[:, None]
    ff = {}
    for m, s in zip(NEST.sizes, (0.9, 1.7, 2.5, 3.2)):
        f = rng.normal(size=(n, c))
        f[np.arange(n), y] += s
        ff[m] = f
    emb = rng.normal(size=(n, 16))
    emb[np.arange(n), y] += 2.0
    return mrl, y, ff, emb


@pytest.fixture
def files(tmp_path):
    mrl, y, ff, emb = synthetic()
    save_logits(tmp_path / "mrl.npz", LogitsSet(mrl, y, NEST, emb, {"dataset": "toy"}))
    paths = []
    for m, f in ff.items():
        p = tmp_path / f"ff{m}.npz"
        save_logits(p, LogitsSet(f[None], y, Nesting((16,)), emb, {"mode": "ff", "ff_dim": m}))
        paths.append(str(p))
    return tmp_path, paths


def test_logits_file_roundtrip(files):
    tmp, _ = files
    d = load_logits(tmp / "mrl.npz")
    assert d.nesting == NEST and d.logits.shape == (4, 400, 5) and d.meta == {"dataset": "toy"}
    assert load_logits(tmp / "ff4.npz").size == 4


def test_fit_then_eval_file(files, capsys):
    tmp, _ = files
    assert main(["cascade", "fit", str(tmp / "mrl.npz"), "--tolerance", "0.01"]) == 0
    cfile = tmp / "mrl.cascade.json"
    info = json.loads(cfile.read_text())["info"]
    assert info["seed"] == 0 and info["calib_fraction"] == 0.5 and info["tolerance"] == 0.01
    assert main(["cascade", "eval", str(cfile)]) == 0
    out = capsys.readouterr().out
    assert f"{100 * info['heldout']['accuracy']:.2f} %" in out and "held-out part" in out
    assert main(["cascade", "fit", str(tmp / "mrl.npz"), "--budget", "5", "--out",
                 str(tmp / "b.json")]) == 0
    assert json.loads((tmp / "b.json").read_text())["info"]["calib_expected_dims"] <= 5


def test_eval_file_on_its_own_source_measures_only_the_held_out_part(files, capsys):
    # --logits naming the samples the cascade was fitted on used to count the calibration half
    # too (all 400 samples) and report that as the cascade's accuracy.
    tmp, _ = files
    assert main(["cascade", "fit", str(tmp / "mrl.npz")]) == 0
    cfile = tmp / "mrl.cascade.json"
    held = f"{100 * json.loads(cfile.read_text())['info']['heldout']['accuracy']:.2f} %"
    shutil.copy(tmp / "mrl.npz", tmp / "copy.npz")  # recognised by its fingerprint
    run = tmp / "run"
    run.mkdir()
    shutil.copy(tmp / "mrl.npz", run / "logits-test.npz")  # a run folder's cached logits
    assert main(["cascade", "fit", str(run), "--out", str(tmp / "r.json")]) == 0
    old = json.loads((tmp / "r.json").read_text())
    old["info"].pop("fingerprint", None)  # a cascade file from before fingerprints: by path
    (tmp / "r.json").write_text(json.dumps(old))
    capsys.readouterr()
    for cas, given in [(cfile, "mrl.npz"), (cfile, "copy.npz"), (tmp / "r.json", "run"),
                       (tmp / "r.json", "run/logits-test.npz")]:  # fmt: skip
        assert main(["cascade", "eval", str(cas), "--logits", str(tmp / given)]) == 0
        out = capsys.readouterr().out
        assert out.startswith("200 samples (the held-out part of --logits, which is the source")
        assert "its other 200 samples calibrated it" in out and held in out, given
    mrl, y, _, _ = synthetic(1)
    save_logits(tmp / "other.npz", LogitsSet(mrl, y, NEST))
    assert main(["cascade", "eval", str(cfile), "--logits", str(tmp / "other.npz")]) == 0
    assert capsys.readouterr().out.startswith("400 samples (all of --logits)")


def test_eval_file_for_another_nesting_is_a_clear_error(files, capsys):
    tmp, _ = files
    main(["cascade", "fit", str(tmp / "mrl.npz")])
    mrl, y, _, _ = synthetic(1)
    save_logits(tmp / "other.npz", LogitsSet(mrl, y, Nesting((2, 4, 8, 32))))
    rc = main(["cascade", "eval", str(tmp / "mrl.cascade.json"), "--logits",
               str(tmp / "other.npz")])
    assert rc == 2
    assert "fitted for nesting [2, 4, 8, 16], but the model's nesting is [2, 4, 8, 32]" in (
        capsys.readouterr().err)


def test_eval_curves_writes_records_markdown_and_plot(files):
    tmp, ff = files
    out = tmp / "res"
    rc = main(["cascade", "eval", str(tmp / "mrl.npz"), "--ff", *ff, "--seeds", "0,1",
               "--out", str(out), "--fewshot"])
    assert rc == 0
    recs = load_records(out / "cascade.json")
    methods = {(r["method"], r["metric"]) for r in recs}
    for key in [("cascade", "accuracy"), ("cascade", "expected_dims"), ("oracle", "accuracy"),
                ("oracle", "expected_dims"), ("ff", "accuracy"), ("ff", "expected_dims"),
                ("mrl", "ncm_1shot"), ("ff", "lt1_tail")]:
        assert key in methods
    assert all(r["dataset"] == "toy" for r in recs)
    md = (out / "cascade.md").read_text()
    assert "x smaller" in md and "Few-shot" in md and (out / "cascade.png").stat().st_size > 0
    assert "seeded half of the split" in md
    assert all(r["split"] == "test" for r in recs if "seed" in r and r["method"] != "mrl"
               or r["metric"] == "accuracy")  # fmt: skip


def test_fewshot_train_pool_needs_run_folders(files, capsys):
    # A logits file holds one split only: a training pool cannot come from it (it used to be
    # the test split, silently).
    tmp, _ = files
    rc = main(["cascade", "eval", str(tmp / "mrl.npz"), "--seeds", "0", "--out",
               str(tmp / "res"), "--fewshot", "--fewshot-pool", "train"])  # fmt: skip
    assert rc == 2
    assert "--fewshot-pool train forwards training images and needs run folders" in (
        capsys.readouterr().err)
    assert not (tmp / "res").exists()  # refused before any work


def test_fewshot_support_coverage_is_checked_before_any_work(tmp_path, capsys):
    # 60 classes in 400 samples: a half-split pool cannot hold 10 examples of every class. This
    # used to fail after the cascade work, naming no option, and leave nothing written.
    y = np.random.default_rng(0).integers(0, 60, 400)
    mrl = np.random.default_rng(1).normal(size=(len(NEST), 400, 60))
    emb = np.random.default_rng(2).normal(size=(400, 16))
    save_logits(tmp_path / "many.npz", LogitsSet(mrl, y, NEST, emb))
    out = tmp_path / "res"
    rc = main(["cascade", "eval", str(tmp_path / "many.npz"), "--seeds", "0", "--out", str(out),
               "--fewshot"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "--fewshot needs 10 support examples (shots [1, 5, 10]) and a query of every" in err
    assert "with --fewshot-pool test (support: a seeded half of the split" in err
    assert "classes of" in err and "fall short" in err and "drop --fewshot" in err
    assert not out.exists()  # refused before any work
    run = tmp_path / "run"  # a run folder (cached logits): its training images may do
    run.mkdir()
    shutil.copy(tmp_path / "many.npz", run / "logits-test.npz")
    assert main(["cascade", "eval", str(run), "--seeds", "0", "--fewshot"]) == 2
    assert "try --fewshot-pool train (5000 training images), or drop" in capsys.readouterr().err
    assert not (run / "cascade-eval").exists()


def test_cascade_outputs_are_written_before_the_fewshot_step(files, monkeypatch, capsys):
    import mrl.fewshot

    def broken(*args, **kwargs):
        raise ValueError("few-shot broke")

    monkeypatch.setattr(mrl.fewshot, "few_shot_eval", broken)
    tmp, ff = files
    out = tmp / "res"
    rc = main(["cascade", "eval", str(tmp / "mrl.npz"), "--ff", *ff, "--seeds", "0", "--out",
               str(out), "--fewshot"])  # fmt: skip
    assert rc == 2 and "few-shot broke" in capsys.readouterr().err
    recs = load_records(out / "cascade.json")  # the finished cascade work is kept
    assert {"cascade", "oracle", "ff"} <= {r["method"] for r in recs}
    assert (out / "cascade.md").is_file() and (out / "cascade.png").is_file()


def test_a_logits_file_of_another_split_is_refused(files, capsys):
    tmp, _ = files
    mrl, y, _, _ = synthetic()
    save_logits(tmp / "tr.npz", LogitsSet(mrl, y, NEST, meta={"split": "train"}))
    assert main(["cascade", "fit", str(tmp / "tr.npz")]) == 2
    assert "holds logits of split 'train', not of split 'test'" in capsys.readouterr().err
    assert main(["cascade", "fit", str(tmp / "tr.npz"), "--split", "train"]) == 0
    with pytest.raises(SystemExit):  # argparse's choices
        main(["cascade", "fit", str(tmp / "tr.npz"), "--split", "val"])
    assert "invalid choice: 'val'" in capsys.readouterr().err


def test_fit_never_overwrites_its_source_or_other_files(files, capsys):
    tmp, _ = files
    before = (tmp / "mrl.npz").read_bytes()
    assert main(["cascade", "fit", str(tmp / "mrl.npz"), "--out", str(tmp / "mrl.npz")]) == 2
    assert "--out must be a cascade file ending in .json" in capsys.readouterr().err
    (tmp / "config.json").write_text('{"epochs": 3}')
    assert main(["cascade", "fit", str(tmp / "mrl.npz"), "--out", str(tmp / "config.json")]) == 2
    assert "exists and is not a cascade file; refusing to overwrite it" in capsys.readouterr().err
    assert (tmp / "mrl.npz").read_bytes() == before
    assert (tmp / "config.json").read_text() == '{"epochs": 3}'
    assert main(["cascade", "fit", str(tmp / "mrl.npz"), "--out", str(tmp / "c.json")]) == 0
    assert main(["cascade", "fit", str(tmp / "mrl.npz"), "--out", str(tmp / "c.json")]) == 0


def test_eval_never_overwrites_a_fitted_cascade(files, capsys):
    tmp, _ = files
    assert main(["cascade", "fit", str(tmp / "mrl.npz"), "--out", str(tmp / "d" / "cascade.json")]
                ) == 0  # fmt: skip
    fitted = (tmp / "d" / "cascade.json").read_text()
    rc = main(["cascade", "eval", str(tmp / "mrl.npz"), "--seeds", "0", "--out", str(tmp / "d")])
    assert rc == 2
    assert "holds a fitted cascade file (cascade.json)" in capsys.readouterr().err
    assert (tmp / "d" / "cascade.json").read_text() == fitted


def test_default_eval_folders_of_two_files_differ(files):
    tmp, ff = files
    for name in ("mrl.npz", "ff16.npz"):
        assert main(["cascade", "eval", str(tmp / name), "--seeds", "0"]) == 0
    assert (tmp / "mrl-cascade-eval" / "cascade.json").is_file()
    assert (tmp / "ff16-cascade-eval" / "cascade.json").is_file()


def test_eval_file_refuses_curve_options_and_other_class_counts(files, capsys):
    tmp, ff = files
    main(["cascade", "fit", str(tmp / "mrl.npz")])
    cfile = str(tmp / "mrl.cascade.json")
    assert main(["cascade", "eval", cfile, "--ff", *ff, "--seeds", "1"]) == 2
    assert "--ff, --seeds apply to a run folder or logits file" in capsys.readouterr().err
    mrl, y, _, _ = synthetic(c=3)
    save_logits(tmp / "three.npz", LogitsSet(mrl, y, NEST))
    assert main(["cascade", "eval", cfile, "--logits", str(tmp / "three.npz")]) == 2
    assert "was fitted on logits with 5 classes, but" in capsys.readouterr().err
    assert main(["cascade", "eval", str(tmp / "mrl.npz"), "--logits", cfile]) == 2
    assert "--logits applies to a cascade file (.json) source" in capsys.readouterr().err


def test_ff_runs_must_be_distinct_and_not_above_full_size(files, capsys):
    tmp, ff = files
    assert main(["cascade", "eval", str(tmp / "mrl.npz"), "--ff", ff[0], ff[0]]) == 2
    assert "are both of size 2; give one FF model per size" in capsys.readouterr().err
    mrl, y, f, emb = synthetic()
    save_logits(tmp / "ff32.npz", LogitsSet(f[16][None], y, Nesting((32,)), None,
                                            {"mode": "ff", "ff_dim": 32}))  # fmt: skip
    assert main(["cascade", "eval", str(tmp / "mrl.npz"), "--ff", str(tmp / "ff32.npz")]) == 2
    assert "has size 32, above" in capsys.readouterr().err


@pytest.mark.parametrize(
    "data, message",
    [
        ({"format": "mrl-cascade", "version": 1, "thresholds": []}, "lacks ['nesting']"),
        ({"format": "mrl-cascade", "version": 1, "nesting": {"sizes": [2, 4]}},
         "lacks ['thresholds']"),
        ({"format": "mrl-cascade", "version": 1, "nesting": {"sizes": [2, 4]},
          "thresholds": [0.5], "info": [1]}, "'info' must be a JSON object"),
        ({"format": "mrl-cascade", "version": 1, "nesting": {"sizes": 4},
          "thresholds": [0.5]}, "'nesting' is malformed"),
        ({"format": "mrl-cascade", "version": 1, "nesting": {"sizes": [2, 4]},
          "thresholds": 0.5}, "'thresholds' must be a list"),
    ],
)
def test_malformed_cascade_files_are_clear_errors(tmp_path, capsys, data, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    assert main(["cascade", "eval", str(path), "--logits", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_cascade_file_without_its_split_info_names_the_fix(files, capsys):
    tmp, _ = files
    path = tmp / "c.json"
    path.write_text(json.dumps({"format": "mrl-cascade", "version": 1,
                                "nesting": {"sizes": [2, 4, 8, 16]}, "thresholds": [0.5] * 3,
                                "info": {"source": str(tmp / "mrl.npz")}}))  # fmt: skip
    assert main(["cascade", "eval", str(path)]) == 2
    assert "lacks ['calib_fraction', 'seed'] in its info; pass --logits" in capsys.readouterr().err
    assert main(["cascade", "eval", str(path), "--logits", str(tmp / "mrl.npz")]) == 2
    assert "--logits is its source, and its held-out part is unknown: refit it" in (
        capsys.readouterr().err)


def test_bad_logits_files_are_clear_errors(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.npz").write_text("not a zip")
    mrl, y, _, _ = synthetic()
    np.savez(tmp_path / "c.npz", logits=mrl, labels=y.astype(float), nesting=np.array('{"sizes"'
             ': [2, 4, 8, 16]}'))  # fmt: skip
    np.savez(tmp_path / "d.npz", logits=mrl, labels=y[:5], nesting=np.array('{"sizes": [2, 4, 8,'
             ' 16]}'))  # fmt: skip
    np.savez(tmp_path / "e.npz", logits=mrl, labels=y, nesting=np.array("2,4,8,16"))
    for name, message in [("a.txt", "a logits file is an .npz"),
                          ("b.npz", "is not a readable .npz logits file"),
                          ("c.npz", "labels must be integers, got dtype float64"),
                          ("d.npz", "d.npz: labels must be [N]=(400,)"),
                          ("e.npz", "'nesting' and 'meta' must be JSON objects")]:  # fmt: skip
        assert main(["cascade", "fit", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err, name


def test_evaluate_cascade_checks_match_and_ff_scores():
    mrl, y, ff, _ = synthetic()
    for bad in (float("nan"), 2.0, -1.0):
        with pytest.raises(ValueError, match="match must be in"):
            evaluate_cascade(mrl, y, NEST, seeds=(0,), match=bad)
    ff[4] = ff[4].copy()
    ff[4][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"ff_scores\[4\] must be finite"):
        evaluate_cascade(mrl, y, NEST, ff_scores=ff, seeds=(0,))


def test_headline_matches_a_manual_computation():
    mrl, y, ff, _ = synthetic(2, n=1000)
    recs, summ = evaluate_cascade(mrl, y, NEST, ff_scores=ff, seeds=(3,), match=0.005)
    s = summ[0]
    _, test = split_calibration(len(y), 0.5, 3)
    ff_acc = {m: float((f[test].argmax(1) == y[test]).mean()) for m, f in ff.items()}
    ref = ff_acc[16]
    assert s["reference"] == "ff-16" and s["reference_test_accuracy"] == ref
    assert s["fixed_dims_to_match"] == min(m for m, a in ff_acc.items() if a >= ref - 0.005)
    ok = [p["expected_dims"] for p in s["curve"] if p["accuracy"] >= ref - 0.005]
    assert s["cascade_dims_to_match"] == min(ok)
    assert s["x_smaller"] == pytest.approx(s["fixed_dims_to_match"] / min(ok))
    assert summarize(summ)["x_smaller"]["mean"] == pytest.approx(s["x_smaller"])
    matched = [r for r in recs if r.get("point") == "matched"]
    assert {r["metric"] for r in matched} == {"accuracy", "expected_dims"}


def test_bad_eval_arguments(files, capsys):
    tmp, _ = files
    assert main(["cascade", "eval", str(tmp / "mrl.npz"), "--seeds", "a,b"]) == 2
    assert "--seeds must be comma-separated ints, got 'a,b'" in capsys.readouterr().err
    assert main(["cascade", "fit", str(tmp / "mrl.npz"), "--calib-fraction", "1.5"]) == 2
    assert "--calib-fraction must be in (0, 1), got --calib-fraction 1.5" in capsys.readouterr().err
    for argv, message in [
        (["eval", "--match", "-1"], "--match must be in [0, 1), got --match -1.0"),
        (["fit", "--tolerance", "2"], "--tolerance must be in [-1, 1) (accuracy fraction; 0.005 "
         "= 0.5 points), got --tolerance 2.0"),
        (["fit", "--tolerance", "1"], "--tolerance must be in [-1, 1)"),
        (["fit", "--tolerance", "-1.5"], "--tolerance must be in [-1, 1)"),
        (["fit", "--target-accuracy", "90"], "--target-accuracy must be in [0, 1]"),
        (["fit", "--budget", "0"], "--budget must be a positive number"),
    ]:
        assert main(["cascade", argv[0], str(tmp / "mrl.npz"), *argv[1:]]) == 2
        assert message in capsys.readouterr().err
    assert main(["cascade", "fit", str(tmp / "nothing.npz")]) == 2
    assert "no logits file or run folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A tiny run folder (synthetic task, nesting 4, 8, 16) stopped after epoch 1 of 2."""
    from mrl.config import DataConfig, ModelConfig, TrainConfig
    from mrl.train import train

    cfg = TrainConfig(data=DataConfig(dataset="synthetic", train_size=128),
                      model=ModelConfig(dim=16, nesting="4,8,16", width=4), epochs=2,
                      batch_size=64, device="cpu")  # fmt: skip
    run = tmp_path_factory.mktemp("runs") / "interrupted"
    train(cfg, run, progress=False, stop_after_epochs=1)
    return run


def test_negative_tolerance_and_budget_checked_before_the_logits(files, interrupted_run,
                                                                 monkeypatch, capsys):  # fmt: skip
    # docs/cascade.md: a negative tolerance asks for more than the full-size accuracy (the CLI
    # refused it); --budget below the smallest prefix was found only after the logits were
    # computed, as "budget must be >= ..." without naming --budget.
    tmp, _ = files
    assert main(["cascade", "fit", str(tmp / "mrl.npz"), "--tolerance", "-0.01"]) == 0
    info = json.loads((tmp / "mrl.cascade.json").read_text())["info"]
    assert info["tolerance"] == -0.01 and info["target"] > info["calib_full_accuracy"]
    import mrl.cascade.runs

    def no_logits(*args, **kwargs):
        raise AssertionError("logits loaded before --budget was checked")

    monkeypatch.setattr(mrl.cascade.runs, "load_source", no_logits)
    for src, sizes in [(tmp / "mrl.npz", [2, 4, 8, 16]), (interrupted_run, [4, 8, 16])]:
        rc = main(["cascade", "fit", str(src), "--budget", "1", "--out", str(tmp / "b.json")])
        assert rc == 2
        assert (f"--budget must be >= the smallest prefix of {src} ({sizes[0]} dims; nesting "
                f"{sizes}), got --budget 1.0") in capsys.readouterr().err  # fmt: skip


@pytest.mark.filterwarnings("always")  # one process, one message: shown each time here
def test_an_interrupted_run_is_warned_about_as_mrl_eval_does(interrupted_run, tmp_path, capsys):
    warning = "is trained to epoch 1 of 2 only (interrupted?); evaluating it as it is"
    out = str(tmp_path / "c.json")
    assert main(["cascade", "fit", str(interrupted_run), "--out", out]) == 0  # computes logits
    err = capsys.readouterr().err
    assert f"mrl cascade: warning: {interrupted_run} {warning}" in err and "--resume" in err
    assert main(["cascade", "fit", str(interrupted_run), "--out", out]) == 0  # cached logits
    assert warning in capsys.readouterr().err
    cache = interrupted_run / "logits-test.npz"
    assert main(["cascade", "eval", out, "--logits", str(cache)]) == 0  # the file, by its meta
    assert f"(the run of {cache}) {warning}" in capsys.readouterr().err


def test_demo_section_with_arrays_and_a_separate_calibration_set(tmp_path):
    from types import SimpleNamespace

    from mrl.cascade import demo_section

    mrl, y, ff, emb = synthetic(4, n=300)
    ctx = SimpleNamespace(out_dir=tmp_path, nesting=NEST, test_logits=mrl, test_labels=y,
                          ff_logits=ff, train_embeddings=emb, train_labels=y,
                          test_embeddings=emb, dataset="toy")
    md, recs = demo_section(ctx)
    assert "Adaptive classification" in md and "Few-shot" in md
    assert (tmp_path / "cascade.png").exists()
    assert {"cascade", "oracle", "ff", "mrl"} <= {r["method"] for r in recs}
    ctx2 = SimpleNamespace(out_dir=tmp_path, nesting=NEST, test_logits=mrl[:, 150:],
                           test_labels=y[150:], calib_logits=mrl[:, :150], calib_labels=y[:150])
    md2, recs2 = demo_section(ctx2)
    assert "separate calibration set" in md2
    per_seed = [r for r in recs2 if r.get("point") != "match_mean_curve"]
    assert {r["n_calib"] for r in per_seed} == {150} and {r["n_test"] for r in per_seed} == {150}
    with pytest.raises(ValueError, match="needs ctx.test_logits"):
        demo_section(SimpleNamespace(out_dir=tmp_path))
    # half a calibration set was an AttributeError (or a numpy concatenate error with None)
    no_labels = {k: v for k, v in vars(ctx2).items() if k != "calib_labels"}
    for ctx3 in (SimpleNamespace(**no_labels), SimpleNamespace(**no_labels, calib_labels=None)):
        with pytest.raises(ValueError, match="calib_logits and ctx.calib_labels together, got only "
                                             "ctx.calib_logits"):
            demo_section(ctx3)
    with pytest.raises(ValueError, match=r"ctx.calib_logits must be \[G, N_calib, C\]"):
        demo_section(SimpleNamespace(**{**vars(ctx2), "calib_logits": mrl[:, :150, :2]}))


def test_demo_section_uses_the_runs_seed(tmp_path):
    """`mrl demo --seed 7` recorded seed 7 for classification and seed 0 for the cascade and
    few-shot records of the same results.json (their split and draws were fixed at seed 0)."""
    from types import SimpleNamespace

    from mrl.cascade import demo_section

    mrl, y, _, emb = synthetic(4, n=300)
    seeds, halves = {}, {}
    for seed in (0, 7):
        ctx = SimpleNamespace(out_dir=tmp_path, nesting=NEST, test_logits=mrl, test_labels=y,
                              train_embeddings=emb, train_labels=y, test_embeddings=emb, seed=seed)
        md, recs = demo_section(ctx)
        seeds[seed] = {r.get("seed") for r in recs} - {None}
        halves[seed] = [r["value"] for r in recs if r.get("seed") is not None]
        assert f"a random half of the test set (seed {seed};" in md
    assert seeds == {0: {0}, 7: {7}}
    assert halves[0] != halves[7]  # another split and other draws, not only another label


@pytest.mark.slow
def test_fit_and_eval_from_trained_run_folders(tmp_path):
    """Real run folders (tiny synthetic task): logits are computed once and cached."""
    from mrl.config import DataConfig, ModelConfig, TrainConfig
    from mrl.train import train

    runs = {}
    for name, extra in (("mrl", {}), ("ff16", {"mode": "ff", "ff_dim": 16})):
        cfg = TrainConfig(data=DataConfig(dataset="synthetic", train_size=128),
                          model=ModelConfig(dim=16, nesting="4,8,16", width=4, **extra),
                          epochs=1, batch_size=64, device="cpu")
        train(cfg, tmp_path / name, progress=False)
        runs[name] = tmp_path / name
    assert main(["cascade", "fit", str(runs["mrl"])]) == 0
    assert (runs["mrl"] / "cascade.json").is_file() and (runs["mrl"] / "logits-test.npz").is_file()
    assert main(["cascade", "eval", str(runs["mrl"] / "cascade.json")]) == 0
    out = tmp_path / "eval"
    assert main(["cascade", "eval", str(runs["mrl"]), "--ff", str(runs["ff16"]), "--seeds", "0",
                 "--out", str(out), "--fewshot"]) == 0
    recs = load_records(out / "cascade.json")
    assert {r["dataset"] for r in recs} == {"synthetic"}
    assert any(r["method"] == "ff" and r["metric"] == "ncm_5shot" for r in recs)


def test_evaluate_cascade_bad_input():
    mrl, y, ff, _ = synthetic(5, n=100)
    with pytest.raises(ValueError, match=r"ff_scores\[8\] must have shape \[N, C\]=\(100, 5\)"):
        evaluate_cascade(mrl, y, NEST, ff_scores={8: ff[8][:50]})
    with pytest.raises(ValueError, match="seeds must not be empty"):
        evaluate_cascade(mrl, y, NEST, seeds=())
    with pytest.raises(ValueError, match=r"calib_index must index a proper subset of the 100"):
        evaluate_cascade(mrl, y, NEST, calib_index=np.arange(100))
    with pytest.raises(ValueError, match="leaves an empty calibration or test part"):
        split_calibration(3, 0.1)
    cal, test = split_calibration(101, 0.3, seed=7)
    assert len(cal) == 30 and len(np.intersect1d(cal, test)) == 0 and len(cal) + len(test) == 101


def test_mean_curve_headline_matches_a_manual_computation():
    from mrl.cascade.evaluate import mean_curve

    mrl, y, ff, _ = synthetic(6, n=600)
    recs, summ = evaluate_cascade(mrl, y, NEST, ff_scores=ff, seeds=(0, 1, 2))
    curve = mean_curve(summ)
    ref = np.mean([s["reference_test_accuracy"] for s in summ])
    ok = [r["expected_dims"] for r in curve if r["accuracy"] >= ref - 0.005]
    ff_mean = {m: np.mean([s["ff_accuracy"][m] for s in summ]) for m in ff}
    fixed = min(m for m, a in ff_mean.items() if a >= ref - 0.005)
    h = summarize(summ)["mean_curve_headline"]
    assert h["cascade_dims"] == pytest.approx(min(ok)) and h["fixed_dims"] == fixed
    assert h["x_smaller"] == pytest.approx(fixed / min(ok))
    head = [r for r in recs if r.get("point") == "match_mean_curve" and r["metric"] == "x_smaller"]
    by_ref = {r["reference"]: r["value"] for r in head}
    assert by_ref["ff-16"] == pytest.approx(h["x_smaller"])
    own = summarize(summ)["mean_curve_headline_own"]
    own_ref = np.mean([s["own_reference_test_accuracy"] for s in summ])
    assert own["reference_accuracy"] == pytest.approx(own_ref)
    if own["x_smaller"] is not None:
        assert by_ref["mrl-16"] == pytest.approx(own["x_smaller"])


def test_headline_of_one_split_claims_no_spread_over_seeds():
    """One calibration split read "± 0.0 over seeds"."""
    from mrl.cascade.report import _headline_sentence

    mrl, y, ff, _ = synthetic(6, n=600)
    for seeds, said in (((0,), "one calibration split"), ((0, 1), "over seeds")):
        _, summ = evaluate_cascade(mrl, y, NEST, ff_scores=ff, seeds=seeds)
        h = summarize(summ)["mean_curve_headline"]
        assert h["n_seeds"] == len(seeds)
        if h["cascade_dims"] is not None:
            assert said in _headline_sentence(h, "ff-16", "ff", 0.5)


@pytest.mark.filterwarnings("always")  # one process, one message: shown each time here
def test_eval_file_warns_when_its_source_changed(files, capsys):
    """A run resumed or retrained after the fit: the same path, other logits."""
    tmp, _ = files
    assert main(["cascade", "fit", str(tmp / "mrl.npz")]) == 0
    cfile = tmp / "mrl.cascade.json"
    assert main(["cascade", "eval", str(cfile)]) == 0
    assert "changed since" not in capsys.readouterr().err
    mrl, y, _, emb = synthetic(1)
    save_logits(tmp / "mrl.npz", LogitsSet(mrl, y, NEST, emb, {"dataset": "toy"}))
    for extra in ([], ["--logits", str(tmp / "mrl.npz")]):
        assert main(["cascade", "eval", str(cfile), *extra]) == 0
        err = capsys.readouterr().err
        assert "changed since" in err and "refit it with mrl cascade fit" in err


def test_cli_eval_of_a_missing_source_says_so(tmp_path, capsys):
    """A cascade file not fitted yet is named as missing (the --logits option was blamed)."""
    missing = tmp_path / "cascade.json"
    assert main(["cascade", "eval", str(missing), "--logits", str(tmp_path / "l.npz")]) == 2
    err = capsys.readouterr().err
    assert f"source {str(missing)!r} does not exist (fit one first: mrl cascade fit" in err, err
    assert main(["cascade", "eval", str(tmp_path / "run")]) == 2
    assert "run' does not exist\n" in capsys.readouterr().err
