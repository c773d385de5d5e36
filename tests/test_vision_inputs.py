"""Vision data and evaluation: "~" in data.root, folders a failed download made, the run's seed
on every record of the Python API, linked class subfolders, pixel statistics in chunks, and the
fashion-mnist-1k database drawn apart from the training stream."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mrl import Nesting
from mrl.config import DataConfig


def test_a_tilde_in_data_root_is_the_home_folder():
    """The shell leaves "--set data.root=~/x" alone: a folder called "~" appeared in the
    working folder (and online, 30 MB downloaded into it)."""
    assert DataConfig(root="~/fm").root == os.path.expanduser("~/fm")
    assert DataConfig(root="/abs/fm").root == "/abs/fm"


def test_a_failed_download_leaves_none_of_the_folders_it_made(tmp_path, monkeypatch):
    from mrl.data import fashion_mnist as fm

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(fm.urllib.request, "urlopen", offline)
    target = tmp_path / "a" / "b" / "c"
    with pytest.raises(FileNotFoundError, match="downloading into it failed"):
        fm.find_fashion_mnist(target, download=True)
    assert list(tmp_path.iterdir()) == []  # was: a/b left behind, only c removed


def test_evaluate_embeddings_labels_records_with_the_runs_seed():
    """The Python API's retrieval records said seed 0 for every run (the heads' said none):
    two seeds' records appended to one file replaced each other."""
    from mrl.commands.eval import RunEmbeddings, evaluate_embeddings

    g = torch.Generator().manual_seed(0)
    nest = Nesting((4, 8))
    db, test = torch.randn(40, 8, generator=g), torch.randn(10, 8, generator=g)
    e = RunEmbeddings("run", "mrl", nest, nest, 3, db, torch.arange(40) % 3, test,
                      torch.arange(10) % 3, torch.randn(2, 10, 3, generator=g),
                      config=SimpleNamespace(seed=3))  # fmt: skip
    recs = evaluate_embeddings(e, baselines=False)
    assert {r["seed"] for r in recs} == {3}
    assert {r["seed"] for r in evaluate_embeddings(e, baselines=False, seed=7)} == {7}


def test_a_linked_class_subfolder_is_read(tmp_path):
    """rglob does not follow links to folders (Python 3.11): 5 of 8 'cat' images were dropped
    without a warning; a link back up the tree is walked once."""
    from PIL import Image

    from mrl.data.image_folder import ImageFolder

    def images(folder, n):
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")

    root = tmp_path / "data"
    images(root / "cat", 3)
    images(tmp_path / "extra", 5)
    (root / "cat" / "more").symlink_to(tmp_path / "extra", target_is_directory=True)
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    images(root / "dog", 4)
    ds = ImageFolder(root, image_size=8)
    labels = [label for _, label in ds.samples]
    assert labels.count(0) == 8 and labels.count(1) == 4


def test_pixel_stats_in_chunks_match_the_whole_set():
    from mrl.data.image_folder import pixel_stats

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (37, 3, 5, 7), generator=g, dtype=torch.uint8)
    pixels = images.float().div(255).transpose(0, 1).reshape(3, -1)  # the plain reference
    mean, std = pixel_stats(images)
    np.testing.assert_allclose(mean, pixels.mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(1).numpy(), rtol=1e-5)
    flat = torch.full((4, 1, 3, 3), 7, dtype=torch.uint8)
    assert pixel_stats(flat)[1] == (1e-3,)  # no spread: the floor


def test_the_1k_database_is_not_a_training_epoch():
    """The database was drawn with generator seed `seed + 1` = `epoch_generator(0, 1)`: with
    seed 0 the second epoch's first 50k training triples were exactly the database's."""
    from mrl.data.fashion_mnist_1k import database_seed
    from mrl.data.tensors import epoch_generator

    streams = {int(epoch_generator(s, e).initial_seed()) for s in range(3) for e in range(50)}
    assert not {database_seed(s) for s in range(3)} & streams
    assert len({database_seed(s) for s in range(100)}) == 100  # one database per seed


def test_config_errors_name_the_key_and_suggest_inside_sections():
    from mrl.config import config_from_dict, load_config

    with pytest.raises(ValueError, match=r"model.nesting_weights=\[1.0, 2.0, 3.0\]: weights"):
        load_config(None, ["model.nesting_weights=[1,2,3]"]).model.get_nesting()
    with pytest.raises(ValueError, match=r"'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        config_from_dict({"optim": {"lrr": 0.1}})  # a file's section: no hint before
    with pytest.raises(ValueError, match=r"'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(None, ["optim.lrr=0.1"])


def test_report_files_and_tables_keep_unusual_names(tmp_path):
    """Metrics p@10 and p_at_10 wrote one PNG (the second over the first); a line break in a
    method name split its table row, and the HTML report lost the name."""
    pytest.importorskip("matplotlib")
    from mrl.records import make_record, to_markdown
    from mrl.report import write_report

    recs = [make_record(m, p, met, 0.5 + p / 100) for m in ("mrl", "two\nlines")
            for met in ("p@10", "p_at_10") for p in (8, 16)]  # fmt: skip
    paths = write_report(recs, tmp_path / "r", title="t")
    assert paths["p@10"] != paths["p_at_10"] and paths["p@10"].is_file()
    assert paths["p_at_10"].is_file()
    table = to_markdown(recs, "p@10")
    assert "| two lines | p@10 |" in table and len(table.splitlines()) == 4
    assert "two lines" in paths["html"].read_text()


def test_reproduce_refuses_1k_records_of_the_earlier_database(tmp_path):
    """Records scored against the old fashion-mnist-1k database (seed 0's second epoch) must
    not be averaged with new ones in one results file: they carry db_draw now."""
    import json

    from mrl.commands.reproduce import reproduce
    from mrl.data import load_task
    from mrl.records import load_records, make_record, save_records

    tiny = ("data.dataset=synthetic", "model.dim=16", "model.width=4", "model.nesting=2,4,8,16",
            "batch_size=64", "eval_batch_size=256", "data.train_size=256", "epochs=1")  # fmt: skip
    kw = dict(overrides=tiny, progress=False, data_task=load_task("synthetic", train_size=256),
              log=lambda s: None, only=("mrl",))  # fmt: skip
    recs = reproduce("fashion-mnist-1k", "small", tmp_path / "a", **kw)
    assert {r.get("db_draw") for r in recs} == {2}
    assert {r.get("db_draw") for r in load_records(tmp_path / "a" / "results.json")} == {2}
    old = tmp_path / "b"
    old.mkdir()
    save_records(old / "results.json", [make_record("mrl", 8, "1nn", 40.0, seed=0,
                                                    dataset="fashion-mnist-1k")])  # fmt: skip
    with pytest.raises(ValueError, match="scored against the earlier database"):
        reproduce("fashion-mnist-1k", "small", old, **kw)
    assert json.loads((old / "results.json").read_text())  # left as it was


def test_join_checks_rank_and_world_size_first(monkeypatch):
    """RANK=5 of WORLD_SIZE=2 failed inside gloo (rank 0 waited until killed); WORLD_SIZE=abc
    was "invalid literal for int()" naming nothing."""
    from mrl.distributed import RankError, join

    for env, says in (({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 and WORLD_SIZE=2 need"),
                      ({"RANK": "0", "WORLD_SIZE": "abc"}, "WORLD_SIZE must be an integer"),
                      ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 and WORLD_SIZE=1 need")):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(RankError, match=says):
            join("cpu")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert join("cpu").world_size == 1
