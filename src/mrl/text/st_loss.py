"""The Matryoshka contrastive loss as a sentence-transformers loss (for its own trainer).

Like sentence-transformers' losses it takes the ``model`` at construction and, in ``forward``,
the tokenised columns of a batch (anchor, positive, optional negatives) and the (unused) labels.
It wraps the model (calls it once per column), never patches it; the maths is
`mrl.losses.matryoshka_contrastive_loss` (every prefix re-normalised, in-batch negatives, a
weighted sum over prefixes).

Example::

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    loss = MatryoshkaContrastiveLoss(model, Nesting.doubling(8, 384))
    SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss).train()
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mrl.losses import _check_temperature, matryoshka_contrastive_loss
from mrl.nesting import Nesting
from mrl.params import check_flag

__all__ = ["MatryoshkaContrastiveLoss"]


class MatryoshkaContrastiveLoss(nn.Module):
    """Sum over prefixes of InfoNCE with in-batch negatives, for (anchor, positive[, negative...]).

    Args:
        model: a `SentenceTransformer`; its embedding size must be ``nesting.dim``.
        nesting: prefix sizes (and weights) to train.
        temperature: logits are cosine / temperature (0.05 = sentence-transformers' scale 20).
        symmetric: also rank anchors for each positive.
    """

    def __init__(
        self,
        model: Any,
        nesting: Nesting | Sequence[int] | str,
        temperature: float | Tensor = 0.05,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        dim = _untruncated_dim(model)
        if isinstance(nesting, str):  # "doubling:8" / "full" need the width, known here
            nesting = Nesting.parse(nesting, dim=None if dim is None else int(dim))
        nesting = Nesting.coerce(nesting)
        if dim is not None:
            nesting.check_dim(int(dim), "the model's embeddings")
        _check_temperature(temperature)  # positive and finite; a 0-d tensor stays learnable
        self.model = model
        self.nesting = nesting
        self.temperature = temperature if isinstance(temperature, Tensor) else float(temperature)
        self.symmetric = check_flag(symmetric, "symmetric")  # "no" was read as True

    def embed(self, features: dict[str, Tensor]) -> Tensor:
        return self.model(features)["sentence_embedding"]  # [B, D]

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> Tensor:
        columns = [self.embed(f) for f in sentence_features]
        if len(columns) < 2:
            raise ValueError(f"need at least (anchor, positive) columns, got {len(columns)}")
        anchors, positives = columns[0], columns[1]
        negatives = torch.stack(columns[2:], dim=1) if len(columns) > 2 else None  # [B, n, D]
        return matryoshka_contrastive_loss(
            anchors,
            positives,
            self.nesting,
            negatives,
            temperature=self.temperature,
            symmetric=self.symmetric,
        )

    @property
    def citation(self) -> str:
        return "Kusupati et al., Matryoshka Representation Learning, NeurIPS 2022"

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "nesting": self.nesting.to_dict(),
            "temperature": float(self.temperature),
            "symmetric": self.symmetric,
        }


def _untruncated_dim(model: Any) -> int | None:
    """The width of ``model(features)["sentence_embedding"]``: a model loaded with
    ``truncate_dim=m`` still returns full-size embeddings from forward (truncation happens in
    ``encode``), while its reported dimension is m."""
    from mrl.text.encoders import embedding_dim

    truncate = getattr(model, "truncate_dim", None)
    if truncate is None:
        return embedding_dim(model)
    try:
        model.truncate_dim = None
        return embedding_dim(model)
    finally:
        model.truncate_dim = truncate
