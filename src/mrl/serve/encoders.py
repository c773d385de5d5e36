"""Encoders the service can run: a small protocol, a deterministic fake, and sentence-transformers.

The service only needs four things from a model: a name, its nesting (which prefix sizes
``dimensions`` may ask for), a token counter (for ``usage`` and the length limit) and a batch
``encode``. Anything with these attributes can be served; tests inject `HashEncoder`, a
deterministic function of the text, so they run in milliseconds.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mrl.nesting import Nesting

__all__ = [
    "Encoder",
    "HashEncoder",
    "SentenceTransformerEncoder",
    "VisionEncoder",
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
        nesting: Nesting | Sequence[int] | str | None = None,
        name: str = "hash-encoder",
        max_tokens: int = 128,
        delay_s: float = 0.0,
        delay_per_item_s: float = 0.0,
    ) -> None:
        self.nesting = (Nesting.coerce(nesting) if nesting is not None  # hash:4 was refused
                        else Nesting.doubling(min(8, dim), dim))
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
        from mrl.text import encoders as text_encoders  # model folders are the text module's

        folder = text_encoders.resolve_model_path(path)
        self.model = text_encoders.load_encoder(folder, device=device)
        dim = text_encoders.embedding_dim(self.model)
        if nesting is None:
            nesting = text_encoders.model_nesting(folder) or Nesting.full(dim)
        self.nesting = Nesting.parse(nesting, dim=dim)
        # the folder's real name: "." served a model whose id was ""
        self.name = name or ("all-MiniLM-L6-v2" if str(path) == "default"
                             else folder.resolve().name)  # fmt: skip
        self.max_tokens = int(self.model.max_seq_length)
        self.batch_size = batch_size
        self.path = folder
        # The fast tokenizer keeps its truncation/padding settings as shared state: counting
        # (truncation off) beside encoding (truncation to max_seq_length) in another thread made
        # either run with the other's settings (a 500, or an over-long text counted as 256).
        # Counting has a copy of its own: behind the encoding's lock it waited a whole forward
        # pass, and waiting counts filled the worker threads searches need (a 5.5 s search).
        self._tokenizer_lock = threading.Lock()
        self._counter = copy.deepcopy(self.model.tokenizer)
        self._counter_lock = threading.Lock()

    def fingerprint(self) -> dict[str, str]:
        """The model's files (`mrl.text.checkpoint.folder_fingerprint`): two folders of one name
        (every `mrl text finetune --out model`) are told apart; a copy is the same model."""
        from mrl.text.checkpoint import folder_fingerprint

        return folder_fingerprint(self.path)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._tokenizer_lock:
            emb = self.model.encode(list(texts), batch_size=self.batch_size,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)  # [B, D]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        with self._counter_lock:
            enc = self._counter(list(texts), add_special_tokens=True, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]


# Image shape (H, W) each built-in task trains on; image folders record their side in the config.
_TASK_SHAPES = {"fashion-mnist": (28, 28), "fashion-mnist-1k": (28, 84), "synthetic": (12, 12)}


class VisionEncoder:
    """A vision run folder (`mrl train`) behind the `Encoder` protocol.

    Inputs are images as base64 strings (PNG/JPEG/..., optionally a ``data:image/...;base64,``
    URL), decoded with Pillow as training decoded an image folder (shorter side resized, centre
    crop; 16-bit images scaled) to the run's channels and training shape.
    ``count_tokens`` counts one token per image (that is what ``usage`` reports) and validates
    every image first, so a bad one is a 400 for its request and never reaches a batch.

    Args:
        run_dir: a run folder (or checkpoint) written by `mrl train`.
        image_size: "H,W" or (H, W) to resize to; default: the task's training shape.
        name: the model id clients send; default: the folder name.
    """

    def __init__(self, run_dir: str | os.PathLike, image_size: tuple[int, int] | None = None,
                 name: str | None = None, device: str = "cpu") -> None:
        from pathlib import Path

        from mrl.train import load_run

        self.model, config, saved = load_run(run_dir, device)
        self.device = device
        self.nesting = Nesting.from_dict(saved["nesting"])
        self.channels = int(saved["task"]["in_channels"])
        if image_size is None:
            data = config.data
            image_size = _TASK_SHAPES.get(data.dataset, (data.image_size, data.image_size))
        self.shape = (int(image_size[0]), int(image_size[1]))
        self.name = name or Path(run_dir).resolve().name
        self.run_dir = Path(run_dir)
        self.max_tokens = 1  # one "token" per image
        self.input_kind = "image"  # base64 images: not held to the text character cap

    def fingerprint(self) -> str:
        """The checkpoint's `mrl.io.file_fingerprint`: every run folder is named ``runs/mrl``."""
        from mrl.io import file_fingerprint
        from mrl.train import CHECKPOINT

        path = self.run_dir if self.run_dir.is_file() else self.run_dir / CHECKPOINT
        return file_fingerprint(path)

    def _decode(self, i: int, data: str) -> np.ndarray:
        """One base64 image -> uint8 [C, H, W]; ValueError naming ``input[i]`` otherwise."""
        import base64
        import binascii
        import io

        from mrl._optional import require

        image_mod = require("PIL.Image", "vision")
        if data.startswith("data:"):
            data = data.split(",", 1)[-1]
        try:
            raw = base64.b64decode(data, validate=True)
            with warnings.catch_warnings():  # Pillow's "may be a decompression bomb" warning
                warnings.simplefilter("error", image_mod.DecompressionBombWarning)
                img = image_mod.open(io.BytesIO(raw))
                img.load()
            return self._to_array(img)  # a broken image is this input's error, not the batch's
        except (binascii.Error, ValueError, OSError) as exc:
            raise ValueError(f"input[{i}] is not a base64-encoded image ({exc})") from None
        except (image_mod.DecompressionBombError, image_mod.DecompressionBombWarning) as exc:
            raise ValueError(f"input[{i}] is too large an image ({exc})") from None

    def _to_array(self, img: Any) -> np.ndarray:
        """A PIL image -> uint8 ``[C, H, W]`` as training decoded it (`ImageFolder`): a square
        shape (image folders, Fashion-MNIST) by the shorter side and a centre crop (a stretched
        3:1 image differed from training by 64 grey levels per pixel on average), another shape
        (fashion-mnist-1k's 28x84 panels) resized to it; deeper than 8 bits scaled, not
        clipped, to 0..255 (``ToTensor``)."""
        from mrl.data.image_folder import CenterCrop, Resize, ToTensor, _pil

        h, w = self.shape
        img = CenterCrop(h)(Resize(h)(img)) if h == w else img.resize((w, h), _pil().BILINEAR)
        return ToTensor(self.channels)(img).numpy()  # [C, H, W]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        for i, t in enumerate(texts):
            self._decode(i, t)
        return [1] * len(texts)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.stack([self._decode(i, t) for i, t in enumerate(texts)]))
        with torch.no_grad():
            z = self.model.embed(x.to(self.device))  # [B, D]
        return z.float().cpu().numpy()


def load_encoder(model: str, nesting: str | None = None, name: str | None = None) -> Encoder:
    """``"default"``, a sentence-transformers folder, a vision run folder (``checkpoint.pt``:
    images in, see `VisionEncoder`) or ``"hash:DIM"`` (the fake, for demos)."""
    if model.startswith("hash:"):
        try:
            dim = int(model.split(":", 1)[1])
        except ValueError:
            dim = 0
        if dim < 1:  # hash:0 said "start must be positive", naming no option
            raise ValueError(f"model 'hash:DIM' needs a positive integer DIM, got {model!r}")
        nest = Nesting.parse(nesting, dim=dim) if nesting is not None else None  # "" is an error
        return HashEncoder(dim, nest, name=name or model)
    if os.path.isfile(os.path.join(model, "checkpoint.pt")):
        if nesting is not None:
            raise ValueError("--nesting does not apply to a vision run (its nesting is recorded)")
        return VisionEncoder(model, name=name)
    return SentenceTransformerEncoder(model, nesting=nesting, name=name)
