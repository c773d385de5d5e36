"""Typed configs: shipped files load, overrides are type-checked, bad keys/values fail clearly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mrl.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    describe,
    load_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    config.model.get_nesting().check_dim(config.model.dim)


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 3


def test_overrides_are_typed():
    c = load_config(None, ["optim.lr=0.1", "epochs=7", "data.flip=true", "data.root=none",
                           "model.nesting_weights=[1, 2, 3]", "model.nesting=4,8,256"])  # fmt: skip
    assert c.optim.lr == 0.1 and c.epochs == 7 and c.data.flip is True and c.data.root is None
    assert c.model.get_nesting().weights == (1.0, 2.0, 3.0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
        ("epochs=three", "epochs must be an int, got epochs='three'"),
        ("data.flip=maybe", "data.flip must be a bool"),
        ("epochs=0", "epochs must be positive, got epochs=0"),
        ("seed=-1", r"seed must be in \[0, 2\*\*40\), got seed=-1"),
        ("seed=9223372036854775807", r"seed must be in \[0, 2\*\*40\)"),
        ("model.mode=mrle", "model.mode must be one of"),
        ("model.nesting=8,4", "model.nesting='8,4'.*strictly increasing"),
        ("model.nesting=8,16", "ends at 16, but the embedding dim is 256"),
        ("model.ff_dim=8", "model.ff_dim must be None unless mode is 'ff'"),
        ("lr", "--set expects key=value"),
        ("nope.lr=1", "unknown config key 'nope.lr'"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_ff_needs_ff_dim():
    with pytest.raises(ValueError, match="model.ff_dim must be in 1..model.dim=256"):
        load_config(None, ["model.mode=ff"])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="is a folder; give a .json or .toml file"):
        load_config(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"optim": {"lr": "fast"}}))
    with pytest.raises(ValueError, match="optim.lr must be a finite number, got optim.lr='fast'"):
        load_config(tmp_path / "a.json")
    (tmp_path / "m.json").write_text(json.dumps({"model": 3}))
    with pytest.raises(ValueError, match="config table 'model' must be a table, got 3"):
        load_config(tmp_path / "m.json")
    (tmp_path / "b.json").write_text(json.dumps({"modle": {}}))
    with pytest.raises(ValueError, match="unknown config key 'modle'"):
        load_config(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path / "c.json")
    (tmp_path / "d.yaml").write_text("")
    with pytest.raises(ValueError, match="must end in .json or .toml"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"e.json must hold a JSON object of sections .*a list"):
        load_config(tmp_path / "e.json")
    (tmp_path / "f.json").write_bytes(b'{"epochs": 2, "x": "\xff"}')
    with pytest.raises(ValueError, match=r"f.json' is not UTF-8 text"):
        load_config(tmp_path / "f.json")
    (tmp_path / "g.toml").write_text("epochs = = 2")
    with pytest.raises(ValueError, match=r"g.toml is not valid TOML"):
        load_config(tmp_path / "g.toml")


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e400"])
def test_non_finite_numbers_are_refused(value):
    message = f"optim.lr must be a finite number, got optim.lr='{value}'"
    with pytest.raises(ValueError, match=message):
        load_config(None, [f"optim.lr={value}"])


def test_toml(tmp_path):
    pytest.importorskip("tomllib")
    (tmp_path / "a.toml").write_text('epochs = 2\n[model]\nmode = "mrl-e"\n')
    c = load_config(tmp_path / "a.toml")
    assert c.epochs == 2 and c.model.mode == "mrl-e"


def test_roundtrip_and_describe():
    c = apply_overrides(TrainConfig(), ["model.mode=ff", "model.ff_dim=8"])
    assert config_from_dict(c.to_dict()) == c
    text = describe()
    assert "optim.lr (float, default 0.002): peak learning rate" in text
    assert text.count("\n") + 1 == 7 + 6 + 9 + 9


def test_shipped_1k_mlp_config_is_the_reproduce_cpu_recipe():
    from mrl.commands.reproduce import RECIPES

    path = Path(__file__).resolve().parents[1] / "configs" / "fashion-mnist-1k-mlp.json"
    shipped = load_config(path, []).to_dict()
    recipe = load_config(None, list(RECIPES[("fashion-mnist-1k", "small")].overrides)).to_dict()
    assert shipped == recipe


def test_group_norm_fits_any_width_and_is_refused_where_it_would_be_ignored():
    import torch

    from mrl.models.norm import make_norm

    assert [make_norm("group", c).num_groups for c in (4, 6, 8, 12, 100, 256)] == [4, 6, 8, 4, 4, 8]
    cfg = load_config(None, ["model.norm=group", "model.width=12", "model.dim=100",
                             "model.nesting=doubling:4"])
    from mrl.models import build_encoder

    enc = build_encoder(cfg.model.name, cfg.model.dim, 1, **cfg.model.encoder_options((28, 28)))
    assert enc(torch.randn(2, 1, 28, 28)).shape == (2, 100)
    with pytest.raises(ValueError, match=r"model.norm must be 'batch' for model.name='resnet18'"):
        load_config(None, ["model.name=resnet18", "model.norm=group"])


def test_a_saved_resnet_config_with_a_group_norm_still_loads():
    # Runs trained before the norm check recorded norm=group for ResNets (built with BatchNorm);
    # eval and cascade read their config with config_from_dict, which must accept it.
    saved = load_config(None, ["model.name=resnet18"]).to_dict()
    saved["model"]["norm"] = "group"
    assert config_from_dict(saved).model.norm == "group"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TrainConfig(epochs=1.5), "epochs must be an int, got epochs=1.5"),
        (lambda: TrainConfig(epochs=True), "epochs must be an int, got epochs=True"),
        (lambda: TrainConfig(eval_batch_size=1.5), "eval_batch_size must be an int"),
        (lambda: TrainConfig(amp=1), "amp must be a bool, got amp=1"),
        (lambda: OptimConfig(weight_decay=float("inf")),
         "optim.weight_decay must be a finite number, got optim.weight_decay=inf"),
        (lambda: OptimConfig(lr="0.1"), "optim.lr must be a finite number, got optim.lr='0.1'"),
        (lambda: ModelConfig(dim=16.0), "model.dim must be an int, got model.dim=16.0"),
        (lambda: DataConfig(image_size=1.5), "data.image_size must be an int"),
    ],
)
def test_configs_built_in_python_check_their_types(make, message):
    """Configs made in Python (not from JSON or --set) failed deep in training, or not at all."""
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_other_dataclass_configs_check_their_types():
    from mrl.text.adaptor import AdaptorConfig
    from mrl.text.finetune import FinetuneConfig

    with pytest.raises(ValueError, match=re.escape("steps must be an int, got steps=2.5")):
        AdaptorConfig(steps=2.5)
    with pytest.raises(ValueError, match=re.escape("lr must be a finite number, got lr=inf")):
        AdaptorConfig(lr=float("inf"))
    with pytest.raises(ValueError, match=re.escape("epochs must be an int, got epochs=1.5")):
        FinetuneConfig(epochs=1.5)
    assert FinetuneConfig(lr=None).lr == 3e-5 and OptimConfig(lr=1).lr == 1  # ints are numbers


def test_numpy_scalars_become_python_values():
    import numpy as np

    from mrl.text.finetune import FinetuneConfig

    cfg = TrainConfig(seed=np.int64(2), optim=OptimConfig(lr=np.float32(0.5)), amp=np.bool_(False))
    assert type(cfg.seed) is int and type(cfg.optim.lr) is float and cfg.amp is False
    assert [FinetuneConfig(seed=s).seed for s in np.arange(2)] == [0, 1]
    with pytest.raises(ValueError, match="epochs must be an int, got epochs=2.0"):
        TrainConfig(epochs=np.float64(2.0))


def test_a_config_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"epochs": 3}).encode())
    assert load_config(path).epochs == 3


def test_the_imagenet_stem_is_refused_where_it_would_be_ignored():
    with pytest.raises(ValueError, match=r"model.stem.*'small' for model.name='cnn'.*ignored"):
        load_config(None, ["model.stem=imagenet"])
    resnet = load_config(None, ["model.name=resnet18", "model.stem=imagenet"])
    assert resnet.model.stem == "imagenet"


def test_a_key_given_twice_in_a_json_config_is_refused(tmp_path):
    path = tmp_path / "twice.json"
    path.write_text('{"epochs": 5, "optim": {"lr": 0.1}, "epochs": 7}')
    with pytest.raises(ValueError, match=r"twice.json: key 'epochs' is given twice"):
        load_config(path)
    path.write_text('{"optim": {"lr": 0.1, "lr": 0.2}}')
    with pytest.raises(ValueError, match=r"key 'lr' is given twice"):
        load_config(path)


def test_group_norm_in_an_mlp_needs_16_channels_a_group():
    """One channel a group normalised an MLP's every feature to 0: a width-8 MLP with
    norm=group gave the same embedding for every image (chance accuracy). Refused for new runs;
    the grouping itself is unchanged, so saved runs compute what they computed."""
    import torch
    from torch import nn

    from mrl.models.mlp import MLPEncoder
    from mrl.models.norm import make_norm

    for width in (8, 16, 64):
        with pytest.raises(ValueError, match=rf"model.width must be at least 16 channels per "
                                             rf"group .*got model.width={width}"):
            load_config(None, ["model.name=mlp", "model.norm=group", f"model.width={width}"])
    for width in (128, 100, 1024):  # 8 groups of 16; 4 of 25; 8 of 128
        load_config(None, ["model.name=mlp", "model.norm=group", f"model.width={width}"])
    load_config(None, ["model.name=mlp", "model.norm=group"])  # the default width, 1024
    load_config(None, ["model.name=mlp", "model.norm=batch", "model.width=8"])
    # the rule a saved run was built with
    assert [make_norm("group", c, nn.BatchNorm1d).num_groups for c in (8, 64, 1024)] == [8, 8, 8]
    torch.manual_seed(0)
    enc = MLPEncoder(dim=16, width=128, in_channels=1, input_shape=(8, 8), norm="group")
    assert enc(torch.randn(32, 1, 8, 8)).std(0).min() > 1e-3  # depends on its input
    # built directly (or loaded from a saved run) a narrow one is a warning, not silence
    with pytest.warns(UserWarning, match=r"width=8, norm='group'\) normalises 8 groups of 1"):
        narrow = MLPEncoder(dim=16, width=8, in_channels=1, input_shape=(8, 8), norm="group")
    assert narrow.eval()(torch.randn(5, 1, 8, 8)).std(0).max() < 1e-6  # what it warns about
