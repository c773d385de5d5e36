"""Read embeddings for the CLI: a ``.npy`` file or an `EmbeddingStore` folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mrl.io import file_fingerprint, load_npy
from mrl.nesting import Nesting

__all__ = ["load_embeddings", "store_center", "store_normalized", "vectors_sidecar"]


def load_embeddings(
    path: str | os.PathLike, nesting: str | None = None
) -> tuple[np.ndarray, Nesting, np.ndarray | None]:
    """(vectors [N, D] float32, nesting, ids or None) from ``path``.

    A store folder brings its nesting and ids; a ``.npy`` file takes ``nesting`` (a spec for
    `Nesting.parse`, e.g. "doubling:8" or "8,16,32"), else a JSON sidecar ``<file>.json`` with a
    "nesting" entry, else ``doubling:8``; its ids come from the sidecar's "ids" list, if any.
    """
    path = Path(path)
    if path.is_dir():
        from mrl.retrieval.store import EmbeddingStore

        store = EmbeddingStore.open(path)
        if store.count == 0:
            raise ValueError(f"the store {path} holds no rows: nothing to index or search")
        nest = store.nesting if nesting is None else Nesting.parse(nesting, dim=store.dim)
        return store.read(), nest, store.ids
    if not path.exists():
        raise FileNotFoundError(f"embeddings not found: {path} (a .npy file or a store folder)")
    if path.suffix != ".npy":
        raise ValueError(f"embeddings must be a .npy file or a store folder, got {path.name!r}")
    x = load_npy(path, mmap_mode="r")
    if x.ndim != 2:
        raise ValueError(f"embeddings in {path} must be 2-D [N, D], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"embeddings in {path} are empty (shape {x.shape}): nothing to index "
                         "or search")
    if not np.issubdtype(x.dtype, np.floating):  # ints or bools are token ids or labels, not
        raise ValueError(f"embeddings in {path} must be floating point, got dtype {x.dtype}")
    side = path.with_suffix(".json")
    if nesting is None:
        found = _sidecar_nesting(side, x.shape, path) if side.exists() else None
        if found is not None:
            return np.asarray(x, np.float32), found, _sidecar_ids(side, x.shape, path)
        nesting = "doubling:8" if x.shape[1] >= 8 else "full"
    ids = _sidecar_ids(side, x.shape, path)
    return np.asarray(x, np.float32), Nesting.parse(nesting, dim=x.shape[1]), ids


def vectors_sidecar(npy: str | os.PathLike, shape: tuple[int, ...]) -> dict | None:
    """The ``<file>.json`` sidecar of the .npy ``npy`` holding vectors of ``shape``, or None: no
    sidecar, not readable JSON, or written for other vectors (its shape or fingerprint differs:
    an interrupted overwrite, or the old file of that name)."""
    npy = Path(npy)
    side = npy.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("shape") != list(shape):
        return None
    return meta if meta.get("fingerprint") == file_fingerprint(npy) else None


def _sidecar_ids(side: Path, shape: tuple[int, ...], npy: Path) -> np.ndarray | None:
    """The row ids a ``<file>.json`` sidecar lists (`mrl text encode` writes the documents'
    ids: Cranfield's row 469 is document 470), or None: no sidecar of these vectors, no ids."""
    meta = vectors_sidecar(npy, shape)
    ids = None if meta is None else meta.get("ids")
    if not isinstance(ids, list) or len(ids) != shape[0]:
        return None
    if all(isinstance(i, str) for i in ids):
        return np.asarray(ids, dtype=str)
    if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return np.asarray(ids, dtype=np.int64)
    return None


def store_center(path: str | os.PathLike) -> np.ndarray | None:
    """The [D] center an `EmbeddingStore` folder subtracted from its rows (None for a .npy file
    or a store without one): its rows, and queries read from it, are centred already."""
    path = Path(path)
    if not path.is_dir():
        return None
    from mrl.retrieval.store import EmbeddingStore

    return EmbeddingStore.open(path).center


def store_normalized(path: str | os.PathLike) -> bool:
    """Whether an `EmbeddingStore` folder L2-normalised its rows (False for a .npy file)."""
    path = Path(path)
    if not path.is_dir():
        return False
    from mrl.retrieval.store import EmbeddingStore

    return EmbeddingStore.open(path).normalized


def _sidecar_nesting(side: Path, shape: tuple[int, ...], npy: Path) -> Nesting | None:
    """The nesting a ``<file>.json`` sidecar records (None when it records none); errors name
    the sidecar."""
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"sidecar {side} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        return None
    dim = shape[1]
    said = meta.get("shape")
    if isinstance(said, list) and said != list(shape):
        # written for other vectors (the old file of that name): its metadata does not apply
        raise ValueError(
            f"sidecar {side} describes embeddings of shape {said}, but the file holds "
            f"{list(shape)}; remove or fix the sidecar, or pass --nesting"
        )
    said = meta.get("fingerprint")
    if isinstance(said, str) and said != file_fingerprint(npy):
        # the vectors were rewritten after this sidecar (an interrupted overwrite)
        raise ValueError(
            f"sidecar {side} was written for other vectors than {npy} (an interrupted "
            "overwrite?); encode again, or remove the sidecar and pass --nesting"
        )
    if meta.get("nesting") is None:
        return None
    try:
        nest = Nesting.from_dict(meta["nesting"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"sidecar {side}: bad nesting ({exc})") from None
    if nest.dim != dim:
        raise ValueError(
            f"sidecar {side} has a nesting ending at {nest.dim}, but the embeddings have {dim} "
            "dims; fix the sidecar or pass --nesting"
        )
    return nest
