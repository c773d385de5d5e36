"""Read embeddings for the CLI: a ``.npy`` file or an `EmbeddingStore` folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mrl.nesting import Nesting

__all__ = ["load_embeddings"]


def load_embeddings(
    path: str | os.PathLike, nesting: str | None = None
) -> tuple[np.ndarray, Nesting, np.ndarray | None]:
    """(vectors [N, D] float32, nesting, ids or None) from ``path``.

    A store folder brings its nesting and ids; a ``.npy`` file takes ``nesting`` (a spec for
    `Nesting.parse`, e.g. "doubling:8" or "8,16,32"), else a JSON sidecar ``<file>.json`` with a
    "nesting" entry, else ``doubling:8``.
    """
    path = Path(path)
    if path.is_dir():
        from mrl.retrieval.store import EmbeddingStore

        store = EmbeddingStore.open(path)
        nest = store.nesting if nesting is None else Nesting.parse(nesting, dim=store.dim)
        return store.read(), nest, store.ids
    if not path.exists():
        raise FileNotFoundError(f"embeddings not found: {path} (a .npy file or a store folder)")
    if path.suffix != ".npy":
        raise ValueError(f"embeddings must be a .npy file or a store folder, got {path.name!r}")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path} is not a readable .npy file ({exc})") from None
    if x.ndim != 2:
        raise ValueError(f"embeddings in {path} must be 2-D [N, D], got shape {x.shape}")
    if nesting is None:
        side = path.with_suffix(".json")
        if side.exists():
            meta = json.loads(side.read_text())
            if isinstance(meta, dict) and "nesting" in meta:
                return np.asarray(x, np.float32), Nesting.from_dict(meta["nesting"]), None
        nesting = "doubling:8" if x.shape[1] >= 8 else "full"
    return np.asarray(x, np.float32), Nesting.parse(nesting, dim=x.shape[1]), None
