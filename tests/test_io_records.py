import json
import os

import pytest

from mrl.io import atomic_open, atomic_write_json
from mrl.records import load_records, make_record, save_records, to_markdown


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write('{"v": 2')  # half-written
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left


def test_atomic_write_gives_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "r.json", {"v": 1})
        with open(tmp_path / "plain.txt", "w") as f:  # what a plain open() gives
            f.write("x")
    finally:
        os.umask(old)
    mode = (tmp_path / "r.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o640


def test_atomic_open_mode_checked(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        with atomic_open(tmp_path / "x", "a"):
            pass


def test_records_round_trip_and_append(tmp_path):
    path = tmp_path / "r" / "results.json"
    save_records(path, [make_record("mrl", 8, "1nn", 0.5, seed=0)])
    save_records(path, [make_record("mrl", 8, "1nn", 0.7, seed=1)], append=True)
    recs = load_records(path)
    assert [r["value"] for r in recs] == [0.5, 0.7]
    assert recs[1] == {"method": "mrl", "prefix": 8, "metric": "1nn", "value": 0.7, "seed": 1}
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())


def test_nonfinite_value_becomes_null():
    assert make_record("x", None, "m", float("nan"))["value"] is None


def test_validate_rejects_missing_keys(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"method": "a", "prefix": 1, "metric": "m"}]))
    with pytest.raises(ValueError, match=r"records\[0\] lacks keys \['value'\]"):
        load_records(path)
    os.remove(path)


def test_markdown_mean_and_std():
    recs = [make_record("mrl", 8, "1nn", v, seed=s) for s, v in enumerate([0.5, 0.7])]
    recs.append(make_record("ff", 16, "1nn", 0.9))
    table = to_markdown(recs)
    assert "| method | metric | 8 | 16 |" in table
    assert "| mrl | 1nn | 0.6000 ± 0.1414 |  |" in table
    assert "| ff | 1nn |  | 0.9000 |" in table
    pct = [make_record("mrl", 2, "top1", v, seed=s) for s, v in enumerate([69.0, 71.5, 74.0])]
    assert "| mrl | top1 | 71.5 ± 2.5 |" in to_markdown(pct)  # spread with the mean's decimals
    # one scale per row: a percent row shows 1.4, not 1.360 beside 88.6
    row = [make_record("mrl", m, "top1", v) for m, v in ((2, 1.36), (4, 8.7), (8, 88.6))]
    assert "| mrl | top1 | 1.4 | 8.7 | 88.6 |" in to_markdown(row)


def test_read_json_sidecar_errors(tmp_path):
    from mrl.io import read_json_sidecar

    with pytest.raises(FileNotFoundError, match=r"no thing at .* \(missing meta.json\)"):
        read_json_sidecar(tmp_path, "meta.json", "thing")
    (tmp_path / "meta.json").write_text('{"a": 1')
    with pytest.raises(ValueError, match="meta.json is truncated or not valid JSON"):
        read_json_sidecar(tmp_path, "meta.json", "thing")
    (tmp_path / "meta.json").write_text("[1]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        read_json_sidecar(tmp_path, "meta.json", "thing")
    (tmp_path / "meta.json").write_text('{"a": 1}')
    assert read_json_sidecar(tmp_path, "meta.json", "thing") == {"a": 1}


def test_check_output_path_names_the_parameter(tmp_path):
    from mrl.io import check_new_output_dir, check_output_path

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(FileExistsError, match=r"--out '.*afile/sub/x' is below '.*afile', which"):
        check_output_path(tmp_path / "afile" / "sub" / "x", "--out")
    with pytest.raises(FileExistsError, match=r"--out '.*afile' is a file; give a folder path"):
        check_output_path(tmp_path / "afile", "--out", "dir")
    with pytest.raises(FileExistsError, match=r"--out '.*adir' is a folder; give a file path"):
        check_output_path(tmp_path / "adir", "--out", "file")
    new = tmp_path / "new" / "x.json"
    assert check_output_path(new, "--out", "file") == new
    assert check_new_output_dir(tmp_path / "adir", "--out") == tmp_path / "adir"  # empty is fine
    (tmp_path / "adir" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        check_new_output_dir(tmp_path / "adir", "--out")


def test_atomic_output_dir_appears_whole_or_not_at_all(tmp_path):
    from mrl.io import atomic_output_dir

    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "model") as tmp:
            (tmp / "a.bin").write_text("half")
            raise RuntimeError("crash mid-save")
    assert list(tmp_path.iterdir()) == []  # no half folder, no temp folder
    (tmp_path / "model").mkdir()  # an empty folder may be the target
    with atomic_output_dir(tmp_path / "model") as tmp:
        (tmp / "a.bin").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (tmp_path / "model" / "a.bin").read_text() == "whole"


def test_load_npy_names_damaged_files(tmp_path):
    import numpy as np

    from mrl.io import load_npy

    np.save(tmp_path / "ok.npy", np.arange(6.0).reshape(2, 3))
    assert load_npy(tmp_path / "ok.npy").shape == (2, 3)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all, but long enough to look like one")
    with pytest.raises(ValueError, match=r"junk.npy' is not a .npy file \(no NumPy header\)"):
        load_npy(tmp_path / "junk.npy")
    raw = (tmp_path / "ok.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-8])
    with pytest.raises(ValueError, match=r"cut.npy' is not a readable .npy file"):
        load_npy(tmp_path / "cut.npy", mmap_mode="r")


def test_atomic_output_dir_keeps_finished_work_when_the_target_fills_meanwhile(tmp_path):
    from mrl.io import atomic_output_dir

    target = tmp_path / "model"
    with pytest.raises(FileExistsError, match=r"appeared \(not empty\) while writing; the "
                       r"finished output is kept in '.*\.model\..*\.tmp'"):  # fmt: skip
        with atomic_output_dir(target) as tmp:
            (tmp / "weights.bin").write_text("hours of work")
            target.mkdir()
            (target / "other.txt").write_text("someone else's")
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]
    assert len(kept) == 1 and (kept[0] / "weights.bin").read_text() == "hours of work"
    assert (target / "other.txt").read_text() == "someone else's"


def test_make_record_refuses_fractional_prefixes():
    from mrl.records import make_record

    assert make_record("mrl", 8.0, "top1", 0.5)["prefix"] == 8
    for bad in (8.7, 0, True):
        with pytest.raises(ValueError, match="prefix must be a positive whole number of dims"):
            make_record("mrl", bad, "top1", 0.5)


def test_first_line_of_an_exception():
    from mrl.io import first_line

    assert first_line(RuntimeError("\n  bad thing\n  at frame 3\n")) == "bad thing"
    assert first_line(KeyError()) == "KeyError"


def test_load_records_names_the_file_and_checks_prefix_method_metric(tmp_path):
    """A damaged results.json: the JSON error named no file; "prefix": "8" passed and crashed the
    table (str < int) after a whole `text compare --append` had run."""
    path = tmp_path / "results.json"
    path.write_text("{bad json")
    with pytest.raises(ValueError, match=r"results.json is not a JSON file of result records"):
        load_records(path)
    for field, value in (("prefix", "8"), ("prefix", 8.5), ("method", 3), ("metric", None)):
        rec = {"method": "mrl", "prefix": 8, "metric": "1nn", "value": 0.5, field: value}
        path.write_text(json.dumps([rec]))
        with pytest.raises(ValueError, match=rf"results.json: records\[0\] {field} must be"):
            load_records(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{**rec, "metric": "1nn"}]).encode())
    assert load_records(path)[0]["metric"] == "1nn"  # a BOM (a Windows editor) is read
