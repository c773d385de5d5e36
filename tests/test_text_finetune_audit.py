"""Fine-tune settings that ran without their effect, and checkpoints that were not what they
claimed: each case refused or said (found by an audit of mrl.text.finetune)."""

from __future__ import annotations

import warnings

import pytest
import torch

from mrl.text.checkpoint import checkpoint_file, folder_fingerprint
from mrl.text.finetune import FinetuneConfig, _checkpoint, finetune
from mrl.text.pairs import Pair

PAIRS = [Pair(f"title {i}", f"a body about wings {i}") for i in range(10)]


def test_a_validation_fold_with_no_pair_is_refused():
    """round(10 * 0.04) = 0 held-out pairs: it trained on every pair, wrote no validation.json
    and exited 0."""
    config = FinetuneConfig(val_fraction=0.04, init_rotation="pca", train_encoder=False)
    with pytest.raises(ValueError, match=r"val_fraction=0.04 holds out no pair of the 10 in "
                                         r"val_fold=0 \(about 0.40 pairs a fold\)"):
        finetune("not-loaded", PAIRS, "unused-out", config)


def test_rotation_lr_with_a_frozen_encoder_is_refused():
    """Only the layer trains: rotation_lr was its rate, lr was recorded but ignored (weights
    equal for lr=1e-5 and lr=10) and still refused a resume that changed it."""
    with pytest.raises(ValueError, match=r"with train_encoder=False \(--freeze-encoder\) only the "
                                         r"layer trains: give its rate as lr"):
        FinetuneConfig(init_rotation="pca", train_encoder=False, rotation_lr=1e-2)
    FinetuneConfig(init_rotation="pca", train_encoder=False, lr=1e-2)  # the way to say it
    FinetuneConfig(init_rotation="pca", rotation_lr=1e-2)  # whole model: two rates


def test_seed_beyond_torchs_range_is_named():
    with pytest.raises(ValueError, match=r"seed must be in \[0, 1099511627775\], got "
                                         r"seed=18446744073709551616"):
        FinetuneConfig(seed=2**64)  # torch's "Overflow when unpacking long long" before


def test_no_checkpoints_does_not_ignore_an_interrupted_one(tmp_path):
    """checkpoint_minutes=None started from scratch beside an interrupted run's checkpoint,
    which the next run then called a leftover of this one."""
    out = tmp_path / "ft"
    ckpt = checkpoint_file(out)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"a checkpoint")
    for resume in (False, "auto"):
        with pytest.raises(FileExistsError, match=r"ft.partial' holds the checkpoint of an "
                                                  r"interrupted fine-tune; checkpoint_minutes"):
            _checkpoint(out, "unused", PAIRS, [], FinetuneConfig(), resume, None)
    assert _checkpoint(tmp_path / "other", "unused", PAIRS, [], FinetuneConfig(), "auto",
                       None) is None  # nothing there: no checkpoint, as before


def test_a_model_rewritten_in_the_middle_has_another_fingerprint(tmp_path):
    """The head-and-tail fingerprint (1 MiB each) missed a same-size rewrite of the middle of a
    weights file, so a fine-tune resumed on another base model."""
    model = tmp_path / "model.safetensors"
    data = bytearray(range(256)) * (3 * 4096)  # 3 MiB
    model.write_bytes(bytes(data))
    before = folder_fingerprint(model)
    data[len(data) // 2] ^= 0xFF  # one byte in the middle, same size
    model.write_bytes(bytes(data))
    assert folder_fingerprint(model) != before


def test_distill_sizes_the_corpus_cannot_take_are_said():
    pytest.importorskip("sentence_transformers")
    from mrl.nesting import Nesting
    from mrl.text.adaptor import dense_rotation_module
    from mrl.text.finetune import _DistillTerm

    config = FinetuneConfig(init_rotation="pca", train_encoder=False, distill=0.5,
                            distill_neighbours=1000, distill_batch=5000)
    corpus = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    with pytest.warns(UserWarning) as seen:
        _DistillTerm(dense_rotation_module(torch.eye(8)), corpus, Nesting((4, 8)), config)
    said = sorted(str(w.message) for w in seen)
    assert said == ["distill_batch=5000 is more than this corpus of 10 documents allows: 10 are "
                    "used", "distill_neighbours=1000 is more than this corpus of 10 documents "
                    "allows: 9 are used"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sizes it can take: no warning
        _DistillTerm(dense_rotation_module(torch.eye(8)), corpus, Nesting((4, 8)),
                     FinetuneConfig(init_rotation="pca", train_encoder=False, distill=0.5,
                                    distill_neighbours=9, distill_batch=10))
