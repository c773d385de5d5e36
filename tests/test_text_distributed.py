"""`mrl text finetune` under torchrun, on CPU with gloo: several processes end where one ends.

The tiny random sentence-transformers model of test_text_models (D=32) is copied with dropout
off for the comparison with one process (each process draws its own dropout masks, so with
dropout the two runs differ by design); the resume test keeps dropout on.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")

import ddp_text_workers as workers  # noqa: E402
import torch  # noqa: E402
from test_text_models import tiny_model  # noqa: E402, F401  (fixture)

from mrl.text.checkpoint import partial_dir  # noqa: E402
from mrl.text.distributed import shares  # noqa: E402
from mrl.text.finetune import FinetuneConfig, finetune  # noqa: E402


def _spawn_workers(fn, world: int, tmp_path, *args) -> None:
    init = tmp_path / f"pg-{next(_SPAWNS)}"  # a fresh rendezvous file per spawn
    torch.multiprocessing.spawn(fn, args=(world, str(init), *args), nprocs=world)


_SPAWNS = itertools.count()


def _weights(out) -> dict[str, torch.Tensor]:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(out)).state_dict()


def test_shares_cover_the_batch_in_order():
    assert shares([5, 6, 7, 8, 9], 2) == [[5, 6, 7], [8, 9]]
    assert shares([5, 6], 4) == [[5], [6], [], []]
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            parts = shares(list(range(n)), world)
            assert len(parts) == world and sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_gathered_rows_and_summed_grads_equal_one_process(tmp_path):
    """Each of two processes maps its share of 5 rows; the loss of the gathered rows couples
    the shares; after the all-reduce the gradient is one process's, and an unused parameter
    keeps no gradient."""
    lin, x = workers.linear_problem()
    y = lin(x)
    workers.coupled_loss(y).backward()
    out = tmp_path / "two.pt"
    _spawn_workers(workers.grad_worker, 2, tmp_path, str(out))
    two = torch.load(out, weights_only=True)
    torch.testing.assert_close(two["y"], y.detach())
    torch.testing.assert_close(two["w"], lin.weight.grad)
    torch.testing.assert_close(two["b"], lin.bias.grad)
    assert two["unused"] == [None, None]


def _no_dropout(model, dest):
    shutil.copytree(model, dest)
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg_path.write_text(json.dumps(cfg))
    return dest


def _spawn(model, out, settings, stop_after: int = -1, resume: bool = False,
           processes: int = 2) -> None:  # fmt: skip
    _spawn_workers(workers.finetune_worker, processes, Path(out).parent, str(model), str(out),
                   settings, stop_after, resume)  # fmt: skip


def test_three_processes_fine_tune_as_one(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """The same global batches, split over three gloo processes (each epoch's last batch of 2
    leaves one process an empty share): the weights of one process (up to float summation
    order), and one model folder written (by rank 0)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = _no_dropout(tiny_model, tmp_path / "model")
    one = finetune(model, workers.pairs(), tmp_path / "one", FinetuneConfig(**workers.SETTINGS),
                   log=lambda s: None)  # fmt: skip
    _spawn(model, tmp_path / "three", workers.SETTINGS, processes=3)
    a, b = _weights(one), _weights(tmp_path / "three")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    meta = json.loads((tmp_path / "three" / "mrl.json").read_text())
    assert meta["processes"] == 3 and meta["steps"] == 6
    assert not partial_dir(tmp_path / "three").exists()


@pytest.mark.slow
def test_bf16_model_symmetric_loss_with_negatives_over_three_processes(
    tiny_model, tmp_path, monkeypatch  # noqa: F811
):
    """A bfloat16 model folder (its rows are gathered as float32, also beside an empty share),
    the symmetric loss and a hard-negative column: as one process, at bfloat16 tolerance."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = _no_dropout(tiny_model, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    settings = dict(workers.SETTINGS, symmetric=True)
    one = finetune(model, workers.pairs(negatives=True), tmp_path / "one",
                   FinetuneConfig(**settings), log=lambda s: None)  # fmt: skip
    _spawn(model, tmp_path / "three", dict(settings, _negatives=True), processes=3)
    a, b = _weights(one), _weights(tmp_path / "three")
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=2e-2, atol=2e-2, msg=k)


def test_errors_cross_processes_by_class_name():
    from mrl.text.distributed import portable_error, rebuilt_error

    for error in (FileNotFoundError("no checkpoint at x"), FileExistsError("x exists"),
                  ValueError("lr must be > 0"), PermissionError("read-only")):  # fmt: skip
        again = rebuilt_error(*portable_error(error))
        assert type(again) is type(error) and str(again) == str(error)
    # classes that need more than a message, or that the other side cannot import
    bad = "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")
    try:
        bad.encode("utf-8")
    except UnicodeEncodeError as exc:
        unicode_error = exc
    assert isinstance(unicode_error, ValueError)  # a ValueError: its message travels
    assert type(rebuilt_error(*portable_error(unicode_error))) is ValueError

    class Local(Exception):
        pass

    again = rebuilt_error(*portable_error(Local("odd")))
    assert type(again) is RuntimeError and str(again) == "Local: odd"


def test_resume_with_another_process_count_reseeds_and_says_so(tiny_model, tmp_path,  # noqa: F811
                                                               monkeypatch):
    """A two-process checkpoint resumed by one process: its saved dropout streams do not map
    onto this process, so the stream is re-seeded from (seed, step, rank), and the log says."""
    import mrl.text.finetune as ft

    out = tmp_path / "ft"
    real, calls = ft.matryoshka_contrastive_loss, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ft, "matryoshka_contrastive_loss", interrupted)
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_model, workers.pairs(), out, FinetuneConfig(**workers.SETTINGS),
                     log=lambda s: None, checkpoint_minutes=0)  # fmt: skip
    path = partial_dir(out) / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    saved["torch_rng_ranks"] = [saved["torch_rng"], saved["torch_rng"]]  # as two processes
    torch.save(saved, path)
    logs: list[str] = []
    finetune(tiny_model, workers.pairs(), out, FinetuneConfig(**workers.SETTINGS), log=logs.append,
             resume=True)  # fmt: skip
    assert any("written by 2 process(es), resumed by 1: each process's dropout stream is "
               "re-seeded" in s for s in logs)  # fmt: skip


@pytest.mark.slow
def test_two_processes_resume_to_the_uninterrupted_weights(tiny_model, tmp_path):  # noqa: F811
    """Dropout on: each process's RNG stream is in the checkpoint, so a stop of both processes
    mid-epoch and a resume end on the uninterrupted two-process weights, bit for bit."""
    _spawn(tiny_model, tmp_path / "whole", workers.SETTINGS)
    _spawn(tiny_model, tmp_path / "cut", workers.SETTINGS, stop_after=4)
    saved = torch.load(partial_dir(tmp_path / "cut") / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4 and len(saved["torch_rng_ranks"]) == 2
    _spawn(tiny_model, tmp_path / "cut", workers.SETTINGS, resume=True)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_frozen_encoder_under_torchrun_is_refused(monkeypatch, tmp_path):
    import mrl.text.finetune as ft
    from mrl.distributed import Processes

    monkeypatch.setattr(ft, "join", lambda device_type: Processes(0, 2, 0))
    cfg = FinetuneConfig(init_rotation="pca", train_encoder=False)
    with pytest.raises(ValueError, match="--freeze-encoder trains one layer .* without torchrun"):
        finetune("default", workers.pairs(), tmp_path / "ft", cfg, log=lambda s: None)
