"""Audit of the vision training / evaluation side against plain reference computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrl.data import load_task


def _flat_folder(root, bright: int = 3):
    """Two classes of 10 flat 8x8 images; the first ``bright`` of class ``a`` are bright."""
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            value = 250 if (c == "a" and i < bright) else 20
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_random_split_is_normalised_with_training_statistics(tmp_path):
    """The random train/test split of a plain image folder: mean and std must come from the
    training part only (the whole folder's statistics included the test images)."""
    pytest.importorskip("PIL")
    _flat_folder(tmp_path)
    for seed in (0, 1, 2):
        task = load_task("image-folder", root=str(tmp_path), image_size=8, seed=seed,
                         test_fraction=0.5)  # fmt: skip
        pixels = task.train.images.double() / 255
        mean = pixels.mean((0, 2, 3))
        std = pixels.transpose(0, 1).reshape(3, -1).std(1)
        assert task.train.mean == pytest.approx(mean.tolist(), abs=1e-6), seed
        assert task.train.std == pytest.approx(std.tolist(), abs=1e-6), seed
        assert task.test.mean == task.train.mean and task.test.std == task.train.std
        assert task.mean == task.train.mean  # what the model's Normalize layer is built from


# --------------------------------------------------------------------------- training loop
BASE = [
    "data.dataset=synthetic", "data.train_size=64", "model.dim=16", "model.width=4",
    "model.nesting=4,8,16", "epochs=1", "batch_size=64", "eval_batch_size=128", "device=cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return load_task("synthetic", train_size=64)


@pytest.mark.parametrize(
    ("mode", "extra", "weights"),
    [
        ("mrl", ["model.nesting_weights=[0.5,1,2]", "optim.label_smoothing=0.1"], [0.5, 1, 2]),
        ("mrl-e", ["model.nesting_weights=[0.5,1,2]"], [0.5, 1, 2]),
        ("ff", ["model.ff_dim=4", "model.nesting_weights=[0.5,1,2]"], [1.0]),  # one head
        ("plain", ["optim.label_smoothing=0.2"], [1.0]),
    ],
)
def test_logged_loss_is_the_weighted_cross_entropy_of_the_heads(tmp_path, tiny, mode, extra,
                                                                weights):
    """One full-batch step: the logged loss equals sum_g w_g * CE(logits_g, y) written by hand
    (per-prefix loop, label smoothing), from the same initial weights and batch."""
    import json

    import torch.nn.functional as F

    from mrl.config import load_config
    from mrl.data.tensors import iterate_batches
    from mrl.train import build_model, train

    cfg = load_config(None, [*BASE, f"model.mode={mode}", *extra])
    model = build_model(cfg, 1, 4, tiny.mean, tiny.std, (12, 12)).train()
    ((x, y),) = list(iterate_batches(tiny.train, 64, seed=0, epoch=0))
    z, logits = model(x)
    if mode == "ff":  # the full network; the classifier reads only z[:, :4]
        w, b = model.head.linear.weight, model.head.linear.bias
        assert w.shape == (4, 4) and z.shape == (64, 16)
        assert torch.allclose(logits[0], z[:, :4] @ w.T + b)
    ls = cfg.optim.label_smoothing
    expected = sum(wg * F.cross_entropy(logits[g], y, label_smoothing=ls)
                   for g, wg in enumerate(weights))  # fmt: skip
    train(cfg, tmp_path, progress=False, task=tiny)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert logged == pytest.approx(float(expected.detach()), abs=1e-5)


def test_same_seed_same_run_other_seed_another(tmp_path, tiny):
    """Two identical runs (flips and crops on) end with identical weights and metrics; another
    seed gives other weights (same data: only initialisation, order and augmentation differ)."""
    from mrl.config import load_config
    from mrl.train import load_checkpoint, train

    def run(name, *extra):
        cfg = load_config(None, [*BASE, "epochs=2", "batch_size=32", "data.flip=true",
                                 "data.crop_pad=1", *extra])  # fmt: skip
        train(cfg, tmp_path / name, progress=False, task=tiny)
        saved = load_checkpoint(tmp_path / name)
        drop = ("seconds", "images_per_s")
        return saved["model"], [{k: v for k, v in r.items() if k not in drop}
                                for r in saved["history"]]  # fmt: skip

    (a, ha), (b, hb), (c, hc) = run("a"), run("b"), run("c", "seed=1")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a) and ha == hb
    differ = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], c[k])]
    assert "encoder.features.0.0.weight" in differ and "head.weights.0" in differ
    assert ha != hc


# --------------------------------------------------------------------------- probe, eval
def test_linear_probe_agrees_with_sklearn_and_fits_on_training_data_only():
    sk = pytest.importorskip("sklearn.linear_model")
    from mrl.probe import fit_linear_probe

    g = torch.Generator().manual_seed(0)
    centres = 1.5 * torch.randn(4, 12, generator=g)
    y, yq = torch.randint(0, 4, (300,), generator=g), torch.randint(0, 4, (200,), generator=g)
    x = centres[y] + 2 * torch.randn(300, 12, generator=g) + 5
    xq = centres[yq] + 2 * torch.randn(200, 12, generator=g) + 5
    x[:, 3] *= 100  # a badly scaled feature: standardisation matters
    xq[:, 3] *= 100
    probe = fit_linear_probe(x, y, 4, device="cpu")
    assert torch.allclose(probe.mean, x.mean(0)) and torch.allclose(probe.std, x.std(0))
    # mean CE + l2/2 ||W||^2  <=>  sklearn's C * sum CE + 1/2 ||W||^2 with C = 1 / (l2 N)
    mu, sd = x.mean(0), x.std(0)
    ref = sk.LogisticRegression(C=1 / (1e-4 * 300), max_iter=5000, tol=1e-10)
    ref.fit(((x - mu) / sd).numpy(), y.numpy())
    agree = (probe.predict(xq).numpy() == ref.predict(((xq - mu) / sd).numpy())).mean()
    assert agree >= 0.99
    # the test set never enters the fit: the same probe whatever the queries are
    again = fit_linear_probe(x, y, 4, device="cpu")
    assert torch.equal(again.weight, probe.weight)


def _reference_retrieval(db, ydb, q, yq, m, center, k=10):
    """1-NN, mAP@k (normalised by min(k, R)), P@k in percent: a plain loop over queries."""
    db, q = db.double(), q.double()
    if center:  # the database mean, on both sides
        mu = db.mean(0)
        db, q = db - mu, q - mu
    a = torch.nn.functional.normalize(db[:, :m], dim=1)
    b = torch.nn.functional.normalize(q[:, :m], dim=1)
    nn1 = ap = pk = 0.0
    for i in range(len(q)):
        order = torch.sort(a @ b[i], descending=True, stable=True).indices[:k]
        rel = (ydb[order] == yq[i]).double()
        R = int((ydb == yq[i]).sum())
        nn1 += float(rel[0])
        prec = rel.cumsum(0) / torch.arange(1, k + 1)
        ap += float((prec * rel).sum()) / min(k, R)
        pk += float(rel.mean())
    return [100 * v / len(q) for v in (nn1, ap, pk)]


def test_eval_retrieval_and_baselines_match_a_plain_reference(tmp_path, tiny):
    """`mrl eval`'s numbers: test queries against the training images, re-normalised prefixes,
    optional centring on the database mean; PCA fitted on the database only."""
    from mrl.baselines import PCA
    from mrl.commands.eval import compute_embeddings, evaluate_embeddings
    from mrl.config import load_config
    from mrl.train import train

    train(load_config(None, [*BASE, "model.mode=plain", "epochs=2", "batch_size=32"]), tmp_path,
          progress=False, task=tiny)  # fmt: skip
    e = compute_embeddings(tmp_path, "cpu", task=tiny)
    assert torch.equal(e.db_labels, tiny.train.labels) and torch.equal(e.test_labels,
                                                                       tiny.test.labels)
    pca = PCA().fit(e.db.double())
    feats = {"plain": (e.db, e.test), "pca": (pca.transform(e.db.double()),
                                              pca.transform(e.test.double()))}  # fmt: skip
    for center in (False, True):
        recs = evaluate_embeddings(e, center=center, probe_iter=5)
        got = {(r["method"], r["prefix"], r["metric"]): r["value"] for r in recs}
        for method, (db, q) in feats.items():
            for m in (4, 8, 16):
                want = _reference_retrieval(db, e.db_labels, q, e.test_labels, m, center)
                have = [got[(method, m, k)] for k in ("1nn", "map@10", "p@10")]
                assert have == pytest.approx(want, abs=1e-6), (method, m, center)


# --------------------------------------------------------------------------- data
def test_fashion_mnist_1k_triples_come_from_their_own_split(monkeypatch):
    """Test triples from test images only, database triples from training images only, label
    100a + 10b + c, fixed across calls."""
    from mrl.data import fashion_mnist_1k
    from mrl.data.synthetic import make_synthetic

    bases = {split: make_synthetic(n=n, num_classes=10, size=4, seed=3, split=split)
             for split, n in (("train", 40), ("test", 30))}  # fmt: skip
    monkeypatch.setattr(fashion_mnist_1k, "load_fashion_mnist",
                        lambda split, *a, **kw: bases[split])  # fmt: skip
    source, db, test = fashion_mnist_1k.load_fashion_mnist_1k(train_triples=8, db_triples=50,
                                                             test_triples=60)  # fmt: skip
    for fixed, base in ((db, bases["train"]), (test, bases["test"])):
        flat = base.images.reshape(len(base), -1)
        for x, label in zip(fixed.images, fixed.labels.tolist()):
            digits = []
            for p in range(3):
                panel = x[:, :, 4 * p : 4 * (p + 1)].reshape(-1)
                hits = (flat == panel).all(1).nonzero().flatten()
                assert len(hits), f"a panel of {fixed.name} is not an image of its split"
                other = bases["test" if base is bases["train"] else "train"].images
                assert not (other.reshape(len(other), -1) == panel).all(1).any()
                digits.append(int(base.labels[hits[0]]))
            assert label == 100 * digits[0] + 10 * digits[1] + digits[2]
    again = fashion_mnist_1k.load_fashion_mnist_1k(train_triples=8, db_triples=50, test_triples=60)
    assert torch.equal(again[1].images, db.images) and torch.equal(again[2].labels, test.labels)
    assert source.num_classes == db.num_classes == test.num_classes == 1000


def test_fashion_mnist_statistics_are_the_training_split_s():
    from mrl.data.fashion_mnist import MEAN, STD, load_fashion_mnist

    try:
        train = load_fashion_mnist("train", download=False)
    except (FileNotFoundError, ValueError):
        pytest.skip("Fashion-MNIST is not installed here")
    pixels = train.images.double() / 255
    assert MEAN[0] == pytest.approx(float(pixels.mean()), abs=1e-4)
    assert STD[0] == pytest.approx(float(pixels.std()), abs=1e-4)


# --------------------------------------------------------------------------- claims
def _by_seed(method, metric, per_prefix):
    from mrl.records import make_record

    return [make_record(method, p, metric, v, seed=s) for p, vals in per_prefix.items()
            for s, v in enumerate(vals)]  # fmt: skip


def _claim(records, start, task="fashion-mnist"):
    from mrl.claims import check_claims

    (claim,) = [c for c in check_claims(records, task) if c.text.startswith(start)]
    return claim.holds


def test_claims_compute_what_their_sentences_say():
    within = "MRL top-1 at most 1 point below FF-m"
    ff = _by_seed("ff", "top1", {8: [95, 95], 16: [90, 90], 256: [92, 92]})
    # means over seeds decide: MRL-16 = mean(88, 90.2) = 89.1 >= 90 - 1, although seed 0 misses
    ok = _by_seed("mrl", "top1", {8: [50, 50], 16: [88, 90.2], 256: [91, 91]})
    assert _claim(ok + ff, within) is True  # 8 < 16: not part of the claim
    assert _claim(_by_seed("mrl", "top1", {16: [89, 89], 256: [91, 91]}) + ff, within) is True
    assert _claim(_by_seed("mrl", "top1", {16: [88.8, 89], 256: [99, 99]}) + ff, within) is False
    assert _claim(_by_seed("mrl", "top1", {16: [90, 90], 256: [90.9, 90.9]}) + ff, within) is False
    # small prefixes (<= 8) with the same probe: every one of them, and only them
    probe = _by_seed("plain", "probe_top1", {2: [40, 40], 4: [60, 60], 8: [80, 80], 16: [90, 90]})
    heads = _by_seed("mrl", "top1", {p: [1, 1] for p in (2, 4, 8, 16)})
    above = "MRL features above plain truncation"
    good = _by_seed("mrl", "probe_top1", {2: [50, 50], 4: [61, 61], 8: [81, 81], 16: [80, 80]})
    assert _claim(heads + probe + good, above) is True
    bad = _by_seed("mrl", "probe_top1", {2: [50, 50], 4: [58, 61], 8: [81, 81], 16: [95, 95]})
    assert _claim(heads + probe + bad, above) is False  # at 4: mean 59.5 < 60
    # 1-NN at every prefix of MRL's heads, the smallest included
    nn = "MRL 1-NN at least the truncated"
    plain = _by_seed("plain", "1nn", {2: [30, 30], 4: [50, 50], 8: [70, 70], 16: [80, 80]})
    mrl = _by_seed("mrl", "1nn", {2: [35, 35], 4: [55, 55], 8: [70, 70], 16: [80, 80]})
    assert _claim(heads + plain + mrl, nn) is True  # ties count ("at least")
    low = _by_seed("mrl", "1nn", {2: [29, 29], 4: [55, 55], 8: [70, 70], 16: [80, 80]})
    assert _claim(heads + plain + low, nn) is False
    # fashion-mnist-1k: strictly above FF-8 (own heads) and PCA (1-NN) at 8
    k1 = _by_seed("ff", "top1", {8: [45, 46]}) + _by_seed("pca", "1nn", {8: [38, 38]})
    at8 = _by_seed("mrl", "top1", {8: [45.5, 45.5]}) + _by_seed("mrl", "1nn", {8: [38, 38.2]})
    assert _claim(k1 + at8, "MRL top-1 above FF-8", "fashion-mnist-1k") is False  # a tie
    assert _claim(k1 + at8, "MRL 1-NN above PCA", "fashion-mnist-1k") is True
