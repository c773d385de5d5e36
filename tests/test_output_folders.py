"""Commands that may write into a folder again (reports, training runs) never write into a
folder of a user's other files (`mrl.io.check_output_dir_of`)."""

from __future__ import annotations

import pytest

from mrl.cli import main
from mrl.io import REPORT_FILES, check_output_dir_of


def test_check_output_dir_of(tmp_path):
    assert check_output_dir_of(tmp_path / "new", "--out", REPORT_FILES, "a report folder")
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".DS_Store").write_text("")
    check_output_dir_of(tmp_path / "hidden", "--out", REPORT_FILES, "a report folder")
    own = tmp_path / "own"
    own.mkdir()
    (own / "results.json").write_text("[]")
    (own / "notes.txt").write_text("mine")
    check_output_dir_of(own, "--out", REPORT_FILES, "a report folder")  # a report: rewritten
    other = tmp_path / "other"
    other.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (other / name).write_text("mine")
    with pytest.raises(FileExistsError, match=r"--out '.*other' is a folder of other files "
                       r"\(a.txt, b.txt, c.txt, \.\.\.\), not a report folder \(none of "
                       r"results.json, results.md, report.html\); choose a new folder"):
        check_output_dir_of(other, "--out", REPORT_FILES, "a report folder")


@pytest.mark.parametrize(
    "argv, what",
    [
        (["train", "configs/fashion-mnist.json"], "a training run folder"),
        (["demo"], "a demo folder"),
        (["reproduce", "fashion-mnist"], "a reproduction folder"),
        (["text", "compare", "--dataset", "cranfield"], "a report folder"),
        (["eval", "default", "--dataset", "cranfield"], "a report folder"),
    ],
)
def test_commands_refuse_a_folder_of_other_files(tmp_path, capsys, argv, what):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "a.txt").write_text("the user's file")
    assert main([*argv, "--out", str(folder)]) == 2
    assert f"is a folder of other files (a.txt), not {what}" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt"]


def test_eval_refuses_a_folder_of_other_files(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")  # checked after the --out folder
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "results.txt").write_text("the user's file")
    assert main(["eval", str(run), "--out", str(folder)]) == 2
    assert "is a folder of other files (results.txt), not a report folder" in (
        capsys.readouterr().err)  # fmt: skip


def test_eval_of_a_file_names_the_file(tmp_path, capsys):
    (tmp_path / "db.npy").write_bytes(b"x")
    assert main(["eval", str(tmp_path / "db.npy")]) == 2
    err = capsys.readouterr().err
    assert "db.npy' is a file, not a run folder (or its checkpoint.pt)" in err, err


def test_eval_of_a_text_model_refuses_probe_iter(capsys):
    assert main(["eval", "default", "--probe-iter", "0"]) == 2
    assert "--probe-iter is for image runs" in capsys.readouterr().err


def test_train_tells_its_config_from_a_models(tmp_path, capsys):
    """A Hugging Face model folder has a config.json too: training would overwrite it."""
    import json

    from mrl.commands.train import _holds_a_train_config
    from mrl.config import load_config

    model = tmp_path / "st-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (model / "model.safetensors").write_bytes(b"weights")
    assert main(["train", "configs/fashion-mnist.json", "--out", str(model)]) == 2
    assert "not a training run folder" in capsys.readouterr().err
    assert json.loads((model / "config.json").read_text()) == {"architectures": ["BertModel"]}
    run = tmp_path / "run"  # another process's run being created: its config.json is ours
    run.mkdir()
    (run / "config.json").write_text(json.dumps(load_config("configs/fashion-mnist.json")
                                                .to_dict()))  # fmt: skip
    assert _holds_a_train_config(run) and not _holds_a_train_config(model)
    (run / "config.json").write_text("{not json")
    assert not _holds_a_train_config(run)


@pytest.mark.parametrize(
    "argv, made_by, marker",
    [
        (["eval", "RUN"], "reproduce", "runs"),  # a reproduction's results.json: every seed's
        (["eval", "default", "--dataset", "cranfield"], "demo", "runs"),
        (["text", "compare", "--dataset", "cranfield"], "reproduce", "runs"),
        (["reproduce", "fashion-mnist"], "eval", None),  # its records would be pooled
        (["demo"], "reproduce", "claims.md"),
    ],
)
def test_a_command_refuses_another_commands_report_folder(tmp_path, capsys, argv, made_by,
                                                           marker):
    """Report folders share results.json: `mrl eval RUN --out <a reproduction>` replaced all of
    its seeds' records with the one run's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "results.json").write_text("[]")
    if made_by == "reproduce":
        (folder / "runs").mkdir()
        (folder / "claims.md").write_text("claims")
        (folder / "recipe.json").write_text("{}")
    elif made_by == "demo":
        (folder / "runs").mkdir()
        (folder / "demo.md").write_text("demo")
    argv = [str(run) if a == "RUN" else a for a in argv]
    assert main([*argv, "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    if marker is None:
        assert "is a folder of other files (results.json), not a reproduction folder" in err
    else:
        assert f"holds {marker}: it is another command's folder" in err, err
    assert (folder / "results.json").read_text() == "[]"
