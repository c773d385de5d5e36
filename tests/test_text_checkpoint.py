"""`mrl text finetune` checkpoints: an interrupted fine-tune resumes to the uninterrupted result.

The tiny random sentence-transformers model (D=32, dropout 0.1) comes from test_text_models'
fixtures. An interruption is a KeyboardInterrupt raised by the loss of step k + 1, i.e. a kill
after step k's checkpoint was written and before the next one.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sentence_transformers")

import torch  # noqa: E402
from test_text_models import tiny_model  # noqa: E402, F401  (fixture)

import mrl.text.finetune as ft  # noqa: E402
from mrl.cli import main  # noqa: E402
from mrl.io import exclusive_lock  # noqa: E402
from mrl.text.checkpoint import partial_dir, texts_digest  # noqa: E402
from mrl.text.finetune import FinetuneConfig, finetune  # noqa: E402
from mrl.text.pairs import Pair  # noqa: E402

FROZEN = dict(
    nesting="8,16,32", batch_size=4, epochs=3, lr=1e-2, max_seq_length=32, init_rotation="pca",
    train_encoder=False, distill=1.0, distill_batch=4, distill_neighbours=3, distill_negatives=2,
)  # fmt: skip
WHOLE = dict(nesting="8,16,32", batch_size=4, epochs=2, lr=1e-3, max_seq_length=32)


def _pairs(n: int = 9) -> list[Pair]:
    # 9 pairs in batches of 4: each epoch ends with a batch of one, which is skipped
    return [Pair(f"title {i} wing", f"a body {i} about lift and heat {i % 3}") for i in range(n)]


def _weights(out) -> dict[str, torch.Tensor]:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(out)).state_dict()


_LOSS = ft.matryoshka_contrastive_loss


def _interrupt_after(monkeypatch, steps: int) -> None:
    """The loss of step ``steps + 1`` raises KeyboardInterrupt (as Ctrl-C would)."""
    calls = {"n": 0}
    loss = _LOSS  # the real one, also when a patched one is in place

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    monkeypatch.setattr(ft, "matryoshka_contrastive_loss", interrupted)


@pytest.mark.parametrize(("settings", "stop"), [(FROZEN, 2), (FROZEN, 5), (WHOLE, 3)])
def test_resume_gives_the_uninterrupted_weights(  # noqa: F811
    tiny_model, tmp_path, monkeypatch, settings, stop  # noqa: F811
):
    """Stops after step 2 (an epoch's end: 2 steps per epoch), 5 or 3 (mid-epoch), resumes, and
    ends with the same weights, bit for bit, as one uninterrupted run (dropout included)."""
    pairs = _pairs()
    whole = finetune(tiny_model, pairs, tmp_path / "whole", FinetuneConfig(**settings),
                     log=lambda s: None, checkpoint_minutes=0)  # fmt: skip
    assert not partial_dir(whole).exists()  # removed once the model folder is saved
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        _interrupt_after(m, stop)
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_model, pairs, out, FinetuneConfig(**settings), log=lambda s: None,
                     checkpoint_minutes=0)  # fmt: skip
    assert not out.exists()
    saved = torch.load(partial_dir(out) / "checkpoint.pt", weights_only=True)
    assert saved["step"] == stop
    logs: list[str] = []
    finetune(tiny_model, pairs, out, FinetuneConfig(**settings), log=logs.append, resume=True,
             checkpoint_minutes=0)  # fmt: skip
    assert any(f"resumed from {partial_dir(out) / 'checkpoint.pt'} (step {stop})" in s
               for s in logs)  # fmt: skip
    a, b = _weights(whole), _weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not partial_dir(out).exists()
    meta = json.loads((out / "mrl.json").read_text())
    assert meta["steps"] == (6 if settings is FROZEN else 4)


def test_default_checkpoints_at_epoch_ends_resume_exactly(
    tiny_model, tmp_path, monkeypatch  # noqa: F811
):
    """With the default 10 minutes (which never elapse here) the checkpoint is written at each
    epoch's end: a stop in epoch 2 resumes from epoch 1's end, to the uninterrupted weights."""
    pairs = _pairs()
    whole = finetune(tiny_model, pairs, tmp_path / "whole", FinetuneConfig(**FROZEN),
                     log=lambda s: None)  # fmt: skip
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN), log=lambda s: None)
    assert torch.load(partial_dir(out) / "checkpoint.pt", weights_only=True)["step"] == 2
    finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN), log=lambda s: None, resume=True)
    a, b = _weights(whole), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_after_the_last_step_resumes_to_saving(
    tiny_model, tmp_path, monkeypatch  # noqa: F811
):
    """A kill while validating or saving (after the last step): the resume trains nothing."""
    pairs = _pairs()
    cfg = dict(FROZEN, val_fraction=0.3)
    out = tmp_path / "ft"
    with monkeypatch.context() as m:
        m.setattr(ft, "_validate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_model, pairs, out, FinetuneConfig(**cfg), log=lambda s: None)
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)  # any training step would raise
        finetune(tiny_model, pairs, out, FinetuneConfig(**cfg), log=lambda s: None, resume=True)
    assert (out / "validation.json").is_file() and not partial_dir(out).exists()


def test_checkpoint_errors(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    pairs = _pairs()
    out = tmp_path / "ft"
    with pytest.raises(FileNotFoundError, match=r"resume \(--resume\) given but there is no "
                       r"checkpoint at .*ft\.partial/checkpoint\.pt"):  # fmt: skip
        finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN), resume=True)
    with pytest.raises(ValueError, match=r"checkpoint_minutes \(--checkpoint-minutes\) must be "
                       r">= 0, got -1"):  # fmt: skip
        finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN), checkpoint_minutes=-1)
    with pytest.raises(ValueError, match="resume=True needs checkpoints"):
        finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN), resume=True,
                 checkpoint_minutes=None)  # fmt: skip
    assert not partial_dir(out).exists()  # a failed start leaves nothing behind
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)  # with the default minutes: no checkpoint yet, nothing kept
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN), log=lambda s: None)
        assert not partial_dir(out).exists()
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN), log=lambda s: None,
                     checkpoint_minutes=0)  # fmt: skip
    with pytest.raises(FileExistsError, match="holds an interrupted fine-tune into this --out; "
                       "pass --resume"):  # fmt: skip
        finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN))
    other = FinetuneConfig(**dict(FROZEN, lr=5e-3))
    with pytest.raises(ValueError, match=r"another fine-tune; cannot resume it with these "
                       r"settings or data: settings\.lr: checkpoint 0\.01 vs now "
                       r"0\.005$"):  # fmt: skip
        finetune(tiny_model, pairs, out, other, resume=True)
    with pytest.raises(ValueError, match="data: pairs: checkpoint '[0-9a-f]+' vs now "
                       "'[0-9a-f]+'$"):  # pairs alone: the corpus is their positives  # fmt: skip
        finetune(tiny_model, _pairs(10), out, FinetuneConfig(**FROZEN), resume=True)
    dead = partial_dir(out) / ".checkpoint.pt.abc123.tmp"  # a write killed by kill -9
    dead.write_bytes(b"partial")
    with exclusive_lock(partial_dir(out) / ".lock"):  # another process's lock (flock: per open)
        with pytest.raises(FileExistsError, match="another fine-tune is writing"):
            finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN), resume=True)
    assert dead.exists()  # a locked-out run touches nothing
    with pytest.raises(ValueError, match="pairs: checkpoint"):
        finetune(tiny_model, _pairs(10), out, FinetuneConfig(**FROZEN), resume=True)
    assert not dead.exists()  # removed once the lock is held: no write of ours is running
    (partial_dir(out) / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is unreadable or corrupt"):
        finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN), resume=True)
    assert (partial_dir(out) / "checkpoint.pt").is_file()  # a refused resume removes nothing


def test_texts_digest_tells_rows_and_missing_texts_apart():
    assert texts_digest([("a", "b")]) != texts_digest([("ab", "")])
    assert texts_digest([("a", None)]) != texts_digest([("a", "")])
    assert texts_digest([("a",), ("b",)]) != texts_digest([("a", "b")])
    assert texts_digest([("a", "b")]) == texts_digest([["a", "b"]])


def test_cli_resume_and_interrupt_hint(tiny_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": p.query, "positive": p.positive}) + "\n"
                             for p in _pairs()))  # fmt: skip
    out = tmp_path / "ft"
    args = ["text", "finetune", "--model", str(tiny_model), "--pairs", str(pairs), "--out",
            str(out), "--nesting", "8,16,32", "--batch-size", "4", "--epochs", "2",
            "--max-seq-length", "32", "--init-rotation", "pca", "--freeze-encoder",
            "--checkpoint-minutes", "0"]  # fmt: skip
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        assert main(args) == 130
    err = capsys.readouterr().err
    assert "mrl text: interrupted; resume with the same command plus --resume (the last " \
        "checkpoint, step 1, is in" in err
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (out / "mrl.json").is_file() and not partial_dir(out).exists()


def test_a_folder_at_out_partial_is_never_taken_over(tiny_model, tmp_path):  # noqa: F811
    """OUT.partial holding anything but a checkpoint's files (here a saved model named like it)
    is refused, and its files stay."""
    pairs = _pairs()
    other = finetune(tiny_model, pairs, tmp_path / "m.partial", FinetuneConfig(**FROZEN),
                     log=lambda s: None)  # fmt: skip
    before = sorted(p.name for p in other.iterdir())
    with pytest.raises(FileExistsError, match=r"m\.partial' is where a fine-tune into this "
                       r"--out keeps its checkpoint, but it holds other files"):  # fmt: skip
        finetune(tiny_model, pairs, tmp_path / "m", FinetuneConfig(**FROZEN))
    assert sorted(p.name for p in other.iterdir()) == before and not (other / ".lock").exists()
    (tmp_path / "n.partial").write_text("a file")
    with pytest.raises(FileExistsError, match=r"n\.partial' \(the checkpoint folder of this "
                       r"--out\) is a file"):  # fmt: skip
        finetune(tiny_model, pairs, tmp_path / "n", FinetuneConfig(**FROZEN))


def test_resume_identity_is_the_model_not_its_spelling(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """The same model under another path spelling resumes; a model rewritten in place (same
    path, other weights) is refused."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    pairs = _pairs()
    out = tmp_path / "ft"
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            finetune("base", pairs, out, FinetuneConfig(**WHOLE), log=lambda s: None,
                     checkpoint_minutes=0)  # fmt: skip
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    saved = bytes(data)
    data[-1] ^= 1  # another model at the same path
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"base_model\.model\.safetensors: checkpoint"):
        finetune(str(base) + "/", pairs, out, FinetuneConfig(**WHOLE), resume=True)
    weights.write_bytes(saved)
    finetune(str(base.resolve()) + "/", pairs, out, FinetuneConfig(**WHOLE), log=lambda s: None,
             resume=True)  # fmt: skip
    assert (out / "mrl.json").is_file()


def test_resume_auto_and_a_leftover_checkpoint(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    pairs = _pairs()
    out = tmp_path / "ft"
    finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN), log=lambda s: None,
             resume="auto")  # no checkpoint: starts  # fmt: skip
    whole = _weights(out)
    out2 = tmp_path / "ft2"
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_model, pairs, out2, FinetuneConfig(**FROZEN), log=lambda s: None)
    logs: list[str] = []
    finetune(tiny_model, pairs, out2, FinetuneConfig(**FROZEN), log=logs.append, resume="auto")
    assert any("resumed from" in s for s in logs)
    assert all(torch.equal(a, b) for a, b in zip(whole.values(), _weights(out2).values()))
    with pytest.raises(ValueError, match="resume must be True, False or 'auto', got 'yes'"):
        finetune(tiny_model, pairs, tmp_path / "x", FinetuneConfig(**FROZEN), resume="yes")
    # a stop between saving OUT and removing OUT.partial: the leftover is named
    partial_dir(out).mkdir()
    (partial_dir(out) / "checkpoint.pt").write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"already holds a finished fine-tune; .*ft\.partial"
                       r"' is a leftover checkpoint of it: remove that folder"):  # fmt: skip
        finetune(tiny_model, pairs, out, FinetuneConfig(**FROZEN), resume=True)


def test_cli_hint_without_a_checkpoint(tiny_model, tmp_path, monkeypatch, capsys):  # noqa: F811
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": p.query, "positive": p.positive}) + "\n"
                             for p in _pairs()))  # fmt: skip
    args = ["text", "finetune", "--model", str(tiny_model), "--pairs", str(pairs), "--out",
            str(tmp_path / "ft"), "--nesting", "8,16,32", "--batch-size", "4",
            "--max-seq-length", "32"]  # fmt: skip
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)
        assert main(args) == 130
    assert ("interrupted; no checkpoint was written yet: run the same command again to start "
            "over") in capsys.readouterr().err  # fmt: skip
    assert not partial_dir(tmp_path / "ft").exists()


def test_a_failed_start_leaves_no_folders_and_out_dot_is_named(tiny_model, tmp_path,  # noqa: F811
                                                               monkeypatch, capsys):
    from mrl.text.checkpoint import FinetuneCheckpoint

    out = tmp_path / "x" / "a" / "b" / "ft"
    with pytest.raises(ValueError, match="64"):  # the model has 32 dims: fails after the lock
        finetune(tiny_model, _pairs(), out, FinetuneConfig(**dict(FROZEN, nesting="8,64")))
    assert not (tmp_path / "x").exists()  # OUT.partial and the parents it made are gone
    with pytest.raises(ValueError, match="must name a folder below another one, got '/'"):
        partial_dir("/")
    monkeypatch.chdir(tmp_path)
    assert partial_dir(".") == tmp_path.with_name(tmp_path.name + ".partial")
    for out in (".", str(tmp_path.parent)):  # an empty working folder, or one above it
        assert main(["text", "finetune", "--model", str(tiny_model), "--corpus", "cranfield",
                     "--out", out]) == 2  # fmt: skip
        assert "is the working folder or holds it; name a new folder for the output (e.g. " \
            "--out ./model)" in capsys.readouterr().err
    # OUT filled by another run between the first check and the lock: refused under the lock
    done = tmp_path / "done"
    done.mkdir()
    (done / "mrl.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        FinetuneCheckpoint(done, {}, False, 10.0).__enter__()
    assert not partial_dir(done).exists()


def test_exit_after_finish_leaves_a_later_runs_lock_alone(tmp_path):
    from mrl.text.checkpoint import FinetuneCheckpoint

    ckpt = FinetuneCheckpoint(tmp_path / "ft", {}, False, 10.0).__enter__()
    ckpt.finish()
    assert not partial_dir(tmp_path / "ft").exists()
    partial_dir(tmp_path / "ft").mkdir()
    lock = partial_dir(tmp_path / "ft") / ".lock"
    lock.write_text("")  # a second run's lock, taken after the first finished
    ckpt.__exit__(None, None, None)
    assert lock.exists()
