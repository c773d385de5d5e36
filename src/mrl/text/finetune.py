"""Matryoshka fine-tuning of a sentence-transformers model on (query, positive[, negative]) pairs.

One plain loop: tokenise a batch, embed queries and positives (and negatives), apply
`mrl.losses.matryoshka_contrastive_loss` (InfoNCE with in-batch negatives at every prefix, each
re-normalised, summed), AdamW with linear warm-up and decay. The result is saved as a
sentence-transformers folder plus ``mrl.json`` (its nesting), so
``SentenceTransformer(path, truncate_dim=m)`` works and `mrl` knows the prefixes.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mrl.losses import matryoshka_contrastive_loss
from mrl.nesting import Nesting
from mrl.text.encoders import embedding_dim, load_encoder, resolve_model_path, write_model_nesting
from mrl.text.pairs import Pair

__all__ = ["FinetuneConfig", "finetune", "default_nesting"]


def default_nesting(dim: int) -> Nesting:
    """8, 16, 32, ... doubling up to D (D itself last): the text side's default."""
    return Nesting.doubling(8, dim)


@dataclass
class FinetuneConfig:
    """Fine-tuning settings.

    Attributes:
        nesting: prefix spec ("8,16,...", "doubling:8"); None = doubling from 8 to D.
        epochs: passes over the pairs.
        batch_size: pairs per step; the other B-1 positives are each query's negatives.
        lr: peak AdamW learning rate.
        warmup: fraction of steps with linear warm-up (then linear decay to 0).
        weight_decay: AdamW weight decay.
        temperature: softmax temperature on cosine (0.05 = scale 20).
        symmetric: also rank queries for each positive.
        max_seq_length: tokens per text during training (longer texts are truncated).
        max_steps: stop after this many steps (None = all epochs).
        seed: shuffling and initialisation seed.
        device: torch device string.
    """

    nesting: str | None = None
    epochs: int = 1
    batch_size: int = 32
    lr: float = 3e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    temperature: float = 0.05
    symmetric: bool = False
    max_seq_length: int = 128
    max_steps: int | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")


def _lr_lambda(total: int, warmup: float) -> Callable[[int], float]:
    w = max(1, int(round(total * warmup)))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (total - step) / max(1, total - w))

    return f


def _embed(encoder: Any, texts: Sequence[str], device: str) -> torch.Tensor:
    # `preprocess` in sentence-transformers >= 6, `tokenize` before; extra keys may be strings.
    prep = getattr(encoder, "preprocess", None) or encoder.tokenize
    features = prep(list(texts))
    features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
    return encoder(features)["sentence_embedding"]  # [B, D]


def _check_pairs(pairs: Sequence[Pair], batch_size: int) -> None:
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 pairs for in-batch negatives, got {len(pairs)}")
    has_neg = {p.negative is not None for p in pairs}
    if len(has_neg) > 1:
        raise ValueError("either every pair or none must have a negative")


def finetune(
    model: str | os.PathLike,
    pairs: Sequence[Pair],
    out: str | os.PathLike,
    config: FinetuneConfig | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Fine-tune ``model`` ("default" or a folder) on ``pairs``; save to ``out``; return ``out``."""
    config = config or FinetuneConfig()
    _check_pairs(pairs, config.batch_size)
    base = resolve_model_path(model)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    encoder = load_encoder(base, device=config.device)
    inference_length = encoder.max_seq_length  # restored before saving: training may cut shorter
    encoder.max_seq_length = config.max_seq_length
    dim = embedding_dim(encoder)
    nesting = (
        default_nesting(dim) if config.nesting is None else Nesting.parse(config.nesting, dim=dim)
    )
    nesting.check_dim(dim, "the model's embeddings")

    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    opt = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, config.warmup))
    encoder.train()
    step, t0 = 0, time.time()
    log(f"finetune: {len(pairs)} pairs, {total} steps, nesting {list(nesting.sizes)}")
    while step < total:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            batch = [pairs[i] for i in order[start : start + config.batch_size]]
            if len(batch) < 2 or step >= total:
                continue  # a last batch of one has no negatives
            q = _embed(encoder, [p.query for p in batch], config.device)  # [B, D]
            p = _embed(encoder, [p.positive for p in batch], config.device)  # [B, D]
            neg = None
            if batch[0].negative is not None:
                neg = _embed(encoder, [p.negative for p in batch], config.device)[
                    :, None
                ]  # [B,1,D]
            loss = matryoshka_contrastive_loss(
                q, p, nesting, neg, temperature=config.temperature, symmetric=config.symmetric
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            log(f"step {step}/{total} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    encoder.eval()
    encoder.max_seq_length = inference_length
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder.save(str(out), create_model_card=False)
    write_model_nesting(
        out,
        nesting,
        kind="finetune",
        base_model=str(model),
        pairs=len(pairs),
        steps=step,
        config=asdict(config),
    )
    log(f"saved {out} ({time.time() - t0:.0f}s)")
    return out


def load_config_json(path: str | os.PathLike) -> FinetuneConfig:
    return FinetuneConfig(**json.loads(Path(path).read_text()))
