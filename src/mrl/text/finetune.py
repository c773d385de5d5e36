"""Matryoshka fine-tuning of a sentence-transformers model on (query, positive[, negative]) pairs.

One plain loop: tokenise a batch, embed queries and positives (and negatives), apply
`mrl.losses.matryoshka_contrastive_loss` (InfoNCE with in-batch negatives at every prefix, each
re-normalised, summed), AdamW with linear warm-up and decay. The result is saved as a
sentence-transformers folder plus ``mrl.json`` (its nesting), so
``SentenceTransformer(path, truncate_dim=m)`` works and `mrl` knows the prefixes.

Rotation start (``init_rotation``): a few hundred steps cannot reorganise a 384-d space so that
its first 64 coordinates carry the ranking, but a rotation can, and it costs nothing at full size.
With ``init_rotation="pca"`` a `Dense` D -> D layer (no bias, identity activation) is appended to
the model, initialised with the uncentred PCA rotation of the base model's embeddings of the
corpus (`mrl.text.adaptor.pca_rotation`: the same map as the ``pca`` baseline); a path to a
rotation saved by `mrl text adapt` (adaptor .pt/.npy) starts from the learned adaptor instead.
The whole model and that layer are then trained with the Matryoshka loss. The layer is saved as
the folder's last module, so the folder still loads with plain sentence-transformers.

``train_encoder=False`` freezes the transformer and trains only that layer: the pairs are
encoded once by the frozen model (cached), and each step is a ``[B, D] x [D, D]`` product, so
many epochs cost seconds where one epoch of the whole model costs an hour on a small CPU.
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
from mrl.text.encoders import (
    embedding_dim,
    encode_cached,
    load_encoder,
    resolve_model_path,
    write_model_nesting,
)
from mrl.text.pairs import Pair

__all__ = ["FinetuneConfig", "finetune", "default_nesting", "initial_rotation"]


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
        init_rotation: None (plain), "pca" (append a Dense layer initialised with the uncentred
            PCA rotation of the base model's corpus embeddings) or the path of an adaptor file
            from `mrl text adapt` (.pt or .npy: start from that learned rotation).
        rotation_lr: learning rate of that Dense layer (None = ``lr``).
        train_encoder: False = freeze the transformer, train only the rotation layer on the
            frozen model's (cached) embeddings of the pairs (needs init_rotation).
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
    init_rotation: str | None = None
    rotation_lr: float | None = None
    train_encoder: bool = True

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
        if self.rotation_lr is not None and not self.rotation_lr > 0:
            raise ValueError(f"rotation_lr must be > 0 or None, got {self.rotation_lr}")
        if self.rotation_lr is not None and self.init_rotation is None:
            raise ValueError("rotation_lr needs init_rotation ('pca' or an adaptor file)")
        if not self.train_encoder and self.init_rotation is None:
            raise ValueError("train_encoder=False needs init_rotation (the layer to train)")
        spec = self.init_rotation
        if spec is not None and spec != "pca" and not str(spec).endswith((".pt", ".npy")):
            raise ValueError(
                f"init_rotation must be None, 'pca' or an adaptor .pt/.npy file, got {spec!r}"
            )


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


def _param_groups(encoder: Any, config: FinetuneConfig) -> list[dict[str, Any]]:
    """One AdamW group, or two when the appended rotation layer has its own learning rate."""
    if config.init_rotation is None or config.rotation_lr is None:
        return [{"params": list(encoder.parameters()), "lr": config.lr}]
    last = list(encoder[-1].parameters())  # the appended Dense layer
    ids = {id(p) for p in last}
    rest = [p for p in encoder.parameters() if id(p) not in ids]
    return [{"params": rest, "lr": config.lr}, {"params": last, "lr": config.rotation_lr}]


def _check_pairs(pairs: Sequence[Pair], batch_size: int) -> None:
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 pairs for in-batch negatives, got {len(pairs)}")
    has_neg = {p.negative is not None for p in pairs}
    if len(has_neg) > 1:
        raise ValueError("either every pair or none must have a negative")


def initial_rotation(
    model: str | os.PathLike,
    encoder: Any,
    spec: str,
    texts: Sequence[str],
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """The starting rotation ``R [D, D]`` (orthogonal; embeddings map as ``x @ R``).

    ``spec`` "pca": uncentred PCA of ``encoder``'s embeddings of ``texts`` (the corpus, encoded at
    the model's own max_seq_length, cached in ``cache_dir``); otherwise an adaptor file path.
    """
    from mrl.text.adaptor import OrthogonalAdaptor, pca_rotation

    dim = embedding_dim(encoder)
    if spec == "pca":
        x = encode_cached(model, texts, cache_dir, encoder=encoder, name="rotation corpus")
        rot = pca_rotation(torch.from_numpy(x))  # [D, D]
    else:
        rot = OrthogonalAdaptor.load(spec).rotation
    if rot.shape != (dim, dim):
        raise ValueError(
            f"init_rotation={spec!r} is {tuple(rot.shape)}; the model embeds in {dim} dims"
        )
    return rot


def finetune(
    model: str | os.PathLike,
    pairs: Sequence[Pair],
    out: str | os.PathLike,
    config: FinetuneConfig | None = None,
    log: Callable[[str], None] = print,
    *,
    rotation_texts: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Fine-tune ``model`` ("default" or a folder) on ``pairs``; save to ``out``; return ``out``.

    ``rotation_texts``: the corpus the "pca" rotation is fitted on (default: the distinct
    positives); ``cache_dir``: where their base embeddings are cached.
    """
    from mrl.text.adaptor import dense_rotation_module

    config = config or FinetuneConfig()
    _check_pairs(pairs, config.batch_size)
    base = resolve_model_path(model)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    encoder = load_encoder(base, device=config.device)
    dim = embedding_dim(encoder)
    rotation = None
    if config.init_rotation is not None:
        texts = rotation_texts or list(dict.fromkeys(p.positive for p in pairs))
        rotation = initial_rotation(model, encoder, config.init_rotation, texts, cache_dir)
        dense = dense_rotation_module(rotation).to(config.device)
        encoder.append(dense)  # last module: y = normalize(pool(h)) @ R
        log(f"finetune: start from rotation {config.init_rotation!r} (Dense {dim} -> {dim})")
    inference_length = encoder.max_seq_length  # restored before saving: training may cut shorter
    encoder.max_seq_length = config.max_seq_length
    nesting = (
        default_nesting(dim) if config.nesting is None else Nesting.parse(config.nesting, dim=dim)
    )
    nesting.check_dim(dim, "the model's embeddings")

    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    t0 = time.time()
    log(f"finetune: {len(pairs)} pairs, {total} steps, nesting {list(nesting.sizes)}")
    if config.train_encoder:
        step = _train_model(encoder, pairs, nesting, config, total, rng, log)
    else:
        feats = _frozen_features(model, pairs, config, cache_dir)
        step = _train_rotation(encoder[-1], feats, nesting, config, total, rng, log)
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


# (queries [B, D], positives [B, D], negatives [B, 1, D] or None) of one batch
_Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def _train_model(
    encoder: Any,
    pairs: Sequence[Pair],
    nesting: Nesting,
    config: FinetuneConfig,
    total: int,
    rng: random.Random,
    log: Callable[[str], None],
) -> int:
    """The whole model (and the rotation layer, if any); returns the number of steps taken."""

    def embed(idx: list[int]) -> _Batch:
        batch = [pairs[i] for i in idx]
        q = _embed(encoder, [p.query for p in batch], config.device)  # [B, D]
        p = _embed(encoder, [p.positive for p in batch], config.device)  # [B, D]
        neg = None
        if batch[0].negative is not None:
            neg = _embed(encoder, [p.negative for p in batch], config.device)[:, None]  # [B,1,D]
        return q, p, neg

    groups = _param_groups(encoder, config)
    return _train_loop(encoder, groups, len(pairs), embed, nesting, config, total, rng, log, 1)


def _train_loop(
    module: Any,
    groups: list[dict[str, Any]],
    n: int,
    embed: Callable[[list[int]], _Batch],
    nesting: Nesting,
    config: FinetuneConfig,
    total: int,
    rng: random.Random,
    log: Callable[[str], None],
    log_every: int,
) -> int:
    """``total`` AdamW steps of the Matryoshka contrastive loss over shuffled batches of the ``n``
    pairs; ``embed(indices)`` gives (queries [B, D], positives [B, D], negatives [B, 1, D] or
    None). Trains ``module``'s parameters; returns the number of steps taken."""
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, config.warmup))
    module.train()
    step, t0 = 0, time.time()
    while step < total:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            if len(idx) < 2 or step >= total:
                continue  # a last batch of one has no negatives
            q, p, neg = embed(idx)
            loss = matryoshka_contrastive_loss(
                q, p, nesting, neg, temperature=config.temperature, symmetric=config.symmetric
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % log_every == 0 or step == total:
                log(f"step {step}/{total} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return step


def _frozen_features(
    model: str | os.PathLike,
    pairs: Sequence[Pair],
    config: FinetuneConfig,
    cache_dir: str | os.PathLike | None,
) -> dict[str, torch.Tensor]:
    """The frozen model's embeddings of the pairs (training max_seq_length), once, cached.

    Returns ``{"query": [P, D], "positive": [P, D]}`` (and ``"negative": [P, D]``).
    """
    columns = {"query": [p.query for p in pairs], "positive": [p.positive for p in pairs]}
    if pairs[0].negative is not None:
        columns["negative"] = [str(p.negative) for p in pairs]
    feats = {}
    for name, texts in columns.items():
        x = encode_cached(model, texts, cache_dir, max_seq_length=config.max_seq_length, name=name)
        feats[name] = torch.from_numpy(x).to(config.device)
    return feats


def _train_rotation(
    dense: Any,
    feats: dict[str, torch.Tensor],
    nesting: Nesting,
    config: FinetuneConfig,
    total: int,
    rng: random.Random,
    log: Callable[[str], None],
) -> int:
    """Only the appended ``dense`` layer, on frozen features; returns the number of steps."""

    def head(x: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, D]
        return dense({"sentence_embedding": x})["sentence_embedding"]

    def embed(idx: list[int]) -> _Batch:
        i = torch.tensor(idx)
        q, p = head(feats["query"][i]), head(feats["positive"][i])  # [B, D] each
        neg = head(feats["negative"][i])[:, None] if "negative" in feats else None
        return q, p, neg

    groups = [{"params": list(dense.parameters()), "lr": config.rotation_lr or config.lr}]
    n = feats["query"].shape[0]
    step = _train_loop(dense, groups, n, embed, nesting, config, total, rng, log, 50)
    dense.eval()
    return step


def load_config_json(path: str | os.PathLike) -> FinetuneConfig:
    return FinetuneConfig(**json.loads(Path(path).read_text()))
