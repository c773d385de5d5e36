"""One training loop for every mode: ``mrl``, ``mrl-e``, ``ff`` and ``plain``.

The mode only changes the head (`mrl.heads.make_head`); the encoder, data order, augmentation,
optimizer and schedule are identical, and the encoder's initial weights depend only on the seed, so
methods compared with the same recipe start from the same network.

Each epoch is a pure function of ``(seed, epoch)`` (see `mrl.data.tensors`), and the checkpoint
written atomically at the end of every epoch holds the model, optimizer, scheduler and RNG states.
Resuming an interrupted run therefore ends with exactly the weights of an uninterrupted one.

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
`DistributedDataParallel` (NCCL on CUDA, gloo on CPU); every process draws the same global batch
and takes its slice, so the run matches one process with the same global batch (up to float
summation order; BatchNorm statistics are per process unless ``model.norm`` is group/none, which
the cnn and mlp encoders offer).

Run directory: ``checkpoint.pt`` (latest epoch), ``config.json``, ``metrics.jsonl`` (one JSON
object per epoch). The checkpoint also keeps the epochs' records (``history``): metrics.jsonl is
rewritten from them, so a kill between the two writes loses no line and a resume repeats none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mrl.config import TrainConfig, config_from_dict
from mrl.data import Task, augment, iterate_batches, load_task_for
from mrl.data.tensors import ImageTensors
from mrl.distributed import Processes, join
from mrl.io import atomic_torch_save, atomic_write_json, atomic_write_text, exclusive_lock, fcntl
from mrl.models import MatryoshkaClassifier, Normalize, build_encoder
from mrl.nesting import Nesting

__all__ = [
    "CHECKPOINT",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "check_same_recipe",
    "load_run",
    "predict",
    "recipe_differences",
    "train",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FORMAT = 1


# --------------------------------------------------------------------------- building blocks
def build_model(
    config: TrainConfig,
    in_channels: int,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    image_shape: tuple[int, int] | None = None,
) -> MatryoshkaClassifier:
    """Encoder (initialised from ``seed`` alone) + the mode's head (from a seed of its own).

    ``image_shape`` ``(H, W)``: needed by encoders whose size depends on it (``mlp``).
    """
    from mrl.heads import make_head

    m = config.model
    torch.manual_seed(config.seed)
    encoder = build_encoder(m.name, m.dim, in_channels, **m.encoder_options(image_shape))
    torch.manual_seed(config.seed + 7919)  # head init independent of the encoder's size
    nesting = m.get_nesting()
    head = make_head(m.mode, nesting, num_classes, ff_dim=m.ff_dim)
    return MatryoshkaClassifier(encoder, head, Normalize(mean, std))


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD (nesterov); no weight decay on biases and norm scales (1-D parameters)."""
    o = config.optim
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): warm-up, schedule."""
    o = config.optim
    total = config.epochs * steps_per_epoch
    warm = int(round(o.warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "step":
        return o.gamma ** (step // (o.step_epochs * steps_per_epoch))
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config, step, steps_per_epoch)
    )


def _device(config: TrainConfig, local_rank: int, world_size: int = 1) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    from mrl.devices import check_device, rank_device

    return torch.device(check_device(rank_device(config.device, local_rank, world_size), "device"))


def _memory_format(config: TrainConfig, device: torch.device) -> torch.memory_format:
    """channels_last for ResNets on CUDA (cuDNN's fastest convolutions read NHWC, on tensor
    cores); the default layout elsewhere: on CPU it gained nothing and made DDP warn about
    gradient strides."""
    if device.type == "cuda" and config.model.name.startswith("resnet"):
        return torch.channels_last
    return torch.contiguous_format


def _clock(device: torch.device) -> float:
    """`time.perf_counter` once the device's queued work is done: CUDA runs asynchronously, so
    without the wait an epoch's time would be that of queueing it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _check_compatible(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """A resumed run must have the same model (architecture, nesting, head) and dataset. Keys
    the saved config lacks (added to `TrainConfig` later) are not compared, as in
    `recipe_differences` (they raised a KeyError)."""
    old = _canonical(saved["config"])
    new = _canonical(config.to_dict())
    old_model = old.get("model", {})
    diffs = [
        f"model.{k}: checkpoint {old_model[k]!r} vs config {new['model'][k]!r}"
        for k in new["model"]
        if k in old_model and old_model[k] != new["model"][k]
    ]
    old_data = old.get("data", {}).get("dataset", new["data"]["dataset"])
    if old_data != new["data"]["dataset"]:
        diffs.append(
            f"data.dataset: checkpoint {old_data!r} vs config {new['data']['dataset']!r}"
        )
    if diffs:
        raise ValueError(
            f"checkpoint {path} was trained with another model or nesting; "
            "cannot resume: " + "; ".join(diffs)
        )
    if config.epochs < saved["epoch"]:
        raise ValueError(
            f"epochs={config.epochs} is less than the {saved['epoch']} epochs already "
            f"done in {path}"
        )
    recipe = recipe_differences(old, config)
    if recipe:
        raise ValueError(
            f"checkpoint {path} was trained with another recipe; resuming it with these settings "
            "would not reproduce an uninterrupted run: " + "; ".join(recipe)
            + " (use the same settings, or train into another --out)"
        )


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _check_batchnorm_batch(model: nn.Module, batch_size: int, world_size: int) -> None:
    """BatchNorm in training needs at least 2 items per process (one item has no batch
    statistics: BatchNorm1d and a 1x1 feature map fail on the first step, after config.json was
    written, with torch's "Expected more than 1 value per channel"). Refused before anything."""
    if batch_size // world_size < 2 and _has_batchnorm(model):
        raise ValueError(
            f"batch_size={batch_size} gives {batch_size // world_size} item(s) per process "
            f"({world_size} process(es)); the model has BatchNorm, which needs at least 2 per "
            "process in training: use a larger batch_size, or model.norm='group' (cnn, mlp)"
        )


def _check_processes(saved: dict[str, Any], model: nn.Module, world_size: int,
                     path: Path) -> None:
    """With BatchNorm, each process normalises its own share of the batch: a run resumed with
    another number of processes would not equal an uninterrupted one (refused). Without it the
    processes' gradients are averaged into the same step (allowed). Checkpoints written before
    the count was saved are not checked."""
    was = saved.get("world_size")
    if was is None or was == world_size or not _has_batchnorm(model):
        return
    raise ValueError(
        f"checkpoint {path} was trained by {was} process(es), this run has {world_size}: with "
        "BatchNorm (statistics per process) the resumed run would not equal an uninterrupted "
        f"one; resume with {was} (torchrun --nproc_per_node {was}), or train into another --out"
    )


# Keys that do not change the training trajectory: where the data lives, where it runs, and
# what is logged. Everything else of a saved config must match for a run to be resumed or reused.
_NOT_RECIPE = {"data.root", "device", "eval_batch_size", "eval_test"}


def _canonical(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict whose ``model.nesting`` is the list of sizes it means, so that
    'doubling:2' and '2,4,8,16' (same sizes) compare equal."""
    model = config.get("model")
    if not isinstance(model, dict) or "nesting" not in model:
        return config
    for dim in (model.get("dim"), None):  # an explicit list parses even against another dim
        try:
            sizes = list(Nesting.parse(model["nesting"], dim=dim).sizes)
        except (ValueError, TypeError):
            continue
        out = {**model, "nesting": sizes}
        weights = model.get("nesting_weights")
        if isinstance(weights, list) and len(weights) == len(sizes) and all(
                w == 1 for w in weights):  # the default weights, written out: the same model
            out["nesting_weights"] = None  # (a key the saved config lacks stays absent)
        return {**config, "model": out}
    return config  # compared as written


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flatten(v, f"{key}.") if isinstance(v, dict) else {key: v}
    return out


def _differing(saved: dict[str, Any], config: TrainConfig, skip: set[str]):
    """(key, saved value, config value) for every flattened setting that differs, except the
    ``skip`` keys and keys the saved config lacks (added to `TrainConfig` later)."""
    old, new = _flatten(_canonical(saved)), _flatten(_canonical(config.to_dict()))
    for key, value in new.items():
        if key not in skip and key in old and old[key] != value:
            yield key, old[key], value


def recipe_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """``"key: checkpoint X vs config Y"`` for every training setting that differs.

    ``saved`` is a run's saved config (``config.json`` / the checkpoint's). Keys the saved config
    lacks (added to `TrainConfig` later, defaults keep the old behaviour) are not compared. More
    epochs are allowed when the lr schedule does not depend on the run's length (constant, step):
    resuming then trains on exactly as a longer run would have.
    """
    longer_ok = config.optim.schedule != "cosine"
    return [
        f"{key}: checkpoint {was!r} vs config {now!r}"
        for key, was, now in _differing(saved, config, _NOT_RECIPE)
        if not (key == "epochs" and longer_ok and now > was)
    ]


def seed_recipe_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Like `recipe_differences` for a run of *another seed*: everything but the seed must be
    equal, except epochs under a length-independent lr schedule (constant, step), so that all
    seeds can be extended one after the other (the caller warns while they differ)."""
    skip = _NOT_RECIPE | {"seed"} | ({"epochs"} if config.optim.schedule != "cosine" else set())
    diffs = _differing(saved, config, skip)
    return [f"{key}: {was!r} there vs {now!r} now" for key, was, now in diffs]


def check_same_recipe(run_dir: str | os.PathLike, config: TrainConfig, hint: str) -> None:
    """Refuse to reuse or resume ``run_dir`` when its saved config has another recipe.

    ``hint`` ends the message (what the user should do, e.g. "use another --out"). A folder
    without ``config.json`` passes (nothing trained there yet).
    """
    saved = Path(run_dir) / "config.json"
    if not saved.is_file():
        return
    diffs = recipe_differences(json.loads(saved.read_text()), config)
    if diffs:
        raise ValueError(
            f"{run_dir} holds a run trained with another recipe: " + "; ".join(diffs) + f"; {hint}"
        )


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `train`; clear errors for missing or foreign files."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r} (train first: mrl train CONFIG --out DIR)"
        )
    try:  # weights only: a foreign pickle's code must not run before it is refused
        with _allow_torch_version():  # checkpoints written before this change hold one
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        if "Weights only load failed" in str(exc):  # torch's advice (load it unsafely) is not ours
            raise ValueError(f"checkpoint {path} is unreadable or corrupt, or holds objects other "
                             "than tensors and plain data: not an mrl training checkpoint "
                             "(refused without running any of its code)") from None
        raise ValueError(f"checkpoint {path} is unreadable or corrupt: {exc}") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mrl training checkpoint (format {FORMAT})")
    missing = [k for k in _CHECKPOINT_KEYS if k not in saved]
    if missing:  # a bare KeyError: 'config' at --resume, before
        raise ValueError(f"{path} is not an mrl training checkpoint (format {FORMAT}): it lacks "
                         f"{missing}")
    return saved


@contextlib.contextmanager
def _allow_torch_version():
    """TorchVersion allowed in a weights-only load: `safe_globals` (torch >= 2.5), else the
    process-wide `add_safe_globals` (2.4), else nothing (older torch: only checkpoints written
    before torch_version became a str are then refused, by name)."""
    from torch.torch_version import TorchVersion

    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        with serialization.safe_globals([TorchVersion]):
            yield
        return
    if hasattr(serialization, "add_safe_globals"):
        serialization.add_safe_globals([TorchVersion])
    yield


# every checkpoint `train` writes holds these (format 1); resume reads the others it writes
_CHECKPOINT_KEYS = ("epoch", "config", "task", "model", "optimizer", "scheduler", "rng")


def load_run(
    run_dir: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[MatryoshkaClassifier, TrainConfig, dict[str, Any]]:
    """(model in eval mode, its config, the checkpoint dict) from a run directory or checkpoint."""
    saved = load_checkpoint(run_dir)
    config = config_from_dict(saved["config"])
    t = saved["task"]
    shape = t.get("image_shape")  # absent in checkpoints written before the mlp encoder
    model = build_model(
        config, t["in_channels"], t["num_classes"], tuple(t["mean"]), tuple(t["std"]),
        None if shape is None else tuple(shape),
    )  # fmt: skip
    _load_state(model, saved["model"], run_dir)
    return model.to(device).eval(), config, saved


def _absolute_root(config: TrainConfig) -> TrainConfig:
    """The config with ``data.root`` absolute: the run's config.json must find the data again
    from any working folder (``mrl eval RUN`` run elsewhere)."""
    root = config.data.root
    if root is None or Path(root).is_absolute():
        return config
    data = dataclasses.replace(config.data, root=str(Path(root).resolve()))
    return dataclasses.replace(config, data=data)


def check_task(saved: dict[str, Any], task: Task, where: Any) -> None:
    """Refuse to evaluate a run on data it was not trained for: another task name, number of
    classes, channels or image shape than its checkpoint records (a run trained on a custom
    `Task` through the Python API must be given that task again)."""
    t = saved["task"]
    have = {"name": task.name, "num_classes": task.num_classes, "in_channels": task.in_channels,
            "image_shape": list(task.test.image_shape), "fingerprint": task.fingerprint}
    diffs = [
        f"{k}: trained on {t[k]!r}, given {have[k]!r}"
        for k in have
        if t.get(k) is not None and _plain(t[k]) != _plain(have[k])
    ]
    if diffs:
        changed = t.get("fingerprint") not in (None, task.fingerprint)
        moved = " (the image folder changed since training: its random test split would hold " \
            "training images; restore the folder or train anew)" if changed else ""
        raise ValueError(
            f"run {where} was trained on other data than this task ({'; '.join(diffs)}){moved}; "
            "use the run with its own data (Python API: pass task=...)"
        )


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _load_state(model: nn.Module, state: dict[str, Any], where: Any) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[:3]
        raise ValueError(
            f"checkpoint {where} does not fit this model (another architecture, "
            f"embedding size or nesting?): {' '.join(first)}"
        ) from None


# --------------------------------------------------------------------------- evaluation helper
@torch.no_grad()
def predict(
    model: MatryoshkaClassifier,
    data: ImageTensors,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    with_logits: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings ``[N, D]`` and, optionally, the head's logits ``[G, N, C]`` (float32, CPU)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    zs, preds = [], []
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size].to(device, non_blocking=True)
        z = model.embed(x)
        zs.append(z.float().cpu())
        if with_logits:
            preds.append(model.head(z).float().cpu())  # [G, b, C]
    model.train(was_training)
    return torch.cat(zs), (torch.cat(preds, dim=1) if with_logits else None)


# --------------------------------------------------------------------------- the loop
def _checkpoint_path(out: Path, resume: bool) -> Path:
    """``out/checkpoint.pt``: must exist to resume, must not exist otherwise (never overwritten)."""
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume given but there is no checkpoint at {str(ckpt_path)!r}")
    if not resume and ckpt_path.exists():
        raise FileExistsError(
            f"{str(ckpt_path)!r} exists; pass --resume (resume=True) to continue it or choose "
            "another --out (out_dir)"
        )
    return ckpt_path


def _restore(saved: dict, model: nn.Module, optimizer, scheduler, ckpt_path: Path) -> int:
    """Load weights, optimizer, schedule and RNG state from a checkpoint; the epoch to start at."""
    _load_state(model, saved["model"], ckpt_path)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return int(saved["epoch"])


def _test_top1(model: nn.Module, test, batch_size: int, device: torch.device) -> dict[str, float]:
    """Test top-1 (percent) of every head, keyed by prefix size."""
    _, logits = predict(model, test, batch_size, device)  # [G, N, C]
    acc = (logits.argmax(-1) == test.labels.cpu()[None]).float().mean(1)  # [G]
    return {str(m): round(100 * a, 3) for m, a in zip(model.head.nesting, acc.tolist())}


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    task: Task | None = None,
    stop_after_epochs: int | None = None,
) -> Path:
    """Train ``config`` into ``out_dir``; returns the checkpoint path.

    ``resume``: continue from ``out_dir/checkpoint.pt`` (required to exist). Without it, an existing
    checkpoint is an error (nothing is overwritten). ``task`` overrides loading the dataset (tests);
    ``stop_after_epochs`` stops early as if interrupted (tests of resume). A second process
    training into the same ``out_dir`` meanwhile is refused (its outputs would mix with these).
    """
    out = Path(out_dir)
    benchmark = torch.backends.cudnn.benchmark  # _train sets it on CUDA: restored after the run
    try:
        with _exclusive_run(out, main=int(os.environ.get("RANK", "0")) == 0):
            return _train(config, out, resume, progress, task, stop_after_epochs)
    finally:
        torch.backends.cudnn.benchmark = benchmark  # evaluation afterwards stays deterministic


LOCK = ".lock"


@contextlib.contextmanager
def _exclusive_run(out: Path, main: bool) -> Iterator[None]:
    """Hold a non-blocking exclusive lock on ``out/.lock`` for the whole run (rank 0 only: the
    other ranks are this run). The lock file stays: removing it would let two processes lock
    two different files of the same name."""
    if not main or fcntl is None:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(out / LOCK, wait=False))
        except BlockingIOError:
            raise RunInUse(
                f"another process is training into {str(out)!r}; wait for it to end or "
                "choose another --out (out_dir)"
            ) from None
        try:
            yield
        except BaseException:
            if created and [p.name for p in out.iterdir()] == [LOCK]:
                (out / LOCK).unlink()  # a run refused before any work leaves no folder behind
                out.rmdir()
            raise


class RunInUse(FileExistsError):
    """Another process holds the run folder's lock."""


def _train(
    config: TrainConfig,
    out: Path,
    resume: bool,
    progress: bool,
    task: Task | None,
    stop_after_epochs: int | None,
) -> Path:
    ckpt_path = _checkpoint_path(out, resume)
    saved = load_checkpoint(ckpt_path) if resume else None
    if saved is not None:
        _check_compatible(saved, config, ckpt_path)
    config = _absolute_root(config)

    dist_info, device = _join_processes(config)
    if task is None:
        task = load_task_for(config)
    model = build_model(
        config, task.in_channels, task.num_classes, task.mean, task.std, task.test.image_shape
    ).to(device, memory_format=_memory_format(config, device))
    optimizer = build_optimizer(config, model)
    _check_batch_size(config.batch_size, model, len(task.train), dist_info.world_size)
    steps_per_epoch = len(task.train) // config.batch_size
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    if saved is not None:  # resuming on other data would not continue the same run
        check_task(saved, task, ckpt_path)
        _check_processes(saved, model, dist_info.world_size, ckpt_path)
    start_epoch = 0 if saved is None else _restore(saved, model, optimizer, scheduler, ckpt_path)
    history = [] if saved is None else _saved_history(saved, out / METRICS)

    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", config.to_dict())
        _write_metrics(out / METRICS, history)  # the checkpoint's epochs, no more, no less
    net: nn.Module = model
    if dist_info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    train_source = task.train.to(device)
    test = task.test.to(device) if config.eval_test else None
    head_nesting: Nesting = model.head.nesting
    weights = config.model.get_nesting() if config.model.mode in ("mrl", "mrl-e") else None
    last = stop_after_epochs if stop_after_epochs is not None else config.epochs
    for epoch in range(start_epoch, min(last, config.epochs)):
        record = _train_epoch(
            config,
            net,
            model,
            optimizer,
            scheduler,
            train_source,
            epoch,
            dist_info,
            device,
            weights,
            progress,
        )
        _check_finite(record, model, epoch, config, ckpt_path, dist_info, device)
        if test is not None and dist_info.main:
            record["test_top1"] = _test_top1(model, test, config.eval_batch_size, device)
        if dist_info.main:
            history.append(record)
            _save(ckpt_path, config, model, optimizer, scheduler, epoch + 1, task, head_nesting,
                  history, dist_info.world_size)  # fmt: skip
            _write_metrics(out / METRICS, history)
        if dist_info.world_size > 1:
            torch.distributed.barrier()
    return ckpt_path


def _join_processes(config: TrainConfig) -> tuple[Processes, torch.device]:
    """Join the process group (if any) and pick this process's device."""
    dist_info = join(None if config.device == "auto" else config.device.split(":")[0])
    device = _device(config, dist_info.local_rank, dist_info.world_size)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # NCCL collectives (barrier) use the current device
    if device.type == "cuda":  # fixed input shapes: let cuDNN time its algorithms once
        torch.backends.cudnn.benchmark = True
    return dist_info, device


def _check_batch_size(batch_size: int, model: nn.Module, n_train: int, world_size: int) -> None:
    """Refuse, before config.json is written, a batch the processes or the data cannot take."""
    if batch_size % world_size:
        raise ValueError(
            f"batch_size must be a positive multiple of the number of processes "
            f"({world_size}), got batch_size={batch_size}"
        )
    _check_batchnorm_batch(model, batch_size, world_size)
    if n_train // batch_size == 0:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {n_train} training "
            "items (an epoch would have no step)"
        )


def _saved_history(saved: dict[str, Any], metrics: Path) -> list[dict[str, Any]]:
    """The records of the checkpoint's epochs: its own ``history``, or (a checkpoint written
    before it kept one) the lines of ``metrics`` up to its epoch, the last one of each epoch."""
    epoch = int(saved["epoch"])
    if "history" in saved:
        return list(saved["history"])[:epoch]
    by_epoch = {r.get("epoch"): r for r in _read_jsonl(metrics)}
    return [by_epoch[e] for e in range(1, epoch + 1) if e in by_epoch]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``'s lines; a torn line (an appending writer killed mid-line,
    as before the log was rewritten whole) is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def epoch_records(run_dir: str | os.PathLike, saved: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-epoch records of the run whose checkpoint is ``saved``: ``history`` when the
    checkpoint has it, else metrics.jsonl's lines when they end at the checkpoint's epoch, else
    [] (the log is of another state of the run: its last line is not this model's)."""
    if "history" in saved:
        return list(saved["history"])
    records = _saved_history(saved, Path(run_dir) / METRICS)
    return records if records and records[-1].get("epoch") == saved["epoch"] else []


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole (atomically) rather than appended: never a torn or repeated line.
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))


class TrainingDiverged(ValueError):
    """The loss became NaN or inf: nothing of that epoch is saved."""


def _trained_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """What training updates: the parameters and BatchNorm's running statistics (not other
    buffers: an encoder may hold a deliberately infinite one, e.g. a -inf mask)."""
    yield from model.parameters()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield from (t for t in (m.running_mean, m.running_var) if t is not None)


def finite_state(model: nn.Module) -> torch.Tensor:
    """1-element float tensor: 1.0 when every tensor training updates (`_trained_tensors`) is
    finite, else 0.0; one device reduction, no host sync."""
    flags = [torch.isfinite(t).all() for t in _trained_tensors(model) if t.is_floating_point()]
    return torch.stack(flags).all().float().reshape(1) if flags else torch.ones(1)


def _check_finite(record: dict[str, Any], model: nn.Module, epoch: int, config: TrainConfig,
                  ckpt: Path, dist_info: Processes, device: torch.device) -> None:
    # Checked once per epoch (the loss is summed on the device, no host sync per step). A step's
    # loss comes before its update, so the epoch's last update is checked on the weights
    # themselves (an inf there was saved as the "last good" checkpoint). Under DDP the verdict
    # is all-reduced: a NaN on one rank must stop every rank (one rank raising while the others
    # wait at the barrier would hang the job).
    flag = torch.cat([torch.tensor([float(math.isfinite(record["loss"]))], device=device),
                      finite_state(model).to(device)])  # [loss finite, weights finite]
    if dist_info.world_size > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    loss_ok, weights_ok = (bool(v > 0) for v in flag.tolist())
    if loss_ok and weights_ok:
        return
    kept = f"{ckpt} (epoch {epoch}) is kept" if epoch > 0 else "no checkpoint was written"
    what = (f"the mean loss of epoch {epoch + 1} is {record['loss']}" if not loss_ok else
            f"the weights after epoch {epoch + 1} are not finite (its last updates diverged)")
    # --resume refuses another lr or warm-up (the run would not equal an uninterrupted one):
    # the way forward is a new run.
    raise TrainingDiverged(
        f"training diverged: {what}; {kept}. "
        f"Train again into a new --out (out_dir) with a lower optim.lr (now {config.optim.lr}) "
        "or more warm-up (optim.warmup_epochs)"
    )


def _save(
    path: Path,
    config: TrainConfig,
    model: MatryoshkaClassifier,
    optimizer,
    scheduler,
    epoch: int,
    task: Task,
    head_nesting: Nesting,
    history: list[dict[str, Any]],
    world_size: int = 1,
) -> None:
    atomic_torch_save(
        {
            "format": FORMAT,
            "epoch": epoch,
            "world_size": world_size,  # processes that trained it (BatchNorm: see resume)
            "history": history,  # one record per epoch done: metrics.jsonl is rebuilt from it
            "config": config.to_dict(),
            "nesting": config.model.get_nesting().to_dict(),  # the embedding's prefixes
            "head_nesting": head_nesting.to_dict(),  # the prefixes of the head's G outputs
            "task": {
                "name": task.name,
                "num_classes": task.num_classes,
                "in_channels": task.in_channels,
                "image_shape": list(task.test.image_shape),
                "mean": list(task.mean),
                "std": list(task.std),
                "fingerprint": task.fingerprint,
            },
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "torch_version": str(torch.__version__),  # a plain str: loads with weights_only
        },
        path,
    )


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_epoch(
    config: TrainConfig,
    net: nn.Module,
    model: MatryoshkaClassifier,
    optimizer,
    scheduler,
    source,
    epoch: int,
    dist_info: Processes,
    device: torch.device,
    weights: Nesting | None,
    progress: bool,
) -> dict[str, Any]:
    from mrl.losses import nested_cross_entropy

    net.train()
    d = config.data
    # On CUDA the flips and crops are drawn on the GPU (copying CPU draws in would make every
    # step wait for the GPU); on CPU the stream is the one it always was.
    gen_device = device if device.type == "cuda" else "cpu"
    aug_gen = torch.Generator(gen_device).manual_seed(config.seed * 1_000_003 + epoch + 500_009)
    memory_format = _memory_format(config, device)
    batches = iterate_batches(
        source,
        config.batch_size,
        seed=config.seed,
        epoch=epoch,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    steps = len(source) // config.batch_size
    bar = _progress(
        batches, steps, f"epoch {epoch + 1}/{config.epochs}", progress and dist_info.main
    )
    G = len(model.head.nesting)
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
    correct = torch.zeros(G, device=device)
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    t0 = _clock(device)
    for i, (x, y) in enumerate(bar):
        if d.flip or d.crop_pad:
            # Drawn for the whole global batch so every process sees the same augmentation stream.
            local = x.shape[0]
            x = augment(
                x,
                aug_gen,
                flip=d.flip,
                crop_pad=d.crop_pad,
                total=local * dist_info.world_size,
                offset=local * dist_info.rank,
            )
        if memory_format is not torch.contiguous_format:  # the layout the model's weights have
            x = x.contiguous(memory_format=memory_format)
        with _autocast(config, device):
            _, logits = net(x)  # [B, D], [G, B, C]
            loss = nested_cross_entropy(
                logits.float(), y, weights, label_smoothing=config.optim.label_smoothing
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]  # this step's (after it, the next step's)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(-1) == y[None]).sum(1)
        seen += y.shape[0]
        if progress and dist_info.main and i % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    elapsed = _clock(device) - t0
    return _epoch_log(epoch, steps, loss_sum, correct, seen, model.head.nesting, lr, elapsed,
                      dist_info, device)  # fmt: skip


def _epoch_log(
    epoch: int,
    steps: int,
    loss_sum: torch.Tensor,
    correct: torch.Tensor,
    seen: int,
    nesting: Nesting,
    lr: float,
    elapsed: float,
    dist_info: Processes,
    device: torch.device,
) -> dict[str, Any]:
    """One epoch's metrics line: mean loss, train top-1 per prefix ([G] counts), speed."""
    if dist_info.world_size > 1:  # the log is the global batch's, not rank 0's share of it
        stats = torch.cat([loss_sum.reshape(1), correct.float(),
                           torch.tensor([float(seen)], device=device)])  # fmt: skip
        torch.distributed.all_reduce(stats)
        # local losses are means over equal local batches: their mean is the global batch's
        loss_sum, correct = stats[0] / dist_info.world_size, stats[1:-1]
        seen = int(stats[-1].item())
    return {
        "epoch": epoch + 1,
        "loss": round(loss_sum.item() / max(1, steps), 5),
        "train_top1": {
            str(m): round(100 * c / max(1, seen), 3) for m, c in zip(nesting, correct.tolist())
        },
        "lr": lr,  # of the epoch's last step (was the next epoch's first: 0.0 at a cosine end)
        "seconds": round(elapsed, 2),
        "images_per_s": round(seen / max(elapsed, 1e-9), 1),
    }


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
