"""Data: IDX parsing, Fashion-MNIST lookup errors, triples, image folders, batches, augmentation."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from mrl.data import fashion_mnist as fm
from mrl.data import iterate_batches, load_task
from mrl.data.fashion_mnist_1k import fixed_triples
from mrl.data.synthetic import make_synthetic
from mrl.data.tensors import ImageTensors, TripleSource, augment, compose_triples


def _write_idx(path, array: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _fake_fashion_mnist(folder, n_train=60000, n_test=10000):
    rng = np.random.default_rng(0)
    for split, (img, lab, n) in fm.FILES.items():
        n = n_train if split == "train" else n_test
        _write_idx(folder / img, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(folder / lab, (np.arange(n) % 10).astype(np.uint8))


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.idx", a, code=0x0C)
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "a.idx"), a)
    b = np.arange(10, dtype=np.uint8)
    _write_idx(tmp_path / "b.idx.gz", b)
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "b.idx.gz"), b)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x02\x08\x01", "bad magic number"),
        (b"\x00\x00\x08\x03\x00", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "header promises 5 data bytes"),
    ],
)
def test_read_idx_corrupt(tmp_path, content, message):
    (tmp_path / "x.idx").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        fm.read_idx(tmp_path / "x.idx")


def test_read_idx_bad_gzip(tmp_path):
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupt data file .*x.gz: cannot read it"):
        fm.read_idx(tmp_path / "x.gz")


def test_missing_fashion_mnist_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("MRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MRL_FASHION_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        fm.load_fashion_mnist("train", download=False)
    assert "download the official files" in str(info.value)
    assert str(tmp_path / "cache") in str(info.value)


def test_download_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("MRL_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fm.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="downloading failed .network is unreachable"):
        fm.find_fashion_mnist(download=True)
    assert not list((tmp_path / "cache" / "fashion-mnist").glob("*.gz"))  # nothing half-written


def test_load_from_root_and_corrupt_labels(tmp_path):
    _fake_fashion_mnist(tmp_path, n_train=10)  # only the test split is read
    test = fm.load_fashion_mnist("test", root=tmp_path, download=False)
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert test.labels.dtype == torch.int64 and test.num_classes == 10
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10000, 12, dtype=np.uint8))
    with pytest.raises(ValueError, match="expected 10000 uint8 labels in 0..9"):
        fm.load_fashion_mnist("test", root=tmp_path, download=False)
    with pytest.raises(ValueError, match="split must be one of"):
        fm.load_fashion_mnist("valid", root=tmp_path)


def test_explicit_root_is_the_only_place_looked(tmp_path, monkeypatch):
    # a wrong data.root must fail, not silently train on the system copy
    (tmp_path / "system").mkdir()
    _fake_fashion_mnist(tmp_path / "system", n_train=10, n_test=10)
    monkeypatch.delenv("MRL_FASHION_MNIST", raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    assert fm.find_fashion_mnist(download=False) == tmp_path / "system"
    empty = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match=r"data.root='.*typo' does not hold the "
                       r"Fashion-MNIST files .*downloading is off"):
        fm.find_fashion_mnist(empty, download=False)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(fm.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="downloading into it failed .network is unreach"):
        fm.find_fashion_mnist(empty, download=True)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileNotFoundError, match="it is a file"):
        fm.find_fashion_mnist(afile, download=True)
    # reading a saved run whose data.root was another machine's folder: warn and fall back
    with pytest.warns(UserWarning, match=r"data.root='.*typo' of the saved run does not hold"):
        assert fm.find_fashion_mnist(empty, root_fallback=True) == tmp_path / "system"
    assert not empty.exists()  # nothing created or downloaded there


def test_env_folder_is_the_only_place_looked(tmp_path, monkeypatch):
    """A mistyped $MRL_FASHION_MNIST silently loaded the system copy."""
    (tmp_path / "system").mkdir()
    _fake_fashion_mnist(tmp_path / "system", n_train=10, n_test=10)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("MRL_FASHION_MNIST", str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match=r"MRL_FASHION_MNIST='.*typo' does not hold"):
        fm.find_fashion_mnist(download=False)
    monkeypatch.setenv("MRL_FASHION_MNIST", str(tmp_path / "system"))
    assert fm.find_fashion_mnist(download=False) == tmp_path / "system"


class _Reset:
    """A response that sends some bytes, then fails as a reset connection does."""

    def __init__(self, *args, **kwargs):
        self.sent = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, n):
        if self.sent:
            raise ConnectionResetError("connection reset by peer")
        self.sent = True
        return b"x" * 1000


def test_failed_downloads_leave_nothing_behind(tmp_path, monkeypatch):
    """A reset connection left its .part file (and so the folder it made); an MD5 mismatch
    into a new data.root left the empty folder."""
    monkeypatch.delenv("MRL_FASHION_MNIST", raising=False)
    monkeypatch.setattr(fm.urllib.request, "urlopen", _Reset)
    with pytest.raises(FileNotFoundError, match="downloading into it failed .connection reset"):
        fm.find_fashion_mnist(tmp_path / "new", download=True)
    assert not (tmp_path / "new").exists()

    class Wrong(_Reset):
        def read(self, n):
            return b"" if self.sent else _Reset.read(self, n)

    monkeypatch.setattr(fm.urllib.request, "urlopen", Wrong)
    with pytest.raises(ValueError, match="has MD5 .* expected .*; not kept"):
        fm.find_fashion_mnist(tmp_path / "new", download=True)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not fm.SYSTEM_DIR.is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist_if_installed():
    test = fm.load_fashion_mnist("test", download=False)
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_synthetic_is_deterministic_and_checked():
    a, b = make_synthetic(seed=3), make_synthetic(seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, make_synthetic(seed=3, split="test").images)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got num_classes=0"):
        make_synthetic(num_classes=0)
    with pytest.raises(ValueError, match="n must be an integer, got n=True"):
        make_synthetic(n=True)  # bool is an int: it was one image
    with pytest.raises(ValueError, match="noise must be a finite number, got noise=nan"):
        make_synthetic(noise=float("nan"))  # every image was all zeros
    with pytest.raises(ValueError, match="seed must be an integer, got seed=1.5"):
        make_synthetic(seed=1.5)


def test_triples_compose_left_to_right():
    base = make_synthetic(n=20, num_classes=4, size=5)
    idx = torch.tensor([[0, 1, 2], [3, 3, 4]])
    x, y = compose_triples(base.images, base.labels, idx, 4)
    assert x.shape == (2, 1, 5, 15)
    assert torch.equal(x[0, :, :, 5:10], base.images[1])
    la, lb, lc = base.labels[idx].T
    assert torch.equal(y, la * 16 + lb * 4 + lc)
    fixed = fixed_triples(base, 30, seed=1, name="t")
    assert fixed.num_classes == 64 and torch.equal(
        fixed.images, fixed_triples(base, 30, 1, "t").images
    )
    src = TripleSource(base, 40)
    xb, yb = next(iterate_batches(src, 8, seed=0, epoch=0))
    assert xb.shape == (8, 1, 5, 15) and int(yb.max()) < 64


def test_batches_are_a_function_of_seed_and_epoch():
    data = make_synthetic(n=100)
    one = [y for _, y in iterate_batches(data, 32, seed=1, epoch=2)]
    two = [y for _, y in iterate_batches(data, 32, seed=1, epoch=2)]
    assert len(one) == 3 and all(torch.equal(a, b) for a, b in zip(one, two))
    other = [y for _, y in iterate_batches(data, 32, seed=1, epoch=3)]
    assert not all(torch.equal(a, b) for a, b in zip(one, other))


def test_process_slices_make_up_the_global_batch():
    data = make_synthetic(n=96)
    whole = list(iterate_batches(data, 32, seed=0, epoch=0))
    parts = [list(iterate_batches(data, 32, seed=0, epoch=0, rank=r, world_size=2)) for r in (0, 1)]
    for i, (x, _) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][i][0], parts[1][i][0]]), x)
    with pytest.raises(ValueError, match="batch_size must be a positive multiple"):
        next(iterate_batches(data, 33, seed=0, epoch=0, world_size=2))


def _augment_reference(x, flips, shifts, p):
    """Per-image loop: flip, pad, crop at (dy, dx)."""
    out = []
    for i in range(x.shape[0]):
        img = x[i].flip(-1) if flips[i] else x[i]
        img = torch.nn.functional.pad(img, (p, p, p, p))
        dy, dx = shifts[0, i], shifts[1, i]
        out.append(img[:, dy : dy + x.shape[2], dx : dx + x.shape[3]])
    return torch.stack(out)


def test_augment_matches_per_image_reference():
    x = make_synthetic(n=16, size=7, channels=2).images
    g = torch.Generator().manual_seed(5)
    flips = torch.rand(16, generator=g) < 0.5
    shifts = torch.randint(0, 5, (2, 16), generator=g)
    got = augment(x, torch.Generator().manual_seed(5), flip=True, crop_pad=2)
    assert torch.equal(got, _augment_reference(x, flips, shifts, 2))
    assert torch.equal(augment(x, g), x)  # nothing asked: unchanged


def test_image_tensors_checks_shapes():
    with pytest.raises(ValueError, match=r"images must be \[N, C, H, W\]"):
        ImageTensors(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3), 2, (0.5,), (0.3,))
    with pytest.raises(ValueError, match="labels must be"):
        ImageTensors(torch.zeros(3, 1, 4, 4), torch.zeros(2), 2, (0.5,), (0.3,))
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes=2\), got values "
                       r"in \[0, 2\]"):  # fmt: skip
        ImageTensors(torch.zeros(3, 1, 4, 4), torch.tensor([0, 1, 2]), 2, (0.5,), (0.3,))
    with pytest.raises(ValueError, match="labels must be integer class indices, got dtype"):
        ImageTensors(torch.zeros(3, 1, 4, 4), torch.zeros(3), 2, (0.5,), (0.3,))


def _make_folder(root, classes=("cat", "dog"), per_class=3, size=(20, 12)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_image_folder_loads_and_transforms(tmp_path):
    pytest.importorskip("PIL")
    from mrl.data.image_folder import ImageFolder

    _make_folder(tmp_path)
    ds = ImageFolder(tmp_path, image_size=8)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and y == 1
    t = ds.load_tensors()
    assert t.images.shape == (6, 3, 8, 8) and t.labels.tolist() == [0, 0, 0, 1, 1, 1]
    task = load_task("image-folder", root=str(tmp_path), image_size=8, test_fraction=0.34)
    assert len(task.train) + len(task.test) == 6 and task.num_classes == 2
    small = load_task("image-folder", root=str(tmp_path), image_size=8, test_fraction=0.34,
                      train_size=2)  # fmt: skip
    assert len(small.train) == len(small.db) == 2 and len(small.test) == len(task.test)


def test_image_folder_with_one_class_is_refused(tmp_path):
    pytest.importorskip("PIL")
    _make_folder(tmp_path, classes=("cat",))
    with pytest.raises(ValueError, match="has 1 class subfolder; classification needs at least 2"):
        load_task("image-folder", root=str(tmp_path), image_size=8)


def test_train_size_above_the_data_is_an_error(monkeypatch):
    import mrl.data.fashion_mnist as fm_mod
    from mrl.config import load_config
    from mrl.data import load_task_for

    def tiny(split, root=None, download=True, root_fallback=False):
        n = 20 if split == "train" else 10
        return ImageTensors(torch.zeros(n, 1, 4, 4, dtype=torch.uint8),
                            torch.arange(n) % 2, 2, (0.5,), (0.3,))  # fmt: skip

    monkeypatch.setattr(fm_mod, "load_fashion_mnist", tiny)
    assert len(load_task_for(load_config(None, ["data.train_size=20"])).train) == 20
    assert len(load_task("fashion-mnist", train_size=100).train) == 20  # the API: at most
    with pytest.raises(ValueError, match=r"data.train_size must be <= 20 .*fashion-mnist\), "
                       r"got data.train_size=100"):  # fmt: skip
        load_task_for(load_config(None, ["data.train_size=100"]))
    # a saved run is read back as it was trained (the loader gives at most what there is)
    assert len(load_task_for(load_config(None, ["data.train_size=100"]), saved=True).train) == 20


def test_image_folder_errors(tmp_path):
    pytest.importorskip("PIL")
    from mrl.data.image_folder import ImageFolder

    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "one.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"one.png' is a file, not a folder"):
        ImageFolder(tmp_path / "one.png")
    (tmp_path / "one.png").unlink()
    with pytest.raises(ValueError, match="has no class subfolders"):
        ImageFolder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="has no images"):
        ImageFolder(tmp_path)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolder(tmp_path)
    with pytest.raises(ValueError, match="unreadable image file .*broken.png"):
        ds[0]


def test_image_folder_skips_hidden_entries_and_refuses_empty_classes(tmp_path):
    pytest.importorskip("PIL")
    from mrl.data.image_folder import ImageFolder

    _make_folder(tmp_path)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "cat" / "._0.png").write_bytes(b"macOS resource fork")
    (tmp_path / "cat" / ".thumbs").mkdir()
    (tmp_path / "cat" / ".thumbs" / "t.png").write_bytes(b"x")
    ds = ImageFolder(tmp_path, image_size=8)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6  # hidden folder and files are not data
    (tmp_path / "bird").mkdir()
    with pytest.raises(ValueError, match=r"class subfolders \['bird'\] hold no images"):
        ImageFolder(tmp_path, image_size=8)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, mode):
    pytest.importorskip("PIL")
    from PIL import Image

    from mrl.data.image_folder import ToTensor

    ramp = np.linspace(0, 1, 16).reshape(4, 4)  # 0 .. 1 in 16 steps
    if mode == "F":
        img = Image.fromarray(ramp.astype(np.float32), mode="F")
    else:
        img = Image.fromarray((ramp * 65535).astype(np.uint16)).convert(mode)
    assert img.mode == mode
    for channels in (1, 3):
        x = ToTensor(channels)(img)
        expect = torch.from_numpy(np.rint(ramp * 255).astype(np.uint8))
        assert x.shape == (channels, 4, 4)
        assert (x.int() - expect.int()).abs().max() <= 1  # PIL's clip gave 255 from the 2nd step


def test_unknown_task():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_task("mnist")


def test_augment_slices_follow_the_global_stream():
    x = make_synthetic(n=8, size=6).images
    whole = augment(x, torch.Generator().manual_seed(1), flip=True, crop_pad=1)
    halves = [
        augment(x[r * 4 : (r + 1) * 4], torch.Generator().manual_seed(1), flip=True, crop_pad=1,
                total=8, offset=4 * r)
        for r in (0, 1)
    ]  # fmt: skip
    assert torch.equal(torch.cat(halves), whole)
    with pytest.raises(ValueError, match="offset=6 does not fit"):
        augment(x[:4], torch.Generator(), flip=True, total=8, offset=6)


def test_fashion_mnist_1k_passes_root_fallback_on(monkeypatch):
    # A saved 1k run whose data.root copy was deleted must fall back to the default location
    # (as a fashion-mnist run does) instead of trying to download into the stale path.
    import mrl.data.fashion_mnist_1k as fm1k

    seen = []

    def tiny(split, root=None, download=True, root_fallback=False):
        seen.append(root_fallback)
        return ImageTensors(torch.zeros(20, 1, 28, 28, dtype=torch.uint8), torch.arange(20) % 10,
                            10, (0.5,), (0.3,))  # fmt: skip

    monkeypatch.setattr(fm1k, "load_fashion_mnist", tiny)
    load_task("fashion-mnist-1k", root="/gone", train_size=50, root_fallback=True)
    assert seen == [True, True]


def test_image_folder_fingerprint_follows_the_files(tmp_path):
    pytest.importorskip("PIL")
    from mrl.data.image_folder import ImageFolder

    _make_folder(tmp_path / "a")
    first = ImageFolder(tmp_path / "a").fingerprint()
    assert first.startswith("6 files, sha256 ")
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same files elsewhere: same data
    assert ImageFolder(tmp_path / "b").fingerprint() == first
    assert load_task("image-folder", root=str(tmp_path / "b"), image_size=8,
                     train_size=3).fingerprint == first
    (tmp_path / "b" / "dog" / "0.png").rename(tmp_path / "b" / "cat" / "9.png")
    assert ImageFolder(tmp_path / "b").fingerprint() != first


def test_image_folder_warns_about_files_it_skips(tmp_path, recwarn):
    """A .jfif (a JPEG by another name) or notes beside the images: said, never silently lost;
    hidden files stay quiet."""
    pytest.importorskip("PIL")
    from mrl.data.image_folder import ImageFolder

    _make_folder(tmp_path)
    (tmp_path / "cat" / "x.jfif").write_bytes(b"jpeg bytes")
    (tmp_path / "cat" / "._0.png").write_bytes(b"macOS resource fork")
    with pytest.warns(UserWarning, match=r"skipped 1 files with other extensions .*cat/x\.jfif"):
        ds = ImageFolder(tmp_path, image_size=8)
    assert len(ds) == 6
    (tmp_path / "cat" / "x.jfif").unlink()
    recwarn.clear()
    ImageFolder(tmp_path, image_size=8)
    assert not [w for w in recwarn if "skipped" in str(w.message)]


def test_image_folder_split_layout_keeps_its_splits(tmp_path):
    """root/train + root/val (ImageNet's layout) is two splits of the same classes, not a
    2-class problem "train" vs "val"; the test split does not depend on the seed."""
    pytest.importorskip("PIL")
    _make_folder(tmp_path / "train", per_class=4)
    _make_folder(tmp_path / "val", per_class=2)
    tasks = [load_task("image-folder", root=str(tmp_path), image_size=8, seed=s) for s in (0, 1)]
    for task in tasks:
        assert task.num_classes == 2 and (len(task.train), len(task.test)) == (8, 4)
        assert task.test.labels.tolist() == [0, 0, 1, 1] and task.test.mean == task.train.mean
        fp = task.fingerprint
        assert fp.startswith("train/: 8 files") and "val/: 4 files" in fp
    assert torch.equal(tasks[0].test.images, tasks[1].test.images)
    # the split's test images are the val/ files, decoded as a plain folder would decode them
    from mrl.data.image_folder import ImageFolder

    assert torch.equal(tasks[0].test.images, ImageFolder(tmp_path / "val", image_size=8)
                       .load_tensors().images)  # fmt: skip


def test_image_folder_split_layout_errors(tmp_path):
    pytest.importorskip("PIL")
    _make_folder(tmp_path / "a" / "train")
    _make_folder(tmp_path / "a" / "test", classes=("cat", "cow"))
    with pytest.raises(ValueError, match=r"same class subfolders; only in train/: \['dog'\], "
                       r"only in test/: \['cow'\]"):  # fmt: skip
        load_task("image-folder", root=str(tmp_path / "a"), image_size=8)
    for root, third in ((tmp_path / "b", "extra"), (tmp_path / "c", "test")):
        for split in ("train", "val"):
            _make_folder(root / split)
        _make_folder(root / third, classes=("x",))
    with pytest.raises(ValueError, match=r"holds split folders \(train/, val/\) and also "
                       r"\['extra'\]"):  # fmt: skip
        load_task("image-folder", root=str(tmp_path / "b"), image_size=8)
    with pytest.warns(UserWarning, match="val/ is the test split; test/ not read"):
        task = load_task("image-folder", root=str(tmp_path / "c"), image_size=8)
    assert len(task.test) == 6
    for held_out in ("valid", "validation"):  # other common names of the held-out split
        root = tmp_path / held_out
        _make_folder(root / "train")
        _make_folder(root / held_out, per_class=1)
        task = load_task("image-folder", root=str(root), image_size=8)
        assert task.num_classes == 2 and (len(task.train), len(task.test)) == (6, 2)
    _make_folder(tmp_path / "e" / "train" / "cat")  # train/ of folders beside an unknown dev/
    _make_folder(tmp_path / "e" / "dev")
    with pytest.warns(UserWarning, match=r"read as classes \['dev', 'train'\], although train/ "
                      r"holds folders; if it is a split, name the held-out one val or valid"):
        assert load_task("image-folder", root=str(tmp_path / "e"), image_size=8).num_classes == 2
    # classes that happen to be called train and val (images directly inside): classes
    _make_folder(tmp_path / "d", classes=("train", "val"))
    task = load_task("image-folder", root=str(tmp_path / "d"), image_size=8, test_fraction=0.34)
    assert task.num_classes == 2 and len(task.train) + len(task.test) == 6


def test_read_idx_header_whose_size_overflows_int64_is_named(tmp_path):
    """A shape whose product passes 2**63 wrapped in np.prod ("promises -8589934591 bytes")."""
    for shape in ((2**31, 2**31, 2**31), (2**32 - 1, 2**32 - 1)):
        header = bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
        (tmp_path / "x.idx").write_bytes(header)
        with pytest.raises(ValueError, match=r"corrupt data file .*x.idx: header promises "
                                             rf"{np.prod(shape, dtype=object)} data bytes"):
            fm.read_idx(tmp_path / "x.idx")


def test_fashion_mnist_label_files_must_hold_uint8_labels(tmp_path):
    _fake_fashion_mnist(tmp_path, n_train=20, n_test=10)
    label_file = fm.FILES["test"][1]
    _write_idx(tmp_path / label_file, np.full(10, 3.7, np.float32), code=0x0D)
    counts = {k: (v[0], v[1], 20 if k == "train" else 10) for k, v in fm.FILES.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fm, "FILES", counts)
        with pytest.raises(ValueError, match=r"expected 10 uint8 labels in 0..9, got float32"):
            fm.load_fashion_mnist("test", root=tmp_path, download=False)
        train = fm.load_fashion_mnist("train", root=tmp_path, download=False)
        assert train.labels.tolist()[:3] == [0, 1, 2]


def test_image_folder_warns_about_images_outside_every_class_folder(tmp_path):
    pytest.importorskip("PIL")
    import warnings

    from mrl.data.image_folder import ImageFolder

    _make_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(ImageFolder(tmp_path)) == 6
    (tmp_path / "mystery.JPG").write_bytes(b"x")
    with pytest.warns(UserWarning, match=r"1 images lie in the root.*mystery.JPG.*not used"):
        assert len(ImageFolder(tmp_path)) == 6


@pytest.mark.parametrize(("n", "batch", "world", "last"), [
    (10, 4, 2, [1, 1]), (11, 4, 2, [2, 1]), (13, 8, 4, [2, 1, 1, 1]), (14, 8, 4, [2, 2, 1, 1]),
    (11, 8, 4, []), (16, 8, 4, []),
])
def test_a_partial_last_batch_is_split_evenly_or_dropped_across_processes(n, batch, world, last):
    """drop_last=False gave rank 1 an empty last batch (N=10, batch 4, 2 processes), or one
    process a batch the others lacked: every process must yield the same number of batches."""
    data = make_synthetic(n=n)
    whole = [y for _, y in iterate_batches(data, batch, seed=0, epoch=0, drop_last=False)]
    parts = [[y for _, y in iterate_batches(data, batch, seed=0, epoch=0, rank=r,
                                            world_size=world, drop_last=False)]
             for r in range(world)]  # fmt: skip
    full = n // batch
    assert [len(p) for p in parts] == [full + bool(last)] * world  # the same number everywhere
    for i in range(full):  # full batches: each process its slice, together the global batch
        assert [len(p[i]) for p in parts] == [batch // world] * world
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
    if last:  # the partial batch: split evenly, together the same rows
        assert [len(p[full]) for p in parts] == last
        assert torch.equal(torch.cat([p[full] for p in parts]), whole[full])
