"""The training loop: every mode trains, resume is exact, bad runs fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

from mrl.config import load_config
from mrl.data import load_task
from mrl.train import load_checkpoint, load_run, lr_factor, predict, train

BASE = [
    "data.dataset=synthetic", "data.train_size=256",
    "model.dim=16", "model.width=4", "model.nesting=4,8,16", "epochs=3", "batch_size=64",
    "eval_batch_size=128",
]  # fmt: skip


@pytest.fixture(scope="module")
def task():
    return load_task("synthetic", train_size=256)


def _cfg(*extra: str):
    return load_config(None, BASE + list(extra))


@pytest.mark.parametrize("mode", ["mrl", "mrl-e", "ff", "plain"])
def test_every_mode_trains_and_logs(tmp_path, task, mode):
    extra = ["model.ff_dim=4"] if mode == "ff" else []
    ckpt = train(
        _cfg(f"model.mode={mode}", "epochs=2", *extra), tmp_path, progress=False, task=task
    )
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    G = {"mrl": 3, "mrl-e": 3, "ff": 1, "plain": 1}[mode]
    assert len(lines[-1]["test_top1"]) == G
    model, config, saved = load_run(tmp_path)
    assert saved["epoch"] == 2 and config.model.mode == mode
    assert saved["nesting"]["sizes"] == [4, 8, 16]
    z, logits = predict(model, task.test)
    assert z.shape == (len(task.test), 16) and logits.shape == (G, len(task.test), 4)
    assert ckpt.name == "checkpoint.pt"


def test_mrl_learns_synthetic(tmp_path, task):
    train(_cfg("epochs=4", "optim.lr=0.01", "model.width=8"), tmp_path, progress=False, task=task)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_top1"]["16"] > 60  # 4 classes: chance is 25


def test_resume_gives_exactly_the_uninterrupted_weights(tmp_path, task):
    # Augmentation on: its random stream must also be replayed exactly.
    cfg = _cfg("model.mode=mrl", "optim.warmup_epochs=0.5", "data.flip=true", "data.crop_pad=1")
    train(cfg, tmp_path / "full", progress=False, task=task)
    train(cfg, tmp_path / "cut", progress=False, task=task, stop_after_epochs=1)
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 1
    train(cfg, tmp_path / "cut", resume=True, progress=False, task=task)
    a = load_checkpoint(tmp_path / "full")
    b = load_checkpoint(tmp_path / "cut")
    assert b["epoch"] == 3
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3]


def test_same_encoder_init_for_every_mode(task):
    from mrl.train import build_model

    a = build_model(_cfg("model.mode=mrl"), 1, 4, (0.5,), (0.3,))
    b = build_model(_cfg("model.mode=ff", "model.ff_dim=4"), 1, 4, (0.5,), (0.3,))
    for (k, v), (_, w) in zip(a.encoder.state_dict().items(), b.encoder.state_dict().items()):
        assert torch.equal(v, w), k


def test_resume_errors(tmp_path, task):
    with pytest.raises(FileNotFoundError, match="--resume given but there is no checkpoint"):
        train(_cfg(), tmp_path / "none", resume=True, progress=False, task=task)
    train(_cfg("epochs=1"), tmp_path / "run", progress=False, task=task)
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(_cfg("epochs=1"), tmp_path / "run", progress=False, task=task)
    with pytest.raises(ValueError, match=r"another model or nesting.*model.nesting"):
        train(_cfg("model.nesting=8,16"), tmp_path / "run", resume=True, progress=False, task=task)
    with pytest.raises(ValueError, match=r"model.name"):
        train(_cfg("model.name=resnet18"), tmp_path / "run", resume=True, progress=False, task=task)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert load_checkpoint(tmp_path / "run")["epoch"] == 1
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before  # nothing lost


def test_resume_refuses_another_recipe(tmp_path, task):
    train(_cfg("epochs=1"), tmp_path / "run", progress=False, task=task)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"recipe.*optim.lr: checkpoint 0.002 vs config 0.01"):
        train(_cfg("epochs=1", "optim.lr=0.01"), tmp_path / "run", resume=True, progress=False,
              task=task)  # fmt: skip
    # A cosine schedule depends on the run's length: more epochs would not equal a longer run.
    with pytest.raises(ValueError, match=r"epochs: checkpoint 1 vs config 2"):
        train(_cfg("epochs=2"), tmp_path / "run", resume=True, progress=False, task=task)
    with pytest.raises(ValueError, match=r"batch_size: checkpoint 64 vs config 32; "
                       r"seed: checkpoint 0 vs config 1"):  # fmt: skip
        train(_cfg("epochs=1", "seed=1", "batch_size=32"), tmp_path / "run", resume=True,
              progress=False, task=task)  # fmt: skip
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before  # nothing lost
    # Where it runs and what it logs are not the recipe.
    train(_cfg("epochs=1", "device=cpu", "eval_test=false", "eval_batch_size=32"),
          tmp_path / "run", resume=True, progress=False, task=task)  # fmt: skip
    # The same sizes spelt another way are the same nesting.
    train(_cfg("epochs=1", "model.nesting=doubling:4"), tmp_path / "run", resume=True,
          progress=False, task=task)  # fmt: skip


def test_relative_data_root_is_stored_absolute(tmp_path, task, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(_cfg("epochs=1", "data.root=data/here"), "run", progress=False, task=task)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["root"]
    assert saved == str(tmp_path / "data" / "here")
    assert load_checkpoint(tmp_path / "run")["config"]["data"]["root"] == saved


def test_longer_run_by_resume_with_a_constant_schedule(tmp_path, task):
    """Constant / step schedules do not depend on the length: 1 epoch + 1 more = 2 epochs."""
    cfg = ("optim.schedule=constant", "model.mode=mrl")
    train(_cfg(*cfg, "epochs=2"), tmp_path / "two", progress=False, task=task)
    train(_cfg(*cfg, "epochs=1"), tmp_path / "grown", progress=False, task=task)
    train(_cfg(*cfg, "epochs=2"), tmp_path / "grown", resume=True, progress=False, task=task)
    a, b = load_checkpoint(tmp_path / "two"), load_checkpoint(tmp_path / "grown")
    assert b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_recipe_differences_skips_keys_an_old_config_lacks():
    from mrl.train import recipe_differences

    cfg = _cfg("epochs=1")
    saved = cfg.to_dict()
    del saved["optim"]["gamma"]  # a key added after the run was saved
    saved["data"]["root"] = "/elsewhere"
    assert recipe_differences(saved, cfg) == []
    saved["model"]["dim"] = 32
    assert recipe_differences(saved, cfg) == ["model.dim: checkpoint 32 vs config 16"]


def test_foreign_checkpoint_errors(tmp_path, task):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_run(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        load_run(tmp_path)
    torch.save({"something": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not an mrl training checkpoint"):
        load_run(tmp_path)


def test_state_from_another_architecture_is_a_clear_error(tmp_path, task):
    from mrl.train import _load_state, build_model

    train(_cfg("epochs=1"), tmp_path, progress=False, task=task)
    other = build_model(_cfg("model.dim=32", "model.nesting=4,8,32"), 1, 4, (0.5,), (0.3,))
    with pytest.raises(ValueError, match="does not fit this model"):
        _load_state(other, load_checkpoint(tmp_path)["model"], tmp_path)


def test_batch_larger_than_data(tmp_path, task):
    with pytest.raises(ValueError, match="batch_size=512 exceeds"):
        train(_cfg("batch_size=512"), tmp_path, progress=False, task=task)


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [("cosine", 0, 1.0), ("cosine", 15, 0.5), ("constant", 29, 1.0), ("step", 10, 0.1)],
)
def test_lr_schedules(schedule, step, expected):
    cfg = _cfg("epochs=3", f"optim.schedule={schedule}", "optim.step_epochs=1")
    assert lr_factor(cfg, step, 10) == pytest.approx(expected)


def test_warmup_is_linear():
    cfg = _cfg("optim.warmup_epochs=1")
    assert [lr_factor(cfg, s, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_trains_on_triples_composed_on_the_fly(tmp_path):
    from mrl.data import Task
    from mrl.data.fashion_mnist_1k import fixed_triples
    from mrl.data.synthetic import make_synthetic
    from mrl.data.tensors import TripleSource

    base = make_synthetic(n=64, num_classes=4, size=8)
    task = Task("triples", TripleSource(base, 128), fixed_triples(base, 64, 1, "db"),
                fixed_triples(base, 32, 2, "test"))  # fmt: skip
    cfg = _cfg("epochs=1", "data.dataset=fashion-mnist-1k")
    train(cfg, tmp_path, progress=False, task=task)
    model, _, saved = load_run(tmp_path)
    assert saved["task"]["num_classes"] == 64
    z, logits = predict(model, task.test)
    assert z.shape == (32, 16) and logits.shape == (3, 32, 64)


def test_mlp_encoder_shapes_and_errors():
    from mrl.models import MLPEncoder, build_encoder

    enc = build_encoder("mlp", 8, 1, input_shape=(4, 6), width=16, depth=1)
    assert enc(torch.zeros(3, 1, 4, 6)).shape == (3, 8)
    with pytest.raises(ValueError, match="dim must be an integer, got dim=True"):
        build_encoder("mlp", True, 1, input_shape=(4, 6))  # bool is an int: a 1-d embedding
    with pytest.raises(ValueError, match="in_channels must be >= 1, got in_channels=0"):
        build_encoder("resnet18", 16, 0)  # it built a model
    with pytest.raises(ValueError, match=r"expects images of shape \(1, 4, 6\), got \(1, 6, 4\)"):
        enc(torch.zeros(3, 1, 6, 4))
    with pytest.raises(ValueError, match="input_shape must be"):
        MLPEncoder(8, 1, input_shape=(4,))
    with pytest.raises(ValueError, match="depth=-1"):
        MLPEncoder(8, 1, input_shape=(4, 4), depth=-1)
    with pytest.raises(ValueError, match="norm='layer'"):
        MLPEncoder(8, 1, input_shape=(4, 4), norm="layer")
    assert len(MLPEncoder(8, 1, input_shape=(4, 4), depth=0).layers) == 2  # flatten + linear


def test_resnet_arguments_are_checked():
    from mrl.models.resnet import resnet18

    assert resnet18(None, 1, width=4).dim == 32  # None: the last stage's width
    for kwargs, match in (
        (dict(dim=0), "dim must be >= 1, got dim=0"),  # it was the last stage's width, 32
        (dict(dim=16, width=0), "width must be >= 1, got width=0"),  # failed in forward
        (dict(dim=16, in_channels=0), "in_channels must be >= 1, got in_channels=0"),
        (dict(dim=16.0), "dim must be an integer, got dim=16.0"),
    ):
        with pytest.raises(ValueError, match=match):
            resnet18(**{"in_channels": 1, "width": 4, **kwargs})


def test_diverged_training_stops_and_keeps_the_last_good_checkpoint(tmp_path, task):
    from mrl.train import TrainingDiverged

    cfg = _cfg("epochs=2", "optim.schedule=constant")
    train(cfg, tmp_path, progress=False, task=task, stop_after_epochs=1)  # a good epoch 1
    with torch.no_grad():  # corrupt the weights, as a too-high lr would, then resume
        ckpt = load_checkpoint(tmp_path)
        for v in ckpt["model"].values():
            if v.is_floating_point():
                v.fill_(float("nan"))
        torch.save(ckpt, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainingDiverged, match=r"mean loss of epoch 2 is nan.*epoch 1\) is kept"):
        train(cfg, tmp_path, resume=True, progress=False, task=task)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "NaN" not in lines[0]  # nothing of the bad epoch written
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # not overwritten


def test_an_epochs_last_update_is_checked_on_the_weights(tmp_path, task, monkeypatch):
    """A step's loss comes before its update: an epoch whose last update made the weights (or
    BatchNorm's running statistics) inf had a finite mean loss and was saved as good."""
    import mrl.train as tr

    real = tr._train_epoch

    def last_update_diverges(config, net, model, *args, **kwargs):
        record = real(config, net, model, *args, **kwargs)
        if record["epoch"] == 2:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")
        return record

    monkeypatch.setattr(tr, "_train_epoch", last_update_diverges)
    with pytest.raises(tr.TrainingDiverged, match=r"the weights after epoch 2 are not finite "
                       r".*checkpoint.pt \(epoch 1\) is kept"):
        train(_cfg("epochs=2"), tmp_path, progress=False, task=task)
    assert load_checkpoint(tmp_path)["epoch"] == 1  # the good epoch, not the inf weights


@pytest.mark.parametrize("buffer, diverged", [("running_var", True), ("mask", False)])
def test_batchnorm_statistics_are_checked_other_buffers_are_not(tmp_path, task, monkeypatch,
                                                                buffer, diverged):
    """BatchNorm's running variance going inf is divergence; an encoder's own buffer that is
    infinite on purpose (a -inf mask) is not (such a run stopped after epoch 1)."""
    import mrl.train as tr

    real = tr._train_epoch

    def with_inf_buffer(config, net, model, *args, **kwargs):
        record = real(config, net, model, *args, **kwargs)
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        if buffer == "mask":
            bn.register_buffer("mask", torch.full((2,), float("-inf")))
        else:
            bn.running_var[0] = float("inf")
        return record

    monkeypatch.setattr(tr, "_train_epoch", with_inf_buffer)
    if diverged:
        with pytest.raises(tr.TrainingDiverged, match="weights after epoch 1 are not finite"):
            train(_cfg("epochs=1"), tmp_path, progress=False, task=task)
    else:
        train(_cfg("epochs=1"), tmp_path, progress=False, task=task)
        assert load_checkpoint(tmp_path)["epoch"] == 1


@pytest.mark.parametrize("norm, refused", [("batch", True), ("group", False)])
def test_resume_with_another_process_count_is_refused_with_batchnorm(tmp_path, task, norm,
                                                                      refused):
    """BatchNorm statistics are per process: a 2-process run resumed by 1 process was accepted
    and ended 0.02 away from the uninterrupted weights."""
    cfg = _cfg("epochs=2", f"model.norm={norm}")
    train(cfg, tmp_path, progress=False, task=task, stop_after_epochs=1)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["world_size"] == 1
    ckpt["world_size"] = 2  # as torchrun --nproc_per_node 2 saves it
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    if refused:
        with pytest.raises(ValueError, match=r"trained by 2 process\(es\), this run has 1: with "
                           r"BatchNorm .*torchrun --nproc_per_node 2"):
            train(cfg, tmp_path, resume=True, progress=False, task=task)
    else:  # group norm: the averaged gradient is the same step whatever the process count
        train(cfg, tmp_path, resume=True, progress=False, task=task)
        assert load_checkpoint(tmp_path)["epoch"] == 2


def test_resume_of_a_checkpoint_whose_config_lacks_a_newer_model_key(tmp_path, task):
    """A model key added to the config later raised a KeyError on --resume of older runs."""
    cfg = _cfg("epochs=2")
    train(cfg, tmp_path, progress=False, task=task, stop_after_epochs=1)
    ckpt = load_checkpoint(tmp_path)
    del ckpt["config"]["model"]["norm"]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    train(cfg, tmp_path, resume=True, progress=False, task=task)
    assert load_checkpoint(tmp_path)["epoch"] == 2


def test_the_logged_lr_is_that_of_the_epochs_last_step(tmp_path, task):
    """The log read the lr after the epoch's last scheduler step: the next epoch's first (0.0
    for a cosine run's last epoch, whose steps trained at up to lr/4)."""
    import math

    cfg = _cfg("epochs=2", "optim.schedule=cosine", "optim.warmup_epochs=0", "optim.lr=0.01")
    train(cfg, tmp_path, progress=False, task=task)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").open()]
    steps = 256 // 64  # per epoch
    total = 2 * steps  # cosine from 0.01 to 0 over the run, evaluated per step t = 0..7
    want = [0.01 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in (steps - 1, total - 1)]
    assert logged == pytest.approx(want) and logged[-1] > 0


def test_eval_refuses_data_the_run_was_not_trained_on(tmp_path, task):
    from dataclasses import replace

    from mrl.commands.eval import compute_embeddings

    custom = replace(task, name="my-data")  # a user's Task through the Python API
    train(_cfg("epochs=1"), tmp_path / "custom", progress=False, task=custom)
    with pytest.raises(ValueError, match=r"trained on a custom task 'my-data' \(Python API\)"):
        compute_embeddings(tmp_path / "custom")
    assert compute_embeddings(tmp_path / "custom", task=custom).test.shape == (128, 16)
    train(_cfg("epochs=1"), tmp_path / "syn", progress=False, task=task)
    other = load_task("synthetic", train_size=256)
    other = replace(other, test=replace(other.test, num_classes=7))
    with pytest.raises(ValueError, match=r"num_classes: trained on 4, given 7"):
        compute_embeddings(tmp_path / "syn", task=other)
