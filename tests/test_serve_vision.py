"""Serving a vision run (images as base64 in /v1/embeddings), from a tiny trained run."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
Image = pytest.importorskip("PIL.Image")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from mrl.serve import create_app, load_encoder, serving  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from mrl.config import DataConfig, ModelConfig, TrainConfig
    from mrl.train import train

    out = tmp_path_factory.mktemp("vision") / "run"
    cfg = TrainConfig(data=DataConfig(dataset="synthetic", train_size=64),
                      model=ModelConfig(dim=16, nesting="4,8,16", width=4),
                      epochs=1, batch_size=64, device="cpu")
    train(cfg, out, progress=False)
    return out


def png_b64(img: np.ndarray) -> str:
    """uint8 [C, H, W] -> base64 PNG."""
    arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow  # trains a tiny run first (seconds alone; much longer on a busy 2-core CPU)
def test_vision_run_serves_image_embeddings(run_dir):
    from mrl.data.synthetic import make_synthetic
    from mrl.train import load_run

    enc = load_encoder(str(run_dir))
    assert enc.nesting.sizes == (4, 8, 16) and enc.shape == (12, 12)
    images = make_synthetic(n=3, seed=1, split="test").images  # uint8 [3, C, 12, 12]
    model, _, _ = load_run(run_dir)
    with torch.no_grad():
        ref = model.embed(images).numpy()  # [3, 16]
    with serving(create_app(enc)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="dummy", max_retries=0)
        inputs = [png_b64(im.numpy()) for im in images]
        inputs[2] = "data:image/png;base64," + inputs[2]  # data URLs work too
        res = client.embeddings.create(input=inputs, model="run", dimensions=8)
        got = np.asarray([d.embedding for d in res.data])
        want = ref[:, :8] / np.linalg.norm(ref[:, :8], axis=1, keepdims=True)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert res.usage.prompt_tokens == 3  # one per image
        r = httpx.post(url + "/v1/embeddings", json={"input": [inputs[0], "bm90IGFuIGltYWdl"],
                                                     "model": "run"})
        assert r.status_code == 400
        assert "input[1] is not a base64-encoded image" in r.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 200


def _bare_encoder(shape, channels):
    """A VisionEncoder's decoding without a trained run (only shape and channels matter)."""
    from mrl.serve.encoders import VisionEncoder

    enc = VisionEncoder.__new__(VisionEncoder)
    enc.shape, enc.channels = shape, channels
    return enc


def _b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("channels", [1, 3])
def test_served_images_are_decoded_as_training_decoded_them(channels):
    """A 3:1 image was stretched to the square training shape (training: shorter side + centre
    crop) and a 16-bit one clipped to white (training scales it): other pixels than trained on."""
    from mrl.data.image_folder import CenterCrop, Compose, Resize, ToTensor

    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (8, 24, 3), dtype=np.uint8))
    deep = Image.fromarray(rng.integers(0, 65536, (10, 10), dtype=np.uint16))  # mode I;16
    train_like = Compose([Resize(12), CenterCrop(12), ToTensor(channels)])
    enc = _bare_encoder((12, 12), channels)
    for img in (wide, deep):
        got = enc._decode(0, _b64(img))
        np.testing.assert_array_equal(got, train_like(img).numpy())
    assert enc._decode(0, _b64(deep)).mean() < 200  # scaled, not clipped to 255


def test_a_non_square_task_shape_is_resized_to():
    enc = _bare_encoder((28, 84), 1)
    img = Image.fromarray(np.zeros((30, 80), np.uint8))
    assert enc._decode(0, _b64(img)).shape == (1, 28, 84)
