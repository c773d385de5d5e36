"""Typed training configuration: dataclasses with one documented field per setting.

A config file (JSON, or TOML where `tomllib` exists) has up to four tables: ``data``, ``model``,
``optim`` and the top level (epochs, batch size, seed, ...). Command-line overrides use dotted keys:
``--set optim.lr=0.1 --set model.nesting=2,4,8,256 --set epochs=3``. Values are checked against
the field types, unknown keys are rejected with the list of known ones, and every value is
validated when the dataclass is built, so a bad config fails before any training starts.

`describe()` prints every field with its type, default and documentation (``--show-config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from mrl.nesting import Nesting

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "describe",
    "load_config",
    "refuse_overrides",
]

MODES = ("mrl", "mrl-e", "ff", "plain")


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with its one-line documentation in ``metadata['doc']``."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _check(cond: bool, name: str, value: Any, expected: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {expected}, got {name}={value!r}")


def check_types(obj: Any, section: str) -> None:
    """Each scalar field holds its annotated type (``section.field`` named in the error): a
    config built in Python with ``epochs=1.5`` or ``lr=inf`` failed deep in training, or not
    at all. Ints are ints (not bools), floats are finite numbers, bools are bools; numpy
    scalars (``for seed in np.arange(3)``) become the Python values they stand for."""
    for f in fields(obj):
        value, kind = getattr(obj, f.name), str(f.type)
        if value is None and kind.endswith("| None"):
            continue
        base = kind.split("|")[0].strip()
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            value = value.item()
            setattr(obj, f.name, value)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": number and math.isfinite(value),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }.get(base, True)
        name = f"{section}.{f.name}" if section else f.name
        expected = "a finite number" if base == "float" else f"a{'n' * (base == 'int')} {base}"
        _check(ok, name, value, expected)


_MAX_RATE = 1e6  # the largest optim.lr / optim.weight_decay accepted


@dataclass
class DataConfig:
    dataset: str = _f(
        "fashion-mnist", "task: fashion-mnist | fashion-mnist-1k | synthetic | image-folder"
    )
    root: str | None = _f(
        None, "data folder (Fashion-MNIST files or the image folder); None = search"
    )
    train_size: int | None = _f(
        None,
        "use a seeded subset of this many training items (None = all); fashion-mnist-1k: "
        "triples per epoch, and a retrieval database of min(50000, this) triples",
    )
    image_size: int = _f(64, "image-folder only: side of the square images, pixels")
    flip: bool = _f(False, "augmentation: random horizontal flips")
    crop_pad: int = _f(0, "augmentation: random crops after zero-padding this many pixels")

    def __post_init__(self) -> None:
        check_types(self, "data")
        from mrl.data import TASKS

        _check(self.dataset in TASKS, "data.dataset", self.dataset, f"one of {TASKS}")
        # an empty root became the working folder (downloads went into it)
        _check(self.root is None or self.root.strip() != "", "data.root", self.root,
               "a folder (or unset: search the default places)")
        if self.root is not None and self.root.startswith("~"):  # --set data.root=~/x: the
            # shell leaves that ~ alone, and a folder called "~" appeared in the working folder
            object.__setattr__(self, "root", os.path.expanduser(self.root))
        _check(
            self.train_size is None or self.train_size > 0,
            "data.train_size",
            self.train_size,
            "positive or None",
        )
        _check(self.image_size > 0, "data.image_size", self.image_size, "positive")
        _check(self.crop_pad >= 0, "data.crop_pad", self.crop_pad, ">= 0")
        _check(
            not (self.flip and self.dataset == "fashion-mnist-1k"),
            "data.flip",
            self.flip,
            "false for fashion-mnist-1k (a flip would reverse the order of the three classes)",
        )


@dataclass
class ModelConfig:
    name: str = _f(
        "cnn", "encoder: cnn | mlp | resnet18 | resnet34 | resnet50 (or a registered name)"
    )
    dim: int = _f(256, "embedding size D, dims")
    width: int | None = _f(
        None, "channels of the first stage / hidden units (None: cnn 16, mlp 1024, resnet 64)"
    )
    stem: str = _f(
        "small", "resnet only: small (3x3, for 28-64 px) | imagenet (7x7 + max-pool, 224 px)"
    )
    norm: str = _f(
        "batch", "cnn and mlp only: batch | group | none (group in an mlp: width >= 128, at "
        "least 16 channels a group)"
    )
    mode: str = _f(
        "mrl", "head: mrl (one linear per prefix) | mrl-e (tied) | ff (reads z[:ff_dim]) | plain"
    )
    nesting: str = _f("doubling:8", "prefix sizes: '8,16,...,D', 'doubling:START' or 'full'")
    nesting_weights: list[float] | None = _f(
        None, "loss weight per prefix (None = 1 each, the paper's sum)"
    )
    ff_dim: int | None = _f(
        None, "mode ff only: number of leading features the classifier reads, dims"
    )

    def __post_init__(self) -> None:
        check_types(self, "model")
        _check(self.dim > 0, "model.dim", self.dim, "positive")
        _check(self.width is None or self.width > 0, "model.width", self.width, "positive or None")
        _check(self.stem in ("small", "imagenet"), "model.stem", self.stem, "'small' or 'imagenet'")
        _check(self.norm in ("batch", "group", "none"), "model.norm", self.norm, "batch|group|none")
        _check(self.mode in MODES, "model.mode", self.mode, f"one of {MODES}")
        nesting = self.get_nesting()  # raises on a bad spec or weights
        if self.mode == "ff":
            _check(
                self.ff_dim is not None and 0 < self.ff_dim <= self.dim,
                "model.ff_dim",
                self.ff_dim,
                f"in 1..model.dim={self.dim} with mode 'ff'",
            )
        else:
            _check(self.ff_dim is None, "model.ff_dim", self.ff_dim, "None unless mode is 'ff'")
        del nesting

    def get_nesting(self) -> Nesting:
        """The embedding's nesting (its last size is ``dim``); weights applied when given."""
        try:
            nesting = Nesting.parse(self.nesting, dim=self.dim)
        except ValueError as exc:
            raise ValueError(f"model.nesting={self.nesting!r}: {exc}") from None
        if self.nesting_weights is None:
            return nesting
        try:  # named as itself (it was reported as a bad model.nesting)
            return nesting.with_weights(self.nesting_weights)
        except ValueError as exc:
            raise ValueError(f"model.nesting_weights={list(self.nesting_weights)!r}: {exc}"
                             ) from None

    def encoder_options(self, image_shape: tuple[int, int] | None = None) -> dict[str, Any]:
        """Keyword options for `mrl.models.build_encoder` of the built-in encoders.

        ``image_shape`` ``(H, W)`` is needed by ``mlp`` only (its first layer reads C*H*W values).
        """
        opts: dict[str, Any] = {} if self.width is None else {"width": self.width}
        if self.name in ("cnn", "mlp"):
            opts["norm"] = self.norm
        if self.name == "mlp":
            if image_shape is None:
                raise ValueError("model.name='mlp' needs the image shape (H, W) of the data")
            opts["input_shape"] = tuple(image_shape)
        elif self.name.startswith("resnet"):
            opts["stem"] = self.stem
        return opts


@dataclass
class OptimConfig:
    name: str = _f("adamw", "optimizer: adamw | sgd")
    lr: float = _f(2e-3, "peak learning rate")
    weight_decay: float = _f(5e-4, "decoupled (adamw) or L2 (sgd) weight decay")
    momentum: float = _f(0.9, "sgd only: momentum (nesterov)")
    schedule: str = _f("cosine", "lr schedule: cosine | step | constant (per step, after warm-up)")
    warmup_epochs: float = _f(0.0, "linear warm-up length, epochs")
    step_epochs: int = _f(30, "step schedule: multiply lr by gamma every this many epochs")
    gamma: float = _f(0.1, "step schedule: decay factor")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy, in [0, 1)")

    def __post_init__(self) -> None:
        check_types(self, "optim")
        _check(self.name in ("adamw", "sgd"), "optim.name", self.name, "'adamw' or 'sgd'")
        # An lr of 1e38 or 1e300 overflowed float32 inside the optimizer (Adam divides it by
        # 1 - beta1**t), a traceback mid-training; anything near that bound is a typo.
        _check(0 < self.lr <= _MAX_RATE, "optim.lr", self.lr, f"in (0, {_MAX_RATE:g}]")
        _check(0 <= self.weight_decay <= _MAX_RATE, "optim.weight_decay", self.weight_decay,
               f"in [0, {_MAX_RATE:g}]")
        _check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "in [0, 1)")
        _check(
            self.schedule in ("cosine", "step", "constant"),
            "optim.schedule",
            self.schedule,
            "cosine|step|constant",
        )
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, ">= 0")
        _check(self.step_epochs > 0, "optim.step_epochs", self.step_epochs, "positive")
        _check(0 < self.gamma <= 1, "optim.gamma", self.gamma, "in (0, 1]")
        _check(
            0 <= self.label_smoothing < 1,
            "optim.label_smoothing",
            self.label_smoothing,
            "in [0, 1)",
        )


@dataclass
class TrainConfig:
    data: DataConfig = _f(None, "dataset and augmentation")
    model: ModelConfig = _f(None, "encoder, embedding size, head mode and nesting")
    optim: OptimConfig = _f(None, "optimizer and learning-rate schedule")
    epochs: int = _f(3, "training epochs (passes over the training items)")
    batch_size: int = _f(
        256, "global batch size, items (split over DDP processes; each epoch leaves out the last "
        "N % batch_size items of its shuffled order; with BatchNorm at least 2 per process)"
    )
    seed: int = _f(0, "seed of initialisation, data order and augmentation")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available)")
    amp: bool = _f(True, "bfloat16 autocast on CUDA (ignored on CPU)")
    eval_batch_size: int = _f(1024, "batch size when computing embeddings, items")
    eval_test: bool = _f(True, "log test top-1 per prefix after every epoch")

    def __post_init__(self) -> None:
        # Nested tables default to their own defaults (a dataclass default cannot be mutable).
        self.data = self.data if self.data is not None else DataConfig()
        self.model = self.model if self.model is not None else ModelConfig()
        self.optim = self.optim if self.optim is not None else OptimConfig()
        check_types(self, "")
        _check(self.epochs > 0, "epochs", self.epochs, "positive")
        # Generators are seeded with seed * 1_000_003 + epoch, which must stay below 2**63.
        _check(0 <= self.seed < 2**40, "seed", self.seed, "in [0, 2**40)")
        _check(self.batch_size > 0, "batch_size", self.batch_size, "positive")
        _check(self.eval_batch_size > 0, "eval_batch_size", self.eval_batch_size, "positive")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            self.device,
            "auto, cpu, cuda or cuda:N",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig}


def _coerce(value: Any, hint: Any, key: str, from_text: bool) -> Any:
    """Check ``value`` against the type ``hint`` (converting text from ``--set``); clear errors."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and (
            value is None or (from_text and str(value).lower() in ("none", "null"))
        ):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, from_text)
    if origin is list:
        (item,) = typing.get_args(hint)
        if from_text:
            text = str(value).strip()
            try:
                value = (json.loads(text) if text.startswith("[")
                         else [v for v in text.split(",") if v])
            except json.JSONDecodeError as exc:
                raise ValueError(f"{key} must be a JSON list or comma-separated values, got "
                                 f"{key}={text!r} ({exc.msg})") from None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {key}={value!r}")
        return [_coerce(v, item, f"{key}[{i}]", from_text) for i, v in enumerate(value)]
    if hint is bool:
        if from_text and str(value).lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return str(value).lower() in ("true", "1", "yes", "on")
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be a bool (true/false), got {key}={value!r}")
    if hint is int:
        if from_text:
            try:
                return int(str(value))
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be an int, got {key}={value!r}")
    if hint is float:
        number = None
        if from_text:
            try:
                number = float(str(value))
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is not None and math.isfinite(number):  # inf/nan would train on NaN
            return number
        raise ValueError(f"{key} must be a finite number, got {key}={value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be a string, got {key}={value!r}")
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module


def _unknown(key: str, known: list[str]) -> ValueError:
    # matched by the last part ("lrr" against "lr"): the known keys are bare inside a file's
    # section and prefixed for --set, and "optim.lrr" against "lr" found nothing
    section, _, name = key.rpartition(".")
    full = {k.rpartition(".")[2]: k if "." in k else (f"{section}.{k}" if section else k)
            for k in known}  # fmt: skip
    close = difflib.get_close_matches(name, list(full), n=1, cutoff=0.75)
    hint = f" (did you mean {full[close[0]]!r}?)" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}; known keys: {', '.join(known)}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        name = prefix.rstrip(".") or "top level"  # prefix is "model." inside a section
        raise ValueError(f"config table {name!r} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(prefix + key, names)
        if key in _SECTIONS and cls is TrainConfig:
            kwargs[key] = _build(_SECTIONS[key], value, f"{key}.")
        else:
            kwargs[key] = _coerce(value, hints[key], prefix + key, from_text=False)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A validated `TrainConfig` from nested dicts (unknown keys and wrong types are errors)."""
    return _build(TrainConfig, data, "")


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings (dotted keys); returns a new, re-validated config."""
    data = config.to_dict()
    top = [f.name for f in dataclasses.fields(TrainConfig)]
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = (s.strip() for s in item.split("=", 1))
        parts = key.split(".")
        if len(parts) == 2 and parts[0] in _SECTIONS:
            cls = _SECTIONS[parts[0]]
            names = [f.name for f in dataclasses.fields(cls)]
            if parts[1] not in names:
                raise _unknown(key, [f"{parts[0]}.{n}" for n in names])
            hint = typing.get_type_hints(cls)[parts[1]]
            data[parts[0]][parts[1]] = _coerce(text, hint, key, from_text=True)
        elif len(parts) == 1 and parts[0] in top and parts[0] not in _SECTIONS:
            hint = typing.get_type_hints(TrainConfig)[parts[0]]
            data[parts[0]] = _coerce(text, hint, key, from_text=True)
        else:
            known = [n for n in top if n not in _SECTIONS] + [
                f"{s}.{f.name}" for s, c in _SECTIONS.items() for f in dataclasses.fields(c)
            ]
            raise _unknown(key, known)
    return config_from_dict(data)


def refuse_overrides(overrides: Sequence[str], owned: dict[str, str]) -> None:
    """Refuse ``--set key=value`` for keys a command sets itself (``owned``: key -> how to set
    it instead); such an override would be overwritten silently or mislabel the results."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in owned:
            raise ValueError(f"--set {item}: {key} is not set with --set here; {owned[key]}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a JSON (or TOML) config file, apply ``--set`` overrides, validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config file {str(path)!r} is a folder; give a .json or .toml file")
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not JSON
        except UnicodeDecodeError as exc:
            raise ValueError(f"config file {str(path)!r} is not UTF-8 text: {exc}") from None
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ValueError(
                    f"reading {path} needs Python >= 3.11 (tomllib); use JSON"
                ) from None
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
        elif path.suffix == ".json":
            try:
                data = json.loads(text, object_pairs_hook=_no_repeated_keys)
            except json.JSONDecodeError as exc:
                raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
            except ValueError as exc:  # a repeated key
                raise ValueError(f"config file {path}: {exc}") from None
        else:
            raise ValueError(f"config file must end in .json or .toml, got {str(path)!r}")
        if not isinstance(data, dict):
            raise ValueError(
                f"config file {path} must hold a JSON object of sections (e.g. "
                f'{{"model": {{"nesting": "doubling:8"}}}}), got a {type(data).__name__}'
            )
        data.pop("description", None)  # free text allowed at the top of shipped configs
    try:
        config = config_from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}" if path else str(exc)) from None
    config = apply_overrides(config, list(overrides or []))
    _check_model_options_apply(config.model)
    return config


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: with ``{"epochs": 5, "epochs": 7}`` the last one won
    without a word (TOML refuses a repeated key itself)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} is given twice in one object; keep one")
        out[key] = value
    return out


def _check_model_options_apply(m: ModelConfig) -> None:
    """group/none norms exist in the cnn and mlp encoders only, the imagenet stem in the ResNets
    only. Checked for configs being loaded to train, not in ModelConfig itself: runs saved
    before this check (a ResNet with norm=group, trained with BatchNorm) must still load for
    eval and cascade."""
    _check(m.norm == "batch" or m.name in ("cnn", "mlp"), "model.norm", m.norm,
           f"'batch' for model.name={m.name!r} (group/none are for the cnn and mlp encoders; it "
           "would be ignored)")
    _check(m.stem == "small" or m.name.startswith("resnet"), "model.stem", m.stem,
           f"'small' for model.name={m.name!r} (the stem is a ResNet option; it would be "
           "ignored)")
    if m.name == "mlp" and m.norm == "group":
        # an MLP layer's features [B, C] have no positions: a group's statistics come from its
        # C / groups channels alone (1 channel: every output 0, a constant embedding; 2: about
        # +-1). Refused for new runs, not regrouped: saved runs must keep computing what they
        # computed (GroupNorm's weights do not record the group count).
        from mrl.models.norm import narrow_feature_groups  # torch: imported only for this case

        width = 1024 if m.width is None else m.width
        narrow = narrow_feature_groups(width)
        if narrow is not None:
            raise ValueError(f"model.width must be at least 16 channels per group with "
                             f"model.norm='group' in an MLP (width {width} gives {narrow[0]} "
                             f"groups of {narrow[1]}); use a width of 128 or more, or "
                             f"model.norm='batch', got model.width={width}")


def describe() -> str:
    """Every config key with its type, default and one-line documentation."""
    lines = []
    for prefix, cls in [("", TrainConfig), *((f"{k}.", c) for k, c in _SECTIONS.items())]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if prefix == "" and f.name in _SECTIONS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            type_name = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(
                f"{prefix}{f.name} ({type_name}, default {default!r}): {f.metadata['doc']}"
            )
    return "\n".join(lines)
