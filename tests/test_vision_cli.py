"""End to end on tiny synthetic data: mrl train -> mrl eval, reproduce, demo (CPU, seconds)."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest

from mrl.cli import main
from mrl.data import load_task
from mrl.records import load_records

TINY = ["model.dim=16", "model.width=4", "model.nesting=2,4,8,16", "batch_size=64",
        "eval_batch_size=256", "data.train_size=256", "optim.lr=0.01"]  # fmt: skip


@pytest.fixture(scope="module")
def task():
    return load_task("synthetic", train_size=256)


def _config(tmp_path, **extra):
    data = {"data": {"dataset": "synthetic", "train_size": 256}, "epochs": 1, **extra}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    return path


def test_train_then_eval(tmp_path, capsys):
    cfg = _config(tmp_path)
    sets = [a for s in TINY for a in ("--set", s)]
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", *sets]) == 0
    assert "trained mrl" in capsys.readouterr().out
    argv = ["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", "--resume", *sets]
    assert main(argv) == 0  # a finished run: nothing to resume, and it says so
    assert "already trained (nothing to resume) mrl" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "ev")]) == 0
    out, err = capsys.readouterr()
    assert "report:" in out and "| mrl | top1 |" in out
    assert "embedding the database" in err and "eval: done in" in err  # progress, on stderr
    recs = json.loads((tmp_path / "ev" / "results.json").read_text())
    metrics = {(r["method"], r["metric"]) for r in recs}
    assert {("mrl", "top1"), ("mrl", "1nn"), ("mrl", "map@10")} <= metrics
    assert sorted({r["prefix"] for r in recs}) == [2, 4, 8, 16]
    assert (tmp_path / "ev" / "report.html").is_file()


def test_eval_options_checked_first_and_a_checkpoint_path_is_its_run(tmp_path, capsys):
    from mrl.config import load_config
    from mrl.train import train

    cfg = _config(tmp_path)
    run = tmp_path / "run"
    train(load_config(cfg, [*TINY, "epochs=2"]), run, progress=False, stop_after_epochs=1)
    assert main(["eval", str(run), "--nesting", "2,4,9"]) == 2
    err = capsys.readouterr().err
    assert "--nesting 2,4,9:" in err and "the run's D is 16" in err
    assert not (run / "eval").exists() and not (run / "logits-test.npz").exists()
    assert main(["eval", str(run / "checkpoint.pt"), "--nesting", "4,16", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "mrl eval: warning: " in err and "is trained to epoch 1 of 2 only" in err
    assert (run / "eval" / "results.json").is_file()  # the run folder's default out
    assert "(epoch 1 of 2)" in (run / "eval" / "report.html").read_text()
    # The report states the probe recipe that ran, not the default's 200 iterations.
    assert main(["eval", str(run), "--probe-iter", "7", "--no-progress", "--out",
                 str(tmp_path / "ev7")]) == 0
    assert "up to 7 iterations" in (tmp_path / "ev7" / "results.md").read_text()
    # Another checkpoint file in the folder is not silently swapped for checkpoint.pt.
    import shutil

    shutil.copy(run / "checkpoint.pt", run / "epoch1.pt")
    assert main(["eval", str(run / "epoch1.pt")]) == 2
    assert "not another checkpoint file (it would evaluate" in capsys.readouterr().err
    ff = tmp_path / "ff"
    train(load_config(cfg, [*TINY, "model.mode=ff", "model.ff_dim=4"]), ff, progress=False)
    assert main(["eval", str(ff), "--nesting", "4,16"]) == 2
    assert "--nesting does not apply to an ff run" in capsys.readouterr().err


def test_train_errors_are_one_line(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--set", "optim.lr=-1"]) == 2
    assert "optim.lr must be in (0, 1e+06], got optim.lr=-1.0" in capsys.readouterr().err
    # float32 overflowed inside the optimizer (a traceback after config.json was written)
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--set", "optim.lr=1e38"]) == 2
    assert "optim.lr must be in (0, 1e+06], got optim.lr=1e+38" in capsys.readouterr().err
    # a malformed JSON list named neither the key nor the value
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--set",
                 "model.nesting_weights=[1,2"]) == 2  # fmt: skip
    assert ("model.nesting_weights must be a JSON list or comma-separated values, got "
            "model.nesting_weights='[1,2'") in capsys.readouterr().err
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--set", "data.root="]) == 2
    assert "data.root must be a folder (or unset" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "--resume given but there is no checkpoint" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "nothing' does not exist: give a run folder" in capsys.readouterr().err
    assert main(["train", "--show-config"]) == 0
    assert "model.nesting" in capsys.readouterr().out


def test_out_paths_are_checked_before_any_work(tmp_path, capsys):
    cfg = _config(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "run").mkdir()  # eval checks that its run exists first, then --out
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    runs = [
        ["train", str(cfg), "--out", str(afile / "sub")],
        ["train", str(cfg), "--out", str(afile)],
        ["demo", "--out", str(afile / "sub")],
        ["reproduce", "fashion-mnist", "--out", str(afile)],
        ["cascade", "fit", str(tmp_path / "missing-run"), "--out", str(tmp_path / "adir")],
        ["eval", str(tmp_path / "run"), "--out", str(afile)],
    ]
    for argv in runs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "--out '" in err and ("file" in err or "folder" in err), (argv, err)
        assert "Traceback" not in err


def test_plain_eval_has_baselines(tmp_path, task):
    from mrl.commands.eval import compute_embeddings, evaluate_embeddings
    from mrl.config import load_config
    from mrl.train import train

    cfg = load_config(None, [*TINY, "data.dataset=synthetic", "epochs=1", "model.mode=plain"])
    train(cfg, tmp_path, progress=False, task=task)
    recs = evaluate_embeddings(compute_embeddings(tmp_path, task=task), nesting="2,4,16",
                               probe_iter=20, probe_all=True)  # fmt: skip
    methods = {(r["method"], r["metric"], r["prefix"]) for r in recs}
    for method in ("plain", "pca", "random"):
        for metric in ("top1", "probe_top1", "1nn", "map@10"):
            assert {(method, metric, m) for m in (2, 4, 16)} <= methods
    assert all(0 <= r["value"] <= 100 for r in recs if r["metric"] in ("top1", "1nn"))
    # probe_max_dim: probes (hence plain/pca/random top1) only up to that prefix, the same values;
    # retrieval still at every prefix.
    e = compute_embeddings(tmp_path, task=task)
    capped = evaluate_embeddings(e, nesting="2,4,16", probe_iter=20, probe_all=True,
                                 probe_max_dim=4)  # fmt: skip
    probed = {(r["method"], r["prefix"]): r["value"] for r in capped if r["metric"] == "top1"}
    assert set(probed) == {(m, p) for m in ("plain", "pca", "random") for p in (2, 4)}
    full = {(r["method"], r["prefix"]): r["value"] for r in recs if r["metric"] == "top1"}
    assert all(full[key] == v for key, v in probed.items())
    assert {r["prefix"] for r in capped if r["metric"] == "1nn"} == {2, 4, 16}
    with pytest.raises(ValueError, match=r"probe_max_dim=1 is below every prefix \[2, 4, 16\]"):
        evaluate_embeddings(e, nesting="2,4,16", probe_iter=5, probe_max_dim=1)


def test_reproduce_accumulates_seeds(tmp_path, task):
    from mrl.commands.reproduce import reproduce

    over = ("data.dataset=synthetic", *TINY)
    logs: list[str] = []
    for seed in (0, 1):
        recs = reproduce("fashion-mnist", "small", tmp_path, seed=seed, overrides=over,
                         progress=False, data_task=task, log=logs.append)  # fmt: skip
    assert {r["seed"] for r in recs} == {0, 1}
    assert {r["method"] for r in recs} == {"mrl", "mrl-e", "ff", "plain", "pca", "random"}
    ff = {r["prefix"] for r in recs if r["method"] == "ff" and r["metric"] == "top1"}
    assert ff == {2, 4, 8, 16}
    probed = {r["method"] for r in recs if r["metric"] == "probe_top1"}
    assert probed == {"mrl", "mrl-e", "ff", "plain", "pca", "random"}
    # Rerunning a seed reuses its runs and replaces (not duplicates) its records.
    again = reproduce("fashion-mnist", "small", tmp_path, seed=1, overrides=over, progress=False,
                      data_task=task, log=logs.append)  # fmt: skip
    assert len(again) == len(recs)
    assert any("reusing" in line for line in logs)
    # ... but only for the same recipe: cached records of another recipe are refused.
    another = r"holds seeds of another recipe \(optim.lr: 0.01 there vs 0.02 now; see recipe.json"
    with pytest.raises(ValueError, match=another):
        reproduce("fashion-mnist", "small", tmp_path, seed=1, overrides=(*over, "optim.lr=0.02"),
                  progress=False, data_task=task, only=("mrl",))  # fmt: skip
    # ... and a new seed must share the other seeds' recipe (they are averaged together)
    with pytest.raises(ValueError, match=another):
        reproduce("fashion-mnist", "small", tmp_path, seed=2, overrides=(*over, "optim.lr=0.02"),
                  progress=False, data_task=task, only=("mrl",))  # fmt: skip
    assert not (tmp_path / "runs" / "seed2" / "mrl" / "checkpoint.pt").exists()
    # an --out from before recipe.json: the runs' own configs still refuse another recipe
    (tmp_path / "recipe.json").unlink()
    with pytest.raises(ValueError, match=r"seed1/mrl holds a run trained with another recipe: "
                       r"optim.lr: checkpoint 0.01 vs config 0.02; use another --out"):  # fmt: skip
        reproduce("fashion-mnist", "small", tmp_path, seed=1, overrides=(*over, "optim.lr=0.02"),
                  progress=False, data_task=task, only=("mrl",))  # fmt: skip
    with pytest.raises(ValueError, match=r"seed0/mrl was trained with another recipe "
                       r"\(optim.lr: 0.01 there vs 0.02 now.*use another --out"):  # fmt: skip
        reproduce("fashion-mnist", "small", tmp_path, seed=2, overrides=(*over, "optim.lr=0.02"),
                  progress=False, data_task=task, only=("mrl",))  # fmt: skip


def test_demo_sections(tmp_path, task, capsys):
    from mrl.commands import demo as demo_cmd

    seen = []

    def extra_section(ctx):
        seen.append((ctx.nesting.sizes, ctx.test_logits.shape, ctx.train_embeddings.shape))
        return "## Extra\n\nhello", []

    sys.modules["_extra_demo_section"] = types.SimpleNamespace(section=extra_section)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recs, md = demo_cmd.demo(
                tmp_path,
                epochs=1,
                task=task,
                overrides=tuple(TINY),
                progress=False,
                log=lambda s: None,
                sections=[*demo_cmd.SECTIONS, "_extra_demo_section:section"],
            )
    finally:
        del sys.modules["_extra_demo_section"]
    assert not [w for w in caught if "not over seeds of one setting" in str(w.message)]
    # The cascade's curve (several operating points per prefix) is tabled in its own section,
    # not averaged into results.md's per-metric cells; results.json keeps its records.
    assert {r["method"] for r in load_records(tmp_path / "results.json")} >= {"cascade", "mrl"}
    assert "| cascade |" not in (tmp_path / "results.md").read_text()
    for name in ("demo.md", "report.html"):
        assert "Adaptive classification (cascade)" in (tmp_path / name).read_text()
    assert seen == [((2, 4, 8, 16), (4, len(task.test), 4), (len(task.train), 16))]
    assert "## Extra" in md and "### 1nn" in md
    assert {r["method"] for r in recs} >= {"mrl", "plain", "pca", "random"}
    assert (tmp_path / "report.html").is_file()
    print(demo_cmd._short_table(recs))
    assert "| mrl | top1 |" in capsys.readouterr().out
    # A second demo with other options into the same folder is refused, not resumed or reused.
    with pytest.raises(ValueError, match=r"mrl holds a run trained with another recipe: "
                       r"epochs: checkpoint 1 vs config 2; use another --out"):  # fmt: skip
        demo_cmd.demo(tmp_path, epochs=2, task=task, overrides=tuple(TINY), progress=False,
                      log=lambda s: None, sections=[])  # fmt: skip


def test_eval_hands_text_models_to_the_text_evaluator(tmp_path, monkeypatch):
    (tmp_path / "modules.json").write_text("[]")
    calls = []
    fake = types.ModuleType("mrl.text.evaluation")
    fake.eval_command = lambda args: calls.append((args.run_dir, args.dataset)) or 0
    monkeypatch.setitem(sys.modules, "mrl.text.evaluation", fake)
    assert main(["eval", str(tmp_path), "--dataset", "cranfield"]) == 0
    assert calls == [(str(tmp_path), "cranfield")]


def test_demo_rejects_bad_epochs(tmp_path, capsys):
    from mrl.commands.demo import demo

    with pytest.raises(ValueError, match="epochs must be positive, got epochs=0"):
        demo(tmp_path, epochs=0)
    assert main(["demo", "--out", str(tmp_path / "d"), "--train-size", "-5"]) == 2
    assert "--train-size must be >= 1, got --train-size -5" in capsys.readouterr().err


def test_reproduce_only_some_runs(tmp_path, task):
    from mrl.commands.reproduce import reproduce

    over = ("data.dataset=synthetic", *TINY)
    kw = dict(overrides=over, progress=False, data_task=task, log=lambda s: None)
    with pytest.raises(ValueError, match=r"only must name runs among .*got \['ff-3'\]"):
        reproduce("fashion-mnist", "small", tmp_path, only=("ff-3",), **kw)
    reproduce("fashion-mnist", "small", tmp_path, only=("mrl",), **kw)
    recs = reproduce("fashion-mnist", "small", tmp_path, only=("ff-2",), **kw)
    assert {(r["method"], r["run"]) for r in recs} == {("mrl", "mrl"), ("ff", "ff-2")}


def test_reproduce_centred_evaluation_reuses_runs(tmp_path, task):
    from mrl.commands.reproduce import reproduce

    over = ("data.dataset=synthetic", *TINY)
    logs: list[str] = []
    kw = dict(overrides=over, progress=False, data_task=task, log=logs.append, only=("mrl",))
    plain = reproduce("fashion-mnist", "small", tmp_path / "a", **kw)
    # Same folder, other centring: refused rather than mixed into one table.
    with pytest.raises(ValueError, match=r"center=False, but this call has center=True"):
        reproduce("fashion-mnist", "small", tmp_path / "a", center=True, **kw)
    logs.clear()
    centred = reproduce("fashion-mnist", "small", tmp_path / "b", center=True,
                        runs=tmp_path / "a" / "runs", **kw)  # fmt: skip
    assert not any("training" in line for line in logs)  # evaluated, not retrained
    assert {r["center"] for r in centred if "center" in r} == {True}
    top1 = {(r["prefix"], r["value"]) for r in plain if r["metric"] == "top1"}
    assert top1 == {(r["prefix"], r["value"]) for r in centred if r["metric"] == "top1"}
    assert (tmp_path / "a" / "runs" / "seed0" / "mrl" / "records-center.json").is_file()
    with pytest.raises(FileNotFoundError, match=r"--runs '.*a/rnus' is not a folder of trained"):
        reproduce("fashion-mnist", "small", tmp_path / "c", runs=tmp_path / "a" / "rnus", **kw)
    assert not (tmp_path / "a" / "rnus").exists()
    # --runs evaluates; a run it lacks is an error, not a new training inside it.
    kw["only"] = ("ff-2",)
    with pytest.raises(FileNotFoundError, match=r"has no fully trained seed0/ff-2 \(checkpoint"):
        reproduce("fashion-mnist", "small", tmp_path / "d", runs=tmp_path / "a" / "runs", **kw)
    assert not (tmp_path / "a" / "runs" / "seed0" / "ff-2").exists()
    with pytest.raises(ValueError, match=r"only must name at least one run"):
        reproduce("fashion-mnist", "small", tmp_path / "d", **{**kw, "only": ()})


def test_reproduce_only_empty_is_an_error(tmp_path, capsys):
    assert main(["reproduce", "fashion-mnist", "--out", str(tmp_path), "--only", ","]) == 2
    assert "--only must name at least one run (e.g. mrl,ff-2), got ','" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_reproduce_command_prints_tables_and_claims(tmp_path, capsys):
    sets = [a for kv in ("data.dataset=synthetic", *TINY) for a in ("--set", kv)]
    rc = main(["reproduce", "fashion-mnist", "--out", str(tmp_path), "--only", "mrl,ff-16",
               "--no-progress", *sets])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "### top1" in out and "### Claims (means over 1 seed(s): [0])" in out
    claims = (tmp_path / "claims.md").read_text()
    assert "MRL top-1 at most 1 point below FF-m at every prefix m >= 16" in claims
    assert "top1 mrl vs ff at 16:" in claims


def test_reproduce_plain_model_is_ff_at_full_size(tmp_path, task):
    from mrl.commands.eval import compute_embeddings
    from mrl.commands.reproduce import reproduce

    over = ("data.dataset=synthetic", *TINY)
    recs = reproduce("fashion-mnist", "small", tmp_path, only=("plain",), overrides=over,
                     progress=False, data_task=task, log=lambda s: None)  # fmt: skip
    (ff,) = [r for r in recs if r["method"] == "ff"]
    assert (ff["prefix"], ff["metric"], ff["run"]) == (16, "top1", "plain")
    e = compute_embeddings(tmp_path / "runs" / "seed0" / "plain", task=task)
    head = 100.0 * (e.test_logits[0].argmax(-1) == e.test_labels).float().mean().item()
    assert ff["value"] == pytest.approx(head, abs=1e-3)  # the logged accuracy is the head's
    # Without test accuracy in the log (eval_test=false, or a copied run without metrics.jsonl)
    # the head is evaluated instead: same number, no KeyError.
    (tmp_path / "runs" / "seed0" / "plain" / "metrics.jsonl").unlink()
    again = reproduce("fashion-mnist", "small", tmp_path, only=("plain",), overrides=over,
                      progress=False, data_task=task, log=lambda s: None)  # fmt: skip
    (ff2,) = [r for r in again if r["method"] == "ff"]
    assert ff2["value"] == pytest.approx(head, abs=1e-3)
    quiet = reproduce("fashion-mnist", "small", tmp_path / "q", only=("plain",),
                      overrides=(*over, "eval_test=false"), progress=False, data_task=task,
                      log=lambda s: None)  # fmt: skip
    assert [r["metric"] for r in quiet if r["method"] == "ff"] == ["top1"]


def test_reproduce_probe_iterations_reach_the_probe(tmp_path, task):
    from mrl.commands.reproduce import RECIPES, reproduce

    over = ("data.dataset=synthetic", *TINY)
    kw = dict(overrides=over, progress=False, data_task=task, log=lambda s: None, only=("plain",))
    with pytest.raises(ValueError, match="probe_iter must be positive, got probe_iter=0"):
        reproduce("fashion-mnist", "small", tmp_path / "x", probe_iter=0, **kw)
    one = reproduce("fashion-mnist", "small", tmp_path / "a", probe_iter=1, **kw)
    full = reproduce("fashion-mnist", "small", tmp_path / "b", **kw)  # the recipe's 200

    def probe(recs):
        return [r["value"] for r in recs if r["method"] == "pca" and r["metric"] == "top1"]

    assert probe(one) != probe(full)  # one L-BFGS iteration is not a converged probe
    # Same runs, other probe iterations: evaluated again, not read from the other's cache.
    again = reproduce("fashion-mnist", "small", tmp_path / "c", probe_iter=1,
                      runs=tmp_path / "b" / "runs", **kw)  # fmt: skip
    assert probe(again) == probe(one)
    assert (tmp_path / "b" / "runs" / "seed0" / "plain" / "records-probe1.json").is_file()
    assert {r.get("probe_iter") for r in one if r["metric"] == "probe_top1"} == {1}
    # another --probe-iter into the same results would average unlike probes over seeds
    with pytest.raises(ValueError, match=r"holds probes fitted with --probe-iter 1, but this "
                       r"call fits them with 200"):  # fmt: skip
        reproduce("fashion-mnist", "small", tmp_path / "a", seed=1, **kw)
    one_k = RECIPES[("fashion-mnist-1k", "small")]
    assert (one_k.probe_iter, one_k.probe_max_dim) == (50, 16)


def test_reproduce_1k_small_recipe_uses_the_mlp(tmp_path, task):
    # The CPU recipe of the 1000-class task trains an MLP (position-aware); here on tiny data.
    from mrl.commands.reproduce import reproduce

    over = ("data.dataset=synthetic", *TINY, "epochs=1")
    recs = reproduce("fashion-mnist-1k", "small", tmp_path, overrides=over, progress=False,
                     data_task=task, log=lambda s: None, only=("mrl",))  # fmt: skip
    assert {r["method"] for r in recs} == {"mrl"}
    config = json.loads((tmp_path / "runs" / "seed0" / "mrl" / "config.json").read_text())
    assert config["model"]["name"] == "mlp"


def test_reproduce_seeds_can_be_extended_one_by_one_with_a_constant_schedule(tmp_path, task):
    from mrl.commands.reproduce import reproduce

    over = ("data.dataset=synthetic", *TINY, "optim.schedule=constant")
    kw = dict(progress=False, data_task=task, log=lambda s: None, only=("mrl",))
    for seed in (0, 1):
        reproduce("fashion-mnist", "small", tmp_path, seed=seed, overrides=over, **kw)
    longer = (*over, "epochs=4")  # extend seed 0 first: seed 1 still has 3 epochs
    logs: list[str] = []
    with pytest.warns(UserWarning, match=r"seed1/mrl has 3 epochs, this run 4: bring every seed"):
        recs = reproduce("fashion-mnist", "small", tmp_path, seed=0, overrides=longer,
                         **{**kw, "log": logs.append})
    # The cached evaluation of the 3-epoch model must not be reused for the 4-epoch one.
    from mrl.train import load_checkpoint

    assert load_checkpoint(tmp_path / "runs" / "seed0" / "mrl")["epoch"] == 4
    assert any("training (resuming)" in line for line in logs)
    assert not any("reusing" in line for line in logs)
    saved = json.loads((tmp_path / "runs" / "seed0" / "mrl" / "records.json").read_text())
    assert saved == [r for r in recs if r["seed"] == 0 and r["method"] == "mrl"]
    # A cached evaluation whose checkpoint was deleted (to save space) is still reused.
    (tmp_path / "runs" / "seed0" / "mrl" / "checkpoint.pt").unlink()
    logs.clear()
    with pytest.warns(UserWarning, match="seed1/mrl has 3 epochs"):
        reproduce("fashion-mnist", "small", tmp_path, seed=0, overrides=longer,
                  **{**kw, "log": logs.append})
    assert any("reusing" in line for line in logs) and not any("training" in x for x in logs)


def test_demo_train_size_above_the_data_names_the_flag(tmp_path, monkeypatch):
    import torch

    import mrl.data.fashion_mnist as fm
    from mrl.commands.demo import demo
    from mrl.data.tensors import ImageTensors

    def tiny(split, root=None, download=True, root_fallback=False):
        n = 20 if split == "train" else 10
        return ImageTensors(torch.zeros(n, 1, 28, 28, dtype=torch.uint8), torch.arange(n) % 2,
                            2, (0.5,), (0.3,))  # fmt: skip

    monkeypatch.setattr(fm, "load_fashion_mnist", tiny)
    with pytest.raises(ValueError, match=r"--train-size must be <= 20 .*got --train-size 100"):
        demo(tmp_path, train_size=100)
    assert not (tmp_path / "runs").exists()  # refused before any training


@pytest.mark.parametrize("command,item,hint", [
    (["reproduce", "fashion-mnist"], "seed=5", "use --seed (it names the run folder"),
    (["reproduce", "fashion-mnist"], "model.mode=ff", "reproduce trains every mode itself"),
    (["demo"], "epochs=9", "use --epochs"),
    (["demo"], "seed=2", "use --seed"),
])
def test_options_a_command_sets_itself_are_refused_in_set(tmp_path, capsys, command, item, hint):
    # `--set seed=5` trained seed 5 but filed it under seed0 and labelled every record seed 0.
    out = tmp_path / "out"
    assert main([*command, "--out", str(out), "--set", item]) == 2
    assert f"--set {item}: {item.split('=')[0]} is not set with --set here; {hint}" in (
        capsys.readouterr().err)
    assert not out.exists()


def test_eval_of_a_database_below_ten_items_names_the_reason(tmp_path, capsys):
    from mrl.config import load_config
    from mrl.train import train

    over = [o for o in TINY if not o.startswith("data.train_size")]
    cfg = load_config(_config(tmp_path), [*over, "data.train_size=8", "batch_size=8"])
    train(cfg, tmp_path / "run", progress=False)
    assert main(["eval", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "the database (the training split) has 8 items; the retrieval metrics" in (
        capsys.readouterr().err)


def test_image_folder_runs_refuse_a_changed_folder(tmp_path, capsys):
    # The train/test split is a random permutation of the folder's files: after files are added,
    # evaluating (or resuming) would test on training images. The run records a fingerprint.
    pytest.importorskip("PIL")
    import shutil

    import numpy as np
    from PIL import Image

    from mrl.config import load_config
    from mrl.train import train

    def images(root, start, n):
        rng = np.random.default_rng(start)
        for c in ("cat", "dog"):
            (root / c).mkdir(parents=True, exist_ok=True)
            for i in range(start, start + n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    root / c / f"{i}.png")

    images(tmp_path / "imgs", 0, 12)
    over = [o for o in TINY if not o.startswith(("data.", "batch_size"))]
    sets = [*over, "data.dataset=image-folder", f"data.root={tmp_path / 'imgs'}",
            "data.image_size=8", "batch_size=8", "epochs=2"]
    run = tmp_path / "run"
    train(load_config(None, sets), run, progress=False, stop_after_epochs=1)
    shutil.copytree(tmp_path / "imgs", tmp_path / "other")
    images(tmp_path / "other", 100, 3)
    moved = load_config(None, [*sets, f"data.root={tmp_path / 'other'}"])
    with pytest.raises(ValueError, match=r"fingerprint: trained on '24 files.*given '30 files"):
        train(moved, run, resume=True, progress=False)
    images(tmp_path / "imgs", 100, 3)  # the run's own folder grows
    assert main(["eval", str(run), "--no-progress"]) == 2
    assert "the image folder changed since training" in capsys.readouterr().err


def test_reproduce_keeps_finished_runs_when_a_later_one_fails(tmp_path, task, monkeypatch):
    """A job killed mid-way (a timeout on a GPU) keeps the records of the runs it finished."""
    import mrl.commands.eval as ev
    import mrl.commands.reproduce as rep
    from mrl.records import load_records

    over = ("data.dataset=synthetic", *TINY)
    real = ev.evaluate_embeddings
    calls = []

    def second_fails(*a, **k):
        calls.append(k.get("run"))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate_embeddings", second_fails)
    with pytest.raises(KeyboardInterrupt):
        rep.reproduce("fashion-mnist", "small", tmp_path, overrides=over, progress=False,
                      data_task=task, log=lambda s: None, only=("mrl", "ff-2"))  # fmt: skip
    saved = load_records(tmp_path / "results.json")
    assert {r["run"] for r in saved} == {calls[0]}
