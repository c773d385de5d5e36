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

Self-distillation (``distill > 0``, frozen encoder only): the contrastive loss sees one positive
per query, so it says little about the order of a query's near neighbours, which is what nDCG at
a small prefix needs. The optional term `self_distill_loss` (weight ``distill``) samples corpus
documents as pseudo-queries, each with its K nearest full-size neighbours (base model) plus M
random documents, and asks the prefix cosines of the layer being trained to give the same
softmax distribution over those candidates as a full-size teacher: the frozen base model
(``distill_teacher="base"``) or the model itself, detached (``"self"``). No label is used.

Validation (``val_fraction > 0``): a fixed share of the pairs is held out (the same split for
every seed); after training, each held-out query retrieves its positive among all positives at
every prefix, for the base model and for the result (``validation.json``). This lets a setting be
chosen without any test query (results/cranfield/finetune_select.py does so). Cross-fitting
(``val_fold``): the same fixed permutation is cut into ``round(1 / val_fraction)`` folds and fold
``val_fold`` is held out, so runs over every fold hold out each pair exactly once; fold 0 is the
plain ``val_fraction`` split.
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mrl.config import check_types
from mrl.devices import rank_device
from mrl.distributed import Processes, join
from mrl.io import atomic_output_dir, check_new_output_dir, check_output_path
from mrl.losses import matryoshka_contrastive_loss
from mrl.nesting import Nesting
from mrl.params import check_int, is_int
from mrl.records import save_records
from mrl.text.checkpoint import (
    FinetuneCheckpoint,
    check_finished_out,
    checkpoint_file,
    folder_fingerprint,
    loop_state,
    partial_dir,
    restore_loop,
    texts_digest,
)
from mrl.text.distributed import (
    agree,
    all_reduce_grads,
    all_succeeded,
    broadcast_flag,
    gather_rng,
    gather_rows,
    shares,
)
from mrl.text.encoders import (
    check_max_seq_length,
    count_long,
    embedding_dim,
    encode_cached,
    load_encoder,
    resolve_model_path,
    write_model_nesting,
)
from mrl.text.pairs import Pair

__all__ = [
    "FinetuneConfig",
    "finetune",
    "default_nesting",
    "initial_rotation",
    "self_distill_loss",
    "self_distill_loss_reference",
    "split_pairs",
    "n_folds",
]


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
        lr: peak AdamW learning rate; None (the default): 3e-5 for the whole model, 1e-3 with
            ``train_encoder=False`` (only the rotation layer trains: 3e-5 barely moves it).
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
        distill: weight of the self-distillation term added to the contrastive loss (0 = off;
            needs train_encoder=False): corpus documents as pseudo-queries, their prefix
            cosines follow a full-size ranking (`self_distill_loss`).
        distill_teacher: whose full-size cosines are the target: "base" (the frozen base
            model's, fixed) or "self" (the model being trained, detached).
        distill_batch: pseudo-queries (corpus documents) per step.
        distill_neighbours: K base-model full-size nearest neighbours per pseudo-query.
        distill_negatives: M random corpus documents per step added to every candidate list.
        distill_temperature: softmax temperature of both target and prefix cosines.
        val_fraction: hold out this fraction of the pairs (the same split for every seed),
            train on the rest, and write ``validation.json``: each held-out query retrieves its
            positive among all positives, at every prefix, for the base model and the result.
        val_fold: which of the ``n_folds(val_fraction)`` folds of the fixed permutation is held
            out (cross-fitting; `split_pairs`); 0 = the plain ``val_fraction`` split.
        adapt_steps: after training, fit the orthogonal adaptor (`mrl.text.adaptor`, this many
            steps, seed ``seed``) on the fine-tuned model's own embeddings of the corpus and fold
            it into the last layer (`mrl.text.reorder`): an exact rotation, so full-size
            cosines are unchanged and only the prefixes are re-ordered; 0 = off.
        adapt_pseudo_queries: that adaptor's pseudo-queries: "documents" (the corpus, as in
            `mrl text adapt`) or "queries" (the training pairs' queries, e.g. titles: closer to
            short search queries; held-out pairs are not used).
        adapt_init: that adaptor's starting rotation: "identity" (refine the fine-tuned
            model's own order, which its Matryoshka loss already trained) or "pca" (start again
            from the uncentred PCA of its corpus embeddings, as `mrl text adapt` does for a
            model that was never trained for prefixes).
    """

    nesting: str | None = None
    epochs: int = 1
    batch_size: int = 32
    lr: float | None = None
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
    distill: float = 0.0
    distill_teacher: str = "base"
    distill_batch: int = 256
    distill_neighbours: int = 32
    distill_negatives: int = 256
    distill_temperature: float = 0.05
    val_fraction: float = 0.0
    val_fold: int = 0
    adapt_steps: int = 0
    adapt_pseudo_queries: str = "documents"
    adapt_init: str = "identity"

    def __post_init__(self) -> None:
        check_types(self, "")  # epochs=1.5 or lr=inf failed deep in training, or not at all
        if self.lr is None:
            self.lr = 3e-5 if self.train_encoder else 1e-3
        for name in ("epochs", "batch_size", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size (--batch-size) must be >= 2 (in-batch negatives), got "
                             f"{self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        # seed + 1_000_003 * step + rank seeds torch (< 2**63); 2**64 was torch's "Overflow"
        check_int(self.seed, "seed", minimum=0, maximum=2**40 - 1)
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.rotation_lr is not None and not self.rotation_lr > 0:
            raise ValueError(f"rotation_lr must be > 0 or None, got {self.rotation_lr}")
        if self.rotation_lr is not None and self.init_rotation is None:
            raise ValueError("rotation_lr (--rotation-lr) needs init_rotation (--init-rotation: "
                             "'pca' or an adaptor file)")
        if not self.train_encoder and self.init_rotation is None:
            raise ValueError("train_encoder=False (--freeze-encoder) needs init_rotation "
                             "(--init-rotation: the layer to train)")
        if not self.train_encoder and self.rotation_lr is not None:
            # the layer is all that trains: its rate is lr (rotation_lr won, lr was recorded,
            # ignored, and still refused a resume that changed it)
            raise ValueError("rotation_lr (--rotation-lr) is the Dense layer's rate beside the "
                             "encoder's; with train_encoder=False (--freeze-encoder) only the "
                             "layer trains: give its rate as lr (--lr)")
        spec = self.init_rotation
        if spec is not None and spec != "pca" and not str(spec).endswith((".pt", ".npy")):
            raise ValueError(
                f"init_rotation must be None, 'pca' or an adaptor .pt/.npy file, got {spec!r}"
            )
        self._check_distill()
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        _check_fold(self.val_fold, self.val_fraction, "val_fold")
        if isinstance(self.adapt_steps, bool) or not isinstance(self.adapt_steps, int):
            raise ValueError(f"adapt_steps must be an int >= 0, got {self.adapt_steps!r}")
        if self.adapt_steps < 0:
            raise ValueError(f"adapt_steps must be an int >= 0, got {self.adapt_steps}")
        if self.adapt_pseudo_queries not in ("documents", "queries"):
            raise ValueError(
                "adapt_pseudo_queries must be 'documents' or 'queries', "
                f"got {self.adapt_pseudo_queries!r}"
            )
        if self.adapt_init not in ("identity", "pca"):
            raise ValueError(f"adapt_init must be 'identity' or 'pca', got {self.adapt_init!r}")
        if self.adapt_steps == 0 and (self.adapt_pseudo_queries, self.adapt_init) != (
            "documents",
            "identity",
        ):
            raise ValueError(
                f"adapt_pseudo_queries={self.adapt_pseudo_queries!r} / adapt_init="
                f"{self.adapt_init!r} need adapt_steps > 0 (no re-ordering at adapt_steps=0)"
            )

    def _check_distill(self) -> None:
        if not self.distill >= 0:
            raise ValueError(f"distill must be >= 0, got {self.distill}")
        if self.distill > 0 and self.train_encoder:
            raise ValueError("distill > 0 needs train_encoder=False (--freeze-encoder)")
        if self.distill_teacher not in ("base", "self"):
            raise ValueError(
                f"distill_teacher must be 'base' or 'self', got {self.distill_teacher!r}"
            )
        for name in ("distill_batch", "distill_neighbours"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distill_negatives < 0:
            raise ValueError(f"distill_negatives must be >= 0, got {self.distill_negatives}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")


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


def _parse_nesting(config: FinetuneConfig, dim: int) -> Nesting:
    """``config.nesting`` for a D=``dim`` model; an error names the option and the spec ("dim
    must be >= start, got dim=384 < start=1000" named neither)."""
    try:
        return Nesting.parse(config.nesting, dim=dim)
    except ValueError as exc:
        raise ValueError(f"nesting {config.nesting!r} (--nesting) for this {dim}-dim model: "
                         f"{exc}") from None


def _check_pairs(pairs: Sequence[Pair], batch_size: int) -> None:
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 pairs for in-batch negatives, got {len(pairs)}")
    # the JSONL reader checks its lines; pairs built in Python were trained as given ("" too,
    # and a list negative embedded as its repr)
    for i, pair in enumerate(pairs):
        for name in ("query", "positive", "negative"):
            text = getattr(pair, name)
            if name == "negative" and text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"pairs[{i}].{name} must be a string, got {text!r}")
            if not text.strip():
                raise ValueError(f"pairs[{i}].{name} is empty; empty texts cannot be embedded")
    has_neg = {p.negative is not None for p in pairs}
    if len(has_neg) > 1:
        raise ValueError("either every pair or none must have a negative")


def initial_rotation(
    model: str | os.PathLike,
    encoder: Any,
    spec: str,
    texts: Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    corpus: torch.Tensor | None = None,
) -> torch.Tensor:
    """The starting rotation ``R [D, D]`` (orthogonal; embeddings map as ``x @ R``).

    ``spec`` "pca": uncentred PCA of ``encoder``'s embeddings of ``texts`` (the corpus, encoded at
    the model's own max_seq_length, cached in ``cache_dir``; or ``corpus [N, D]`` when already
    encoded); otherwise an adaptor file path.
    """
    from mrl.text.adaptor import OrthogonalAdaptor, pca_rotation

    dim = embedding_dim(encoder)
    if spec == "pca":
        if corpus is None:
            x = encode_cached(model, texts, cache_dir, encoder=encoder,
                              name="documents of the rotation corpus")
            corpus = torch.from_numpy(x)
        rot = pca_rotation(corpus)  # [D, D]
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
    resume: bool | str = False,
    checkpoint_minutes: float | None = 10.0,
) -> Path:
    """Fine-tune ``model`` ("default" or a folder) on ``pairs``; save to ``out``; return ``out``.

    ``rotation_texts``: the corpus the "pca" rotation is fitted on and the distillation term
    samples from (default: the distinct positives); ``cache_dir``: where their base embeddings
    are cached. ``checkpoint_minutes``: write a checkpoint to ``OUT.partial/`` at each epoch's
    end and at least this often (0: every step; None: none); ``resume``: continue the
    interrupted fine-tune it holds, to the weights an uninterrupted run gives
    (`mrl.text.checkpoint`); ``"auto"``: resume when there is a checkpoint, else start.

    Under torchrun (WORLD_SIZE > 1) every process must call it: it joins the process group and
    the processes share each batch (`mrl.text.distributed`); rank 0 saves, so ``out`` and its
    checkpoint must be on a disk every process sees.
    """
    config = config or FinetuneConfig()
    _check_pairs(pairs, config.batch_size)
    train_idx, val_idx = split_pairs(len(pairs), config.val_fraction, config.val_fold)
    if config.val_fraction > 0 and not val_idx:  # it trained on every pair, without validation
        raise ValueError(
            f"val_fraction={config.val_fraction} holds out no pair of the {len(pairs)} in "
            f"val_fold={config.val_fold} (about {len(pairs) * config.val_fraction:.2f} pairs a "
            "fold); use a larger val_fraction or more pairs"
        )
    if len(train_idx) < 2:
        raise ValueError(
            f"val_fraction={config.val_fraction} (val_fold={config.val_fold}) leaves "
            f"{len(train_idx)} training pairs; need 2"
        )
    check_finished_out(out)
    check_new_output_dir(out, "out")  # before training, not after
    if cache_dir is not None:  # also used after training (validation)
        check_output_path(cache_dir, "cache_dir", "dir", writable=False)  # read-only: encode_cached
    texts = list(rotation_texts or dict.fromkeys(p.positive for p in pairs))
    config, d = _processes(config)
    if not d.main:
        log = _quiet  # one log: rank 0's
    # rank 0 takes the lock and checks the checkpoint; its error (if any) stops every process
    corpus_given = rotation_texts is not None  # else the corpus is the pairs' positives
    ckpt = agree(d, lambda: _enter(_checkpoint(
        out, model, pairs, texts, config, resume, checkpoint_minutes, corpus_given)))  # fmt: skip
    try:
        run = _Run(ckpt, ckpt.saved if ckpt else None, d, checkpoint_minutes is not None)
        resuming = ckpt is not None and ckpt.saved is not None
        if d.on and broadcast_flag(resuming, _collective_device(config)):
            error = None
            if not d.main:  # rank 0 checked it; the others read it too (a shared disk)
                try:
                    run.saved = torch.load(checkpoint_file(out), map_location="cpu",
                                           weights_only=True)  # fmt: skip
                except Exception as exc:  # noqa: BLE001  (raised on every process below)
                    error = exc
            all_succeeded(error, _collective_device(config), "read the checkpoint")
        return _finetune(model, pairs, out, config, log, texts, cache_dir, run)
    finally:
        if ckpt is not None:
            ckpt.__exit__()


def _quiet(message: str) -> None:
    """The log of a process other than rank 0."""


def _enter(ckpt: FinetuneCheckpoint | None) -> FinetuneCheckpoint | None:
    return None if ckpt is None else ckpt.__enter__()


def _collective_device(config: FinetuneConfig) -> torch.device:
    """The device collectives of this run use: the CUDA device with NCCL, else the CPU."""
    return torch.device(config.device)


def _processes(config: FinetuneConfig) -> tuple[FinetuneConfig, Processes]:
    """Join torchrun's processes (if any), as `mrl.train` does; each uses its own GPU
    (`mrl.devices.rank_device`: ``cuda`` -> ``cuda:LOCAL_RANK``)."""
    d = join(config.device.split(":")[0])
    if not d.on:
        return config, d
    if not config.train_encoder:
        raise ValueError(
            "--freeze-encoder trains one layer on cached embeddings (seconds on a CPU): run it "
            "without torchrun (several processes are for the whole model)"
        )
    config = replace(config, device=rank_device(config.device, d.local_rank, d.world_size))
    if config.device.startswith("cuda"):
        torch.cuda.set_device(config.device)  # NCCL collectives use the current device
    return config, d


@dataclass
class _Run:
    """What the training loop needs besides the settings: the checkpoint it writes (rank 0 or a
    single process; None elsewhere or without checkpoints), the state it resumes from (on every
    process), the processes, and whether checkpoints are written at all."""

    ckpt: FinetuneCheckpoint | None = None
    saved: dict[str, Any] | None = None
    d: Processes = field(default_factory=Processes)
    checkpointing: bool = False


def _checkpoint(
    out: str | os.PathLike,
    model: str | os.PathLike,
    pairs: Sequence[Pair],
    texts: Sequence[str],
    config: FinetuneConfig,
    resume: bool | str,
    minutes: float | None,
    corpus_given: bool = True,
) -> FinetuneCheckpoint | None:
    """The run's checkpoint (None: ``minutes`` is None), identified by everything that shapes
    the result: the settings but the device, the base model, the pairs and the corpus."""
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    if minutes is None:
        if resume is True:
            raise ValueError("resume=True needs checkpoints (checkpoint_minutes is None)")
        if checkpoint_file(out).is_file():  # it was ignored, and later called this run's leftover
            raise FileExistsError(
                f"{str(partial_dir(out))!r} holds the checkpoint of an interrupted fine-tune; "
                "checkpoint_minutes=None neither resumes nor replaces it: give checkpoint_minutes "
                "(with resume=True or 'auto') to continue it, or remove that folder")
        return None
    if resume == "auto":  # scripts that rerun after a stop: continue if there is a checkpoint
        resume = checkpoint_file(out).is_file()
    settings = {k: v for k, v in asdict(config).items() if k != "device"}
    if settings["init_rotation"] not in (None, "pca"):  # a file: its contents, not its spelling
        settings["init_rotation"] = folder_fingerprint(settings["init_rotation"])
    identity = {
        "settings": settings,
        "base_model": folder_fingerprint(resolve_model_path(model)),
        "pairs": texts_digest((p.query, p.positive, p.negative) for p in pairs),
        # the corpus, when given apart from the pairs (else it is their positives: "pairs")
        "corpus": texts_digest([t] for t in texts) if corpus_given else None,
    }
    return FinetuneCheckpoint(out, identity, resume, minutes)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps of one pass over ``n`` pairs: a last batch of one pair has no negative and is
    skipped (9 pairs in batches of 4: 2 steps)."""
    full, rest = divmod(n, batch_size)
    return full + (rest >= 2)


def _finetune(
    model: str | os.PathLike,
    pairs: Sequence[Pair],
    out: str | os.PathLike,
    config: FinetuneConfig,
    log: Callable[[str], None],
    texts: Sequence[str],
    cache_dir: str | os.PathLike | None,
    run: _Run,
) -> Path:
    """`finetune` after its checks, with the checkpoint (if any) locked."""
    train_idx, val_idx = split_pairs(len(pairs), config.val_fraction, config.val_fold)
    torch.manual_seed(config.seed + run.d.rank)  # rank 0's dropout = a single process's
    rng = random.Random(config.seed)  # the same batches on every process
    encoder, corpus = _load_with_rotation(model, texts, config, cache_dir, log)
    if run.d.on:  # every process starts from rank 0's weights
        for t in encoder.state_dict().values():
            torch.distributed.broadcast(t, 0)
    dim = embedding_dim(encoder)
    inference_length = encoder.max_seq_length  # restored before saving: training may cut shorter
    encoder.max_seq_length = config.max_seq_length
    nesting = default_nesting(dim) if config.nesting is None else _parse_nesting(config, dim)
    nesting.check_dim(dim, "the model's embeddings")

    total = steps_per_epoch(len(train_idx), config.batch_size) * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    t0 = time.time()
    log(
        f"finetune: {len(train_idx)} training pairs (+ {len(val_idx)} held out), {total} steps, "
        f"nesting {list(nesting.sizes)}"
    )
    feats = None  # frozen base features of the pairs (rotation-only training)
    if run.d.on:
        log(f"finetune: {run.d.world_size} processes share each batch of {config.batch_size} pairs")
    if run.ckpt is not None and run.saved is not None:
        log(f"finetune: resumed from {run.ckpt.path} (step {run.saved['step']})")
    elif run.ckpt is not None:
        every = "" if run.ckpt.minutes == 0 else f" and every {run.ckpt.minutes:g} min"
        when = "after every step" if run.ckpt.minutes == 0 else f"at each epoch's end{every}"
        log(f"finetune: checkpoints go to {run.ckpt.path} ({when})")
    if config.train_encoder:
        train = [pairs[i] for i in train_idx]
        step = _train_model(encoder, train, nesting, config, total, rng, log, run)
        if not run.d.main:
            return Path(out)  # rank 0 validates and saves the model
    else:
        feats = _frozen_features(model, pairs, config, cache_dir)
        train_feats = {k: v[torch.tensor(train_idx)] for k, v in feats.items()}
        distill = None
        if config.distill > 0:
            assert corpus is not None
            distill = _DistillTerm(encoder[-1], corpus.to(config.device), nesting, config)
        step = _train_rotation(
            encoder[-1], train_feats, nesting, config, total, rng, log, distill, run
        )
    encoder.eval()
    reorder = None
    if config.adapt_steps > 0:
        encoder.max_seq_length = inference_length  # texts as the model will embed them
        queries = None  # the pseudo-queries, when not the documents: training queries only
        if config.adapt_pseudo_queries == "queries":
            queries = [pairs[i].query for i in train_idx]
        reorder = _reorder(model, encoder, texts, corpus, queries, nesting, config, log, cache_dir)
        encoder.max_seq_length = config.max_seq_length
    validation = None
    if val_idx:
        validation = _validate(model, encoder, pairs, val_idx, feats, nesting, config, cache_dir)
    encoder.max_seq_length = inference_length
    info = {"base_model": str(model), "pairs": len(train_idx), "held_out_pairs": len(val_idx),
            "steps": step, "config": asdict(config),
            # what the base model is (its bytes), not its path: `mrl text compare` reuses the
            # base's embeddings for a frozen-encoder fine-tune only when they are this model's
            "base_fingerprint": folder_fingerprint(resolve_model_path(model))}  # fmt: skip
    if reorder is not None:
        info["reorder"] = reorder
    if run.d.on:
        info["processes"] = run.d.world_size
    out = _save_finetuned(out, encoder, nesting, validation, info)
    if run.ckpt is not None:
        run.ckpt.finish()
    if validation is not None:
        log("validation (held-out pairs):\n" + _validation_table(validation, nesting))
    log(f"saved {out} ({time.time() - t0:.0f}s)")
    return out


def _load_with_rotation(model, texts, config: FinetuneConfig, cache_dir, log):
    """The base model with the initial rotation appended as its last module (when asked), and
    the base embeddings of ``texts`` [N, D] when the PCA fit, the distillation or a frozen
    reorder needs them (else None)."""
    from mrl.text.adaptor import dense_rotation_module

    encoder = load_encoder(resolve_model_path(model), device=config.device)
    check_max_seq_length(encoder, config.max_seq_length)  # before any encoding or training
    dim = embedding_dim(encoder)
    corpus = None
    reorder_frozen = config.adapt_steps > 0 and not config.train_encoder
    if config.init_rotation == "pca" or config.distill > 0 or reorder_frozen:
        corpus = torch.from_numpy(
            encode_cached(model, texts, cache_dir, encoder=encoder,
                          name="documents of the rotation corpus")
        )
    if config.init_rotation is not None:
        rotation = initial_rotation(
            model, encoder, config.init_rotation, texts, cache_dir, corpus=corpus
        )
        encoder.append(dense_rotation_module(rotation).to(config.device))  # y = pool(h) @ R
        log(f"finetune: start from rotation {config.init_rotation!r} (Dense {dim} -> {dim})")
    return encoder, corpus


def _save_finetuned(out, encoder, nesting: Nesting, validation, info: dict) -> Path:
    """Write the model folder atomically: it appears complete or not at all."""
    out = check_new_output_dir(out, "out")
    with atomic_output_dir(out) as tmp:
        encoder.save(str(tmp), create_model_card=False)
        if validation is not None:
            save_records(tmp / "validation.json", validation)
        write_model_nesting(tmp, nesting, kind="finetune", **info)
    return out


def _reorder(
    model: str | os.PathLike,
    encoder: Any,
    texts: Sequence[str],
    corpus: torch.Tensor | None,
    queries: Sequence[str] | None,
    nesting: Nesting,
    config: FinetuneConfig,
    log: Callable[[str], None],
    cache_dir: str | os.PathLike | None,
) -> dict[str, Any]:
    """``adapt_steps``: the post-hoc rotation of `mrl.text.reorder`, folded into ``encoder``.

    ``corpus [N, D]``: the base model's embeddings of ``texts`` (needed for a frozen encoder);
    ``queries``: the training queries as pseudo-queries (None: the documents).
    """
    from mrl.text.reorder import reorder_model

    frozen = not config.train_encoder
    own = _own_embeddings(encoder, texts, corpus if frozen else None, "corpus (re-order)")
    own_q = None
    if queries is not None:
        base_q = None
        if frozen:  # the base model's (cached, at its own length), then the trained layer
            base_q = torch.from_numpy(encode_cached(model, queries, cache_dir, name="queries"))
        own_q = _own_embeddings(encoder, queries, base_q, "training queries (re-order)")
    return reorder_model(
        encoder, own, nesting, config.adapt_steps, config.seed, log, own_q, config.adapt_init
    )


def _own_embeddings(
    encoder: Any, texts: Sequence[str], base: torch.Tensor | None, name: str
) -> torch.Tensor:
    """``[N, D]``: the trained model's embeddings of ``texts``, at its current max_seq_length.

    ``base [N, D]``: the frozen base model's embeddings of them (frozen encoder): passed through
    the trained last layer, no re-encoding; None: ``encoder`` encodes the texts now.
    """
    from mrl.text.encoders import encode

    if base is None:
        return torch.from_numpy(encode(encoder, list(texts), name=name))
    dense = encoder[-1]
    with torch.no_grad():
        return _head_fn(dense)(base.to(next(dense.parameters()).device)).detach().cpu()


def n_folds(fraction: float) -> int:
    """Folds of the cross-fitting split for a held-out ``fraction``: ``round(1 / fraction)``, >= 2.

    0 (no validation) has the single fold 0.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    return 1 if fraction == 0 else max(2, round(1 / fraction))


def _check_fold(fold: int, fraction: float, name: str = "fold") -> None:
    k = n_folds(fraction)
    if not is_int(fold) or not 0 <= fold < k:
        raise ValueError(
            f"{name} must be an int in [0, {k}) for val_fraction={fraction} ({k} folds), "
            f"got {fold!r}"
        )


def split_pairs(n: int, fraction: float, fold: int = 0) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` indices of ``n`` pairs, held out: fold ``fold`` of a fixed permutation.

    The permutation uses its own fixed seed (not the training seed), so runs with different
    seeds hold out the same pairs and their validation numbers are comparable. It is cut at
    ``round(n * k * fraction)`` for k = 1 .. n_folds(fraction) - 1 (the last fold takes the
    rest): fold 0 is the first ``round(n * fraction)`` pairs of the permutation, and the folds
    are disjoint and cover all n pairs, so running every fold holds out each pair once.
    """
    _check_fold(fold, fraction)
    order = list(range(n))
    random.Random(_SPLIT_SEED).shuffle(order)
    k = n_folds(fraction)
    start = int(round(n * fold * fraction))
    stop = n if fold == k - 1 and fraction > 0 else int(round(n * (fold + 1) * fraction))
    held = sorted(order[start:stop])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


_SPLIT_SEED = 20221206  # fixed: the validation split is the same for every training seed


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
    run: _Run | None = None,
) -> int:
    """The whole model (and the rotation layer, if any); returns the number of steps taken.
    Under torchrun each process embeds its share of a batch (`mrl.text.distributed`)."""
    run = run or _Run()
    texts = list(dict.fromkeys(t for p in pairs for t in (p.query, p.positive, p.negative) if t))
    long = count_long(encoder, texts)  # encoder.max_seq_length is the training length here
    if long:
        log(f"finetune: {long} of {len(texts)} training texts exceed max_seq_length="
            f"{encoder.max_seq_length} tokens and are truncated to it while training")

    d, dim = run.d, embedding_dim(encoder)

    def column(batch: list[Pair], name: str, sizes: list[int] | None) -> torch.Tensor:
        """[B, D]: one text column of the batch; under torchrun, this process's share of it
        (with gradient) joined with the other processes' (detached)."""
        texts = [getattr(p, name) for p in batch]
        if sizes is None:
            return _embed(encoder, texts, config.device)
        # float32 on every process (an empty share has no model dtype to copy; bf16 / fp16
        # rows would not match it): the loss computes its cosines in float32 anyway
        mine = (_embed(encoder, texts, config.device).float() if texts else
                torch.zeros(0, dim, device=config.device))  # fmt: skip
        return gather_rows(mine, sizes, d.rank)

    def embed(idx: list[int]) -> _Batch:
        sizes = None
        if d.on:
            parts = shares(idx, d.world_size)
            sizes, idx = [len(x) for x in parts], parts[d.rank]
        batch = [pairs[i] for i in idx]
        q, p = column(batch, "query", sizes), column(batch, "positive", sizes)  # [B, D]
        neg = None
        if pairs[0].negative is not None:
            neg = column(batch, "negative", sizes)[:, None]  # [B, 1, D]
        return q, p, neg

    groups = _param_groups(encoder, config)
    return _train_loop(
        encoder, groups, len(pairs), embed, nesting, config, total, rng, log, 1, run=run
    )


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
    extra: _DistillTerm | None = None,
    run: _Run | None = None,
) -> int:
    """``total`` AdamW steps of the Matryoshka contrastive loss over shuffled batches of the ``n``
    pairs; ``embed(indices)`` gives (queries [B, D], positives [B, D], negatives [B, 1, D] or
    None); ``extra()`` (if any) is a term added with weight ``config.distill``. Trains
    ``module``'s parameters; returns the number of steps taken. ``run``: the state to resume
    from (if any), the checkpoint to write (`mrl.text.checkpoint`), torchrun's processes."""
    run = run or _Run()
    opt = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, config.warmup))
    generator = None if extra is None else extra.generator
    step, order, start = 0, [], n  # start = n: the next step shuffles a new epoch
    if run.saved is not None:
        step, order, start = restore_loop(run.saved, module, opt, sched, rng, generator)
        _restore_rank_rng(run, config, step, log)
        run.saved = None  # restored: its tensors need not stay in memory for the whole run
    module.train()
    t0 = time.time()
    while step < total:
        if n - start < 2:  # this epoch has no batch of two left (a last batch of one has no
            order = list(range(n))  # negatives): the next one
            rng.shuffle(order)
            start = 0
        idx = order[start : start + config.batch_size]  # two or more pairs
        start += config.batch_size
        q, p, neg = embed(idx)
        if step > 0:  # trained weights can be finite yet overflow the forward pass
            _check_finite_embeddings(step, q, p, neg)
        loss = matryoshka_contrastive_loss(  # after step 0 the embeddings were checked above
            q, p, nesting, neg, temperature=config.temperature, symmetric=config.symmetric,
            check_finite=step == 0,
        )
        extra_value = None
        if extra is not None:
            extra_value = extra()
            loss = loss + config.distill * extra_value
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:  # under torchrun a process with no share this step has none
            loss.backward()
        if run.d.on:
            all_reduce_grads(module.parameters())  # the shares' parts: the full gradient
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        _check_finite_weights(module, step, loss, run)  # before anything of this step is saved
        if step % log_every == 0 or step == total:
            part = "" if extra_value is None else f" (distill {extra_value.item():.4f})"
            log(f"step {step}/{total} loss {loss.item():.4f}{part} ({time.time() - t0:.0f}s)")
        if run.checkpointing:
            _maybe_save(run, module, opt, sched, rng, generator, step, order, start,
                        epoch_end=n - start < 2, last=step == total,
                        device=_collective_device(config))  # fmt: skip
    return step


def _check_finite_embeddings(step: int, *tensors: torch.Tensor | None) -> None:
    """After step ``step``, the model's embeddings of the next batch are finite; otherwise the
    training diverged (the loss blamed the input: "queries contain NaN or inf values")."""
    if all(t is None or bool(torch.isfinite(t).all()) for t in tensors):
        return
    from mrl.train import TrainingDiverged

    raise TrainingDiverged(
        f"training diverged after step {step}: the model's embeddings are no longer finite; "
        "its last checkpoint (if any) is kept. Train again into a new --out with a lower --lr"
    )


def _check_finite_weights(module: Any, step: int, loss: torch.Tensor, run: _Run) -> None:
    """Stop when a step left a trained weight NaN or inf (a NaN loss gets there through its
    gradient): such a model was saved and the run exited 0. Under torchrun every process applies
    the same all-reduced update, so each sees the same weights and all stop together. Raised
    before the step's checkpoint and the model are written: the last checkpoint stays good.
    The vision loop's check (`mrl.train.finite_state`: one reduction, one host sync)."""
    from mrl.train import TrainingDiverged, finite_state

    if bool(finite_state(module).item()):
        return

    kept = "its last checkpoint is kept" if run.ckpt is not None else "nothing was saved"
    raise TrainingDiverged(
        f"training diverged at step {step} (loss {loss.item():.4g}): the trained weights are no "
        f"longer finite; {kept}. Train again into a new --out with a lower --lr (lr, "
        "rotation_lr) or more warm-up (FinetuneConfig.warmup)"
    )


def _maybe_save(run: _Run, module, opt, sched, rng, generator, step: int, order: list[int],
                start: int, *, epoch_end: bool, last: bool, device: torch.device) -> None:
    """Write the checkpoint when due; under torchrun rank 0's clock decides for every process,
    and the checkpoint holds every process's torch RNG state (dropout)."""
    due = run.ckpt is not None and run.ckpt.due(epoch_end=epoch_end, last=last)
    if run.d.on:
        due = broadcast_flag(due, device)
    if not due:
        return
    ranks = gather_rng(run.d, device) if run.d.on else None
    if run.ckpt is not None:
        state = loop_state(module, opt, sched, rng, generator, step, order, start)
        if ranks is not None:
            state["torch_rng_ranks"], state["cuda_rng_ranks"] = ranks["cpu"], ranks["cuda"]
        run.ckpt.save(state)


def _restore_rank_rng(run: _Run, config: FinetuneConfig, step: int, log) -> None:
    """Each process's own dropout streams (CPU and its GPU) from a torchrun checkpoint. With
    another number of processes than the checkpoint's, the saved streams do not map onto these
    processes: each is re-seeded from (seed, step, rank) instead, and the log says so."""
    assert run.saved is not None
    cpu, cuda = run.saved.get("torch_rng_ranks"), run.saved.get("cuda_rng_ranks")
    saved_world = 1 if cpu is None else len(cpu)
    if saved_world != run.d.world_size:
        torch.manual_seed(config.seed + 1_000_003 * step + run.d.rank)  # CPU and every GPU
        log(f"finetune: the checkpoint was written by {saved_world} process(es), resumed by "
            f"{run.d.world_size}: each process's dropout stream is re-seeded (training "
            "continues, but not bit for bit as an uninterrupted run)")  # fmt: skip
        return
    if cpu is not None:  # torchrun, same processes: this rank's own streams
        torch.set_rng_state(cpu[run.d.rank])
        device = torch.device(config.device)
        if cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda[run.d.rank], device)


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
    distill: _DistillTerm | None = None,
    run: _Run | None = None,
) -> int:
    """Only the appended ``dense`` layer, on frozen features; returns the number of steps."""
    head = _head_fn(dense)

    def embed(idx: list[int]) -> _Batch:
        i = torch.tensor(idx)
        q, p = head(feats["query"][i]), head(feats["positive"][i])  # [B, D] each
        neg = head(feats["negative"][i])[:, None] if "negative" in feats else None
        return q, p, neg

    groups = [{"params": list(dense.parameters()), "lr": config.lr}]  # only the layer trains
    n = feats["query"].shape[0]
    step = _train_loop(
        dense, groups, n, embed, nesting, config, total, rng, log, 50, distill, run
    )
    dense.eval()
    return step


def _head_fn(dense: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The appended sentence-transformers ``Dense`` layer as a plain ``[B, D] -> [B, D]`` map."""

    def head(x: torch.Tensor) -> torch.Tensor:
        return dense({"sentence_embedding": x})["sentence_embedding"]

    return head


# ---------------------------------------------------------------------- self-distillation
def _check_distill_inputs(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queries: torch.Tensor,
    candidates: torch.Tensor,
    nesting: Nesting,
    temperature: float,
) -> torch.Tensor:
    """Validates the arguments of `self_distill_loss`; returns the mask ``[B, K]`` of self-pairs."""
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"student and teacher must be 2-D [U, D], got shapes {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(
            f"teacher must have the student's {student.shape[0]} rows, got {teacher.shape[0]}"
        )
    nesting.check_dim(student.shape[1], "the student's")
    if queries.dim() != 1 or candidates.dim() != 2 or candidates.shape[0] != queries.shape[0]:
        raise ValueError(
            f"queries must be [B] and candidates [B, K], got shapes {tuple(queries.shape)} "
            f"and {tuple(candidates.shape)}"
        )
    u = student.shape[0]
    for name, idx in (("queries", queries), ("candidates", candidates)):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= u):
            raise ValueError(f"{name} must index the {u} rows, got values outside [0, {u})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = candidates == queries[:, None]  # [B, K]: a candidate that is its own query
    if candidates.shape[1] == 0 or bool(mask.all(-1).any()):
        row = 0 if candidates.shape[1] == 0 else int(mask.all(-1).nonzero()[0])
        raise ValueError(f"candidates: query row {row} has no candidate other than itself")
    return mask


def self_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queries: torch.Tensor,
    candidates: torch.Tensor,
    nesting: Nesting,
    temperature: float = 0.05,
) -> torch.Tensor:
    """Prefix rankings follow a full-size ranking: a listwise KL, summed over prefixes.

    ``sum_g w_g mean_b KL(softmax(cos_T(q_b, c_bk) / tau) || softmax(cos_S,m_g(q_b, c_bk) / tau))``
    over the candidates k of each pseudo-query b (a candidate equal to its query is left out).
    ``cos_T`` is the teacher's full-size cosine, ``cos_S,m`` the student's cosine at prefix m
    (re-normalised). Matching distributions over near neighbours keeps their order, which is
    what nDCG at a prefix needs; the contrastive loss only sees one positive per query.

    Args:
        student: rows being trained ``[U, D]`` (D = nesting.dim).
        teacher: the same rows' target embeddings ``[U, Dt]`` (e.g. the frozen base model's).
        queries: row indices ``[B]`` of the pseudo-queries.
        candidates: row indices ``[B, K]`` of each pseudo-query's candidates.

    Fast path: per prefix one ``[B, m] x [m, U]`` product and a gather
    (`mrl.text.adaptor.prefix_cosine_rows`), never a ``[B, K, D]`` copy;
    `self_distill_loss_reference` is the plain loop it is tested against.
    """
    from mrl.text.adaptor import listwise_prefix_loss, prefix_cosine_rows

    mask = _check_distill_inputs(student, teacher, queries, candidates, nesting, temperature)
    tn = F.normalize(teacher, dim=-1)  # [U, Dt]
    full = (tn[queries] @ tn.T).gather(1, candidates)  # [B, K]
    pre = prefix_cosine_rows(student, queries, candidates, nesting)  # [G, B, K]
    return listwise_prefix_loss(full, pre, nesting, temperature, temperature, mask)


def self_distill_loss_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queries: torch.Tensor,
    candidates: torch.Tensor,
    nesting: Nesting,
    temperature: float = 0.05,
) -> torch.Tensor:
    """`self_distill_loss` as a loop over prefixes and pseudo-queries (for tests)."""
    _check_distill_inputs(student, teacher, queries, candidates, nesting, temperature)
    total = student.new_zeros(())
    for m, w in zip(nesting.sizes, nesting.weights):
        terms = []
        for b in range(queries.shape[0]):
            q = int(queries[b])
            keep = [int(c) for c in candidates[b] if int(c) != q]
            t = F.cosine_similarity(teacher[q][None], teacher[keep], dim=-1)  # [K']
            s = F.cosine_similarity(student[q, :m][None], student[keep, :m], dim=-1)  # [K']
            p = torch.softmax(t / temperature, dim=0)
            terms.append((p * (p.log() - torch.log_softmax(s / temperature, dim=0))).sum())
        total = total + w * torch.stack(terms).mean()
    return total


class _DistillTerm:
    """One step's `self_distill_loss` on a fresh sample of the corpus (call it).

    ``corpus [N, D]``: the frozen base model's embeddings. Each call: B pseudo-queries, each with
    its K full-size base neighbours plus M random documents (shared by the batch) as candidates;
    only the U distinct rows involved go through the layer being trained. ``generator`` draws
    the samples (a checkpoint saves its state).
    """

    def __init__(
        self, dense: Any, corpus: torch.Tensor, nesting: Nesting, config: FinetuneConfig
    ) -> None:
        from mrl.text.adaptor import full_neighbours

        n = corpus.shape[0]
        if n < 3:
            raise ValueError(f"distill needs a corpus of at least 3 documents, got {n}")
        used = {"distill_neighbours": (config.distill_neighbours, n - 1),
                "distill_batch": (config.distill_batch, n)}  # what the sampler can take
        for name, (given, most) in used.items():
            if given > most:  # mrl.json records the given value: say what ran
                warnings.warn(f"{name}={given} is more than this corpus of {n} documents allows: "
                              f"{most} are used", stacklevel=2)
        self.nbrs = full_neighbours(corpus, min(*used["distill_neighbours"]))  # [N, K]
        self.generator = torch.Generator().manual_seed(config.seed)
        self.head = _head_fn(dense)
        self.corpus, self.nesting, self.config = corpus, nesting, config

    def __call__(self) -> torch.Tensor:
        from mrl.text.adaptor import sample_candidates

        c = self.config
        _, _, rows, inv = sample_candidates(
            self.nbrs, c.distill_batch, c.distill_negatives, self.generator
        )  # rows [U], inv [B, 1 + K + M]
        x = self.corpus[rows]  # [U, D] base embeddings
        y = self.head(x)  # [U, D] the model being trained
        teacher = x if c.distill_teacher == "base" else y.detach()
        return self_distill_loss(
            y, teacher, inv[:, 0], inv[:, 1:], self.nesting, c.distill_temperature
        )


# ---------------------------------------------------------------------- validation
def _validate(
    model: str | os.PathLike,
    encoder: Any,
    pairs: Sequence[Pair],
    val_idx: list[int],
    feats: dict[str, torch.Tensor] | None,
    nesting: Nesting,
    config: FinetuneConfig,
    cache_dir: str | os.PathLike | None,
) -> list[dict[str, Any]]:
    """Held-out queries retrieve their own positive among all the pairs' positives.

    Records (method ``base``: the base model; ``finetune``: the result) of nDCG@k, recall@k
    and MRR at every prefix (k = 10, or the number of pairs if smaller), all at the training
    max_seq_length. Uses no test data.
    """
    from mrl.evaluate import evaluate_ranking
    from mrl.text.encoders import encode

    if feats is None:  # whole model: the base from the cache, the result encoded now
        feats = _frozen_features(model, pairs, config, cache_dir)
        queries = [pairs[i].query for i in val_idx]
        positives = [p.positive for p in pairs]
        q_ft = torch.from_numpy(encode(encoder, queries, name="held-out queries"))
        d_ft = torch.from_numpy(encode(encoder, positives, name="positives"))
    else:  # frozen encoder: the result is the base features through the trained layer
        with torch.no_grad():
            head = _head_fn(encoder[-1])
            q_ft, d_ft = head(feats["query"][torch.tensor(val_idx)]), head(feats["positive"])
    qrels = {i: {j: 1.0} for i, j in enumerate(val_idx)}  # held-out query i -> positive j
    q_base = feats["query"][torch.tensor(val_idx)]
    k = min(10, len(pairs))  # nDCG@10 unless there are fewer positives
    records = []
    for method, q, d in (("base", q_base, feats["positive"]), ("finetune", q_ft, d_ft)):
        records += evaluate_ranking(
            q.detach().cpu().numpy(),
            d.detach().cpu().numpy(),
            qrels,
            nesting,
            method=method,
            ks=(k,),
            seed=config.seed,
            context={"split": "validation"},
        )
    return records


def _validation_table(records: Sequence[dict[str, Any]], nesting: Nesting) -> str:
    """nDCG@k per prefix of both methods, plus the result's share of its own full size."""
    metric = next(r["metric"] for r in records if r["metric"].startswith("ndcg@"))
    vals = {(r["method"], r["prefix"]): r["value"] for r in records if r["metric"] == metric}
    rows = [f"{metric:9}" + " ".join(f"{m:>6}" for m in nesting.sizes)]
    for method in ("base", "finetune"):
        rows.append(f"{method:9}" + " ".join(f"{vals[method, m]:6.4f}" for m in nesting.sizes))
    full = vals["finetune", nesting.dim]  # 0 (nothing found at full size): no share, blank
    rows.append("ft/own   " + " ".join(
        f"{vals['finetune', m] / full:6.1%}" if full else f"{'':>6}" for m in nesting.sizes))
    return "\n".join(rows)


def load_config_json(path: str | os.PathLike) -> FinetuneConfig:
    return FinetuneConfig(**json.loads(Path(path).read_text()))
