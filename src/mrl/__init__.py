"""mrl: Matryoshka Representation Learning (Kusupati et al., NeurIPS 2022), end to end.

The core (imported here) depends on torch and numpy only; heavier parts (FAISS, text models, the
HTTP service) live in submodules behind extras.
"""

from mrl.nesting import Nesting

__version__ = "0.1.0"

__all__ = ["Nesting", "__version__"]
