"""Re-order a fine-tuned model's dimensions post hoc: ``finetune(..., adapt_steps=N)``.

Fine-tuning with the Matryoshka loss moves full size and prefixes together; the orthogonal
adaptor (`mrl.text.adaptor`) then rotates the result so that its prefixes keep the ranking of
its own full size on the corpus. By default it starts from the identity (the fine-tuned order);
``init="pca"`` starts from the PCA of the fine-tuned corpus embeddings instead. A rotation
leaves every full-size cosine exactly as it was, so the fine-tuned full size is kept and only
the prefixes change.

The rotation ``R [D, D]`` (embeddings map as ``y @ R``) is folded into the model's last layer
when that is a bias-free, identity-activation ``Dense`` (the rotation start of `finetune`): its
weight ``W`` becomes ``R^T W``, so the saved folder keeps one ``Dense`` layer. Otherwise a new
``Dense`` computing ``y @ R`` is appended.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mrl.nesting import Nesting

__all__ = ["fold_rotation", "reorder_model"]


def _plain_linear(module: Any) -> torch.nn.Linear | None:
    """The ``nn.Linear`` of a bias-free, identity-activation sentence-transformers Dense."""
    linear = getattr(module, "linear", None)
    act = getattr(module, "activation_function", None)
    if not isinstance(linear, torch.nn.Linear) or linear.bias is not None:
        return None
    if not isinstance(act, torch.nn.Identity):
        return None
    if linear.in_features != linear.out_features:
        return None
    return linear


def fold_rotation(encoder: Any, rotation: torch.Tensor) -> str:
    """Make ``encoder``'s output ``y @ rotation``; returns "folded" or "appended".

    ``rotation`` must be an orthogonal [D, D] matrix (D: the encoder's output size): only then
    are full-size cosines unchanged, which is the point of re-ordering (checked)."""
    from mrl.text.adaptor import check_orthogonal, dense_rotation_module
    from mrl.text.encoders import embedding_dim

    _check_shape(rotation, embedding_dim(encoder))
    check_orthogonal(rotation.detach().cpu())
    linear = _plain_linear(encoder[-1])
    if linear is not None:
        with torch.no_grad():  # y = x W^T -> y R = x (R^T W)^T
            r = rotation.to(linear.weight.device, linear.weight.dtype)
            linear.weight.copy_(r.T @ linear.weight)
        return "folded"
    device = next(encoder.parameters()).device
    encoder.append(dense_rotation_module(rotation).to(device))
    return "appended"


def _check_shape(rotation: Any, d: int) -> None:
    if not isinstance(rotation, torch.Tensor) or tuple(rotation.shape) != (d, d):
        shape = (tuple(rotation.shape) if isinstance(rotation, torch.Tensor)
                 else f"a {type(rotation).__name__}")
        raise ValueError(f"rotation must be a [D, D] tensor with the encoder's D={d}, got {shape}")


def reorder_model(
    encoder: Any,
    corpus: torch.Tensor,
    nesting: Nesting,
    steps: int,
    seed: int,
    log: Callable[[str], None] = print,
    queries: torch.Tensor | None = None,
    init: str = "identity",
) -> dict[str, Any]:
    """Fit the orthogonal adaptor on ``corpus [N, D]`` (the model's own embeddings of its
    corpus; ``queries [Nq, D]``: its sample queries as pseudo-queries, else the documents) and
    fold it into ``encoder``; returns what to record (steps, final loss, how).

    ``init``: "identity" starts from the model's own order (already trained for prefixes);
    "pca" from the uncentred PCA of ``corpus``, which discards that order first.
    """
    from mrl.text.adaptor import AdaptorConfig, OrthogonalAdaptor

    spec = ",".join(str(m) for m in nesting.sizes)
    config = AdaptorConfig(nesting=spec, init=init, steps=steps, seed=seed)
    qx = None if queries is None else queries.detach().cpu()
    adaptor = OrthogonalAdaptor.fit(corpus.detach().cpu(), config, log=log, queries=qx)
    how = fold_rotation(encoder, adaptor.rotation)
    log(f"finetune: re-ordered by an orthogonal adaptor ({steps} steps, {how})")
    pseudo = "documents" if queries is None else int(queries.shape[0])
    return {"steps": steps, "seed": seed, "final_loss": adaptor.info.get("final_loss"),
            "how": how, "corpus_size": int(corpus.shape[0]), "pseudo_queries": pseudo,
            "init": init}  # fmt: skip
