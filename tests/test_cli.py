import subprocess
import sys
from pathlib import Path

import pytest

from mrl import cli


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: mrl" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert "mrl 0.1.0" in capsys.readouterr().out


def test_every_command_module_has_the_interface_and_help():
    modules = list(cli._command_modules())
    names = [m.NAME for m in modules]
    assert len(names) == len(set(names)), f"duplicate command names: {names}"
    for m in modules:
        assert isinstance(m.HELP, str) and m.HELP, m.__name__
        assert callable(m.add_arguments) and callable(m.run), m.__name__
    parser = cli.build_parser()
    for name in names:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0


def test_console_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "mrl.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "COMMAND" in out.stdout


def test_closed_pipe_is_quiet():
    # `mrl train --show-config | head -1`: the reader leaves before mrl writes; no traceback
    proc = subprocess.Popen([sys.executable, "-m", "mrl.cli", "train", "--show-config"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # before the child (still importing) prints anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_other_broken_pipes_are_errors(monkeypatch, capsys):
    # a BrokenPipeError that is not stdout's (a socket, a subprocess) is reported, not hidden
    import mrl.commands.search as search_cmd

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(search_cmd, "run", broken)
    assert cli.main(["search", "idx", "q.npy"]) == 2
    assert "mrl search: error: [Errno 32] Broken pipe" in capsys.readouterr().err


def test_warnings_are_one_line_naming_the_command():
    code = ("import warnings, mrl.commands.search as s\n"
            "s.run = lambda args: warnings.warn('3 of 9 texts are truncated') or 0\n"
            "from mrl.cli import main\n"
            "raise SystemExit(main(['search', 'idx', 'q.npy']))\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stderr == "mrl search: warning: 3 of 9 texts are truncated\n"


def test_multi_line_warnings_show_their_first_line(capsys):
    show = cli._one_line_warning("train")
    show(UserWarning("Grad strides do not match bucket view strides.\n  File x, line 3\n  y"),
         UserWarning, "f.py", 1)  # fmt: skip
    assert capsys.readouterr().err == (
        "mrl train: warning: Grad strides do not match bucket view strides. [...]\n")


def test_plugins_register_encoders_for_the_command(tmp_path, monkeypatch, capsys):
    """An encoder registered by a module named in MRL_PLUGINS trains from the command line."""
    import sys

    from mrl.cli import main

    (tmp_path / "my_encoders.py").write_text(
        "from torch import nn\n"
        "from mrl.models import register_encoder\n"
        "register_encoder('mine-test', lambda dim, in_channels, **kw: nn.Sequential(\n"
        "    nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(in_channels * 16, dim)))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MRL_PLUGINS", "my_encoders")
    sets = ["data.dataset=synthetic", "data.train_size=256", "model.name=mine-test",
            "model.dim=16", "model.nesting=4,8,16", "epochs=1", "batch_size=64"]  # fmt: skip
    argv = ["train", "configs/fashion-mnist.json", "--out", str(tmp_path / "run"), "--no-progress",
            *(f"--set={s}" for s in sets)]  # fmt: skip
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(argv) == 0
    monkeypatch.setenv("MRL_PLUGINS", "no_such_plugin_module")
    assert main(["train", "configs/fashion-mnist.json", "--out", str(tmp_path / "r2")]) == 2
    assert "MRL_PLUGINS: cannot import 'no_such_plugin_module'" in capsys.readouterr().err
    sys.modules.pop("my_encoders", None)


def test_torchrun_ranks_other_than_0_keep_one_line_errors_to_rank_0(monkeypatch, capsys):
    """Under torchrun every process meets the same bad input: rank 0 says it, once."""
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["text", "finetune", "--corpus", "cranfield", "--out", "x", "--lr", "-1"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["text", "finetune", "--corpus", "cranfield", "--out", "x", "--lr", "-1"]) == 2
    assert "mrl text: error: lr must be > 0, got -1.0" in capsys.readouterr().err
