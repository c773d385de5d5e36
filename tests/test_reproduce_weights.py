"""`mrl reproduce --mrl-weights`: the prefix-weighted MRL variant ``mrl-w`` (tiny data, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from mrl.cli import main
from mrl.commands.reproduce import RECIPES, methods, mrl_weights, reproduce
from mrl.data import load_task

TINY = ("data.dataset=synthetic", "model.dim=16", "model.width=4", "model.nesting=2,4,8,16",
        "batch_size=64", "eval_batch_size=256", "data.train_size=256", "optim.lr=0.01")  # fmt: skip
SIZES = (2, 4, 8, 16, 32, 64, 128, 256)


@pytest.fixture(scope="module")
def task():
    return load_task("synthetic", train_size=256)


def _run(tmp_path, task, **kw):
    return reproduce("fashion-mnist", "small", tmp_path, overrides=TINY, progress=False,
                     data_task=task, log=lambda s: None, **kw)  # fmt: skip


def test_weight_specs_are_normalised_to_mean_one():
    log2 = mrl_weights("log2", SIZES)
    assert log2 == pytest.approx([g / 4.5 for g in range(1, 9)])  # 1..8, one step per doubling
    assert mrl_weights("log2", (8, 16, 32)) == pytest.approx([0.5, 1.0, 1.5])
    full = mrl_weights("full:8", SIZES)
    assert full == pytest.approx([8 / 15] * 7 + [64 / 15])  # the full size: 8/15 of the loss
    assert mrl_weights("1, 1, 2, 4", (2, 4, 8, 16)) == pytest.approx([0.5, 0.5, 1.0, 2.0])
    for spec in ("log2", "full:3", "0,1,2,3,4,5,6,7"):
        assert sum(mrl_weights(spec, SIZES)) == pytest.approx(len(SIZES))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("full:0", r"full:K needs K > 0, got mrl_weights='full:0'"),
        ("full:x", r"log2, full:K or comma-separated numbers, got mrl_weights='full:x'"),
        ("linear", r"got mrl_weights='linear'"),
        ("1,2,3", r"one weight per prefix \[2, 4, 8, 16\] \(4\), got mrl_weights='1,2,3' \(3"),
        ("1,-1,1,1", r"non-negative, not all zero, got mrl_weights='1,-1,1,1'"),
        ("0,0,0,0", r"not all zero, got mrl_weights='0,0,0,0'"),
        ("1,nan,1,1", r"got mrl_weights='1,nan,1,1'"),
    ],
)
def test_bad_weight_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        mrl_weights(spec, (2, 4, 8, 16))


def test_variant_is_added_only_when_asked():
    recipe = RECIPES[("fashion-mnist", "small")]
    plain_names = [n for n, _ in methods(recipe)]
    assert plain_names == ["mrl", "mrl-e", "ff-2", "ff-4", "ff-8", "ff-16", "plain"]
    runs = dict(methods(recipe, (0.5, 1.5)))
    assert list(runs) == ["mrl", "mrl-w", *plain_names[1:]]
    assert runs["mrl-w"] == ("model.mode=mrl", "model.nesting_weights=0.5,1.5")
    assert runs["mrl"] == ("model.mode=mrl",)  # the paper's unweighted sum stays as it was


def test_uniform_weights_reproduce_mrl_exactly(tmp_path, task):
    """Reference: mrl-w with weights 1 each is the unweighted MRL run, weight for weight."""
    recs = _run(tmp_path, task, only=("mrl", "mrl-w"), weights="1,1,1,1")
    runs = tmp_path / "runs" / "seed0"
    a = torch.load(runs / "mrl" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(runs / "mrl-w" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    values = {}
    for r in recs:
        values.setdefault(r["method"], {})[(r["metric"], r["prefix"])] = r["value"]
    assert values["mrl"] == values["mrl-w"]
    assert {r["mrl_weights"] for r in recs if r["method"] == "mrl-w"} == {"1,1,1,1"}
    assert not any("mrl_weights" in r for r in recs if r["method"] == "mrl")


def test_weighted_run_trains_with_its_weights(tmp_path, task):
    recs = _run(tmp_path, task, only=("mrl", "mrl-w"), weights="log2")
    saved = json.loads((tmp_path / "runs" / "seed0" / "mrl-w" / "config.json").read_text())
    assert saved["model"]["nesting_weights"] == pytest.approx([0.4, 0.8, 1.2, 1.6])
    assert saved["model"]["mode"] == "mrl"
    runs = tmp_path / "runs" / "seed0"
    a = torch.load(runs / "mrl" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(runs / "mrl-w" / "checkpoint.pt", weights_only=False)["model"]
    assert not all(torch.equal(a[k], b[k]) for k in a)  # other weights, other model
    assert {r["method"] for r in recs} == {"mrl", "mrl-w"}
    # The cached run was trained with log2: other weights into the same folder are refused.
    with pytest.raises(ValueError, match=r"mrl-w holds a run trained with another recipe: "
                       r"model.nesting_weights: checkpoint \[0.4"):  # fmt: skip
        _run(tmp_path / "b", task, only=("mrl-w",), weights="full:4", runs=tmp_path / "runs")
    # Nor are records of two weightings mixed in one results file (one mrl-w row per table).
    with pytest.raises(ValueError, match=r"holds mrl-w records with mrl_weights='log2', but "):
        _run(tmp_path, task, only=("mrl-w",), weights="full:4", runs=tmp_path / "other")
    with pytest.raises(ValueError, match=r"only must name runs among .*got \['mrl-w'\]"):
        _run(tmp_path, task, only=("mrl-w",))  # no weights given: there is no mrl-w run


def test_command_reports_the_variant_beside_mrl(tmp_path, capsys):
    sets = [a for kv in TINY for a in ("--set", kv)]
    argv = ["reproduce", "fashion-mnist", "--out", str(tmp_path), "--only", "mrl-w",
            "--no-progress", *sets]  # fmt: skip
    assert main([*argv, "--mrl-weights", "full:2"]) == 0
    out = capsys.readouterr().out
    assert "| mrl-w | top1 |" in out
    claims = (tmp_path / "claims.md").read_text()
    assert "MRL-W (MRL with per-prefix loss weights) 1-NN at least the truncated" in claims
    assert main([*argv, "--mrl-weights", "full:0"]) == 2
    assert "mrl_weights full:K needs K > 0" in capsys.readouterr().err


def _merge_many(path: str, worker: int) -> None:
    from pathlib import Path

    from mrl.commands.reproduce import merge_records
    from mrl.records import make_record

    for i in range(15):
        merge_records(Path(path), [make_record("mrl", 8, "top1", float(i), seed=0,
                                               run=f"w{worker}-{i}")])  # fmt: skip


def test_concurrent_merges_keep_every_record(tmp_path):
    # Two processes sharing one --out (mrl reproduce --only ...) must not drop each other's runs.
    import multiprocessing as mp

    from mrl.records import load_records

    path = str(tmp_path / "results.json")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_merge_many, args=(path, w)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    runs = {r["run"] for r in load_records(path)}
    assert runs == {f"w{w}-{i}" for w in (0, 1) for i in range(15)}


def test_seeds_of_another_recipe_or_task_are_refused_wherever_trained(tmp_path, task):
    """--runs evaluated seed 1 of another recipe (or task) into an --out holding seed 0: the
    table and claims averaged them as two seeds of one recipe."""
    _run(tmp_path / "a", task, only=("mrl",))
    saved = json.loads((tmp_path / "a" / "recipe.json").read_text())
    assert saved["optim"]["lr"] == 0.01 and "seed" not in saved
    other = (*TINY[:-1], "optim.lr=0.05")
    reproduce("fashion-mnist", "small", tmp_path / "b", overrides=other, seed=1, only=("mrl",),
              progress=False, data_task=task, log=lambda s: None)  # fmt: skip
    with pytest.raises(ValueError, match=r"holds seeds of another recipe \(optim.lr: 0.01 there "
                       r"vs 0.05 now; see recipe.json\)"):
        reproduce("fashion-mnist", "small", tmp_path / "a", overrides=other, seed=1,
                  only=("mrl",), runs=tmp_path / "b" / "runs", progress=False, data_task=task,
                  log=lambda s: None)  # fmt: skip
    with pytest.raises(ValueError, match="holds records of dataset='fashion-mnist', but this "
                       "call has dataset='fashion-mnist-1k'"):
        reproduce("fashion-mnist-1k", "small", tmp_path / "a", overrides=TINY, seed=1,
                  only=("mrl",), progress=False, data_task=task, log=lambda s: None)
    _run(tmp_path / "a", task, only=("mrl",), seed=1)  # the same recipe is welcome
    assert {r["seed"] for r in json.loads((tmp_path / "a" / "results.json").read_text())} == {0, 1}


def test_a_call_that_fails_before_its_first_records_does_not_bind_the_out(tmp_path, task):
    """recipe.json was written before training: a batch larger than the data failed, and the
    corrected retry was refused as 'another recipe' in a folder holding no seed at all."""
    too_big = (*TINY, "batch_size=6400")
    with pytest.raises(ValueError, match="batch_size=6400 exceeds the 256 training items"):
        reproduce("fashion-mnist", "small", tmp_path, overrides=too_big, only=("mrl",),
                  progress=False, data_task=task, log=lambda s: None)  # fmt: skip
    assert not (tmp_path / "recipe.json").exists()
    _run(tmp_path, task, only=("mrl",))  # the retry
    assert (tmp_path / "recipe.json").is_file()
    # through the CLI: the lock file the failed call left is the folder's own, not "other files"
    sets = [a for kv in TINY for a in ("--set", kv)]
    argv = ["reproduce", "fashion-mnist", "--out", str(tmp_path / "cli"), "--only", "mrl",
            "--no-progress", *sets]  # fmt: skip
    assert main([*argv, "--set", "batch_size=6400"]) == 2
    assert main(argv) == 0


def test_a_second_recipe_is_refused_before_it_trains(tmp_path, task, monkeypatch):
    """With the recipe written at the first merge, a process of another recipe started while
    the first trained claimed the --out, and the first was refused after all its training."""
    import mrl.commands.reproduce as rep
    from mrl.config import load_config

    first = load_config(None, [*RECIPES[("fashion-mnist", "small")].overrides, *TINY])
    assert rep._claim_out_recipe(tmp_path, first)  # process A, still training
    other = (*TINY[:-1], "optim.lr=0.05")
    with pytest.raises(ValueError, match="holds seeds of another recipe"):
        reproduce("fashion-mnist", "small", tmp_path, overrides=other, seed=1, only=("plain",),
                  progress=False, data_task=task, log=lambda s: None)  # fmt: skip
    assert not (tmp_path / "runs").exists()  # B trained nothing


def test_the_report_keeps_records_another_process_merged_meanwhile(tmp_path, monkeypatch):
    """`run` rewrote results.json from its own snapshot: a second --only process's merge that
    landed between this process's last merge and its report was lost."""
    import mrl.commands.reproduce as rep
    from mrl.records import make_record

    def ours_then_theirs(task, budget, out, **kw):
        ours = [make_record("mrl", 8, "top1", 80.0, seed=0, run="mrl")]
        got = rep.merge_records(out / "results.json", ours)
        rep.merge_records(out / "results.json",  # the other process, after our last merge
                          [make_record("plain", 8, "top1", 70.0, seed=0, run="plain")])
        return got  # the snapshot this process holds

    monkeypatch.setattr(rep, "reproduce", ours_then_theirs)
    assert main(["reproduce", "fashion-mnist", "--out", str(tmp_path), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["run"] for r in saved} == {"mrl", "plain"}
    assert "| plain | top1 |" in (tmp_path / "results.md").read_text()


def test_a_centred_reproduction_says_so_in_its_report(tmp_path):
    """The notes said "cosine on re-normalised prefixes" for --center too (results/fashion-mnist
    /centered/results.md read like the uncentred report)."""
    sets = [a for kv in TINY for a in ("--set", kv)]
    argv = ["reproduce", "fashion-mnist", "--only", "mrl", "--no-progress", *sets]
    assert main([*argv, "--out", str(tmp_path / "c"), "--center"]) == 0
    assert "prefixes after centring (the training images mean" in (
        tmp_path / "c" / "results.md").read_text()
    assert main([*argv, "--out", str(tmp_path / "u")]) == 0
    assert "after centring" not in (tmp_path / "u" / "results.md").read_text()
