"""mrl: Matryoshka Representation Learning (Kusupati et al., NeurIPS 2022), end to end.

The core (imported here) depends on torch and numpy only; heavier parts (FAISS, text models, the
HTTP service) live in submodules behind extras.
"""

from mrl.heads import FixedFeatureHead, MRLEHead, MRLHead, make_head
from mrl.losses import (
    MatryoshkaLoss,
    contrastive_loss,
    matryoshka_contrastive_loss,
    nested_cross_entropy,
)
from mrl.nesting import Nesting

__version__ = "0.1.0"

__all__ = [
    "FixedFeatureHead",
    "MRLEHead",
    "MRLHead",
    "MatryoshkaLoss",
    "Nesting",
    "__version__",
    "contrastive_loss",
    "make_head",
    "matryoshka_contrastive_loss",
    "nested_cross_entropy",
]
