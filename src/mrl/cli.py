"""The `mrl` command line: a thin dispatcher over `mrl.commands`.

Each module in `mrl.commands` defines ``NAME`` (the subcommand, e.g. ``"demo"`` or ``"index"``),
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Modules import heavy
dependencies inside ``run`` so that ``mrl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mrl import __version__, commands
from mrl.io import first_line


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        yield importlib.import_module(f"mrl.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrl",
        description="Matryoshka Representation Learning: train, evaluate, index and serve "
        "nested embeddings.",
    )
    parser.add_argument("--version", action="version", version=f"mrl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _stdout_closed() -> bool:
    """True when stdout is a pipe whose reader has gone (poll reports an error on it)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if not hasattr(select, "poll"):  # Windows: assume the pipe was stdout
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning(args.command)
    try:
        _import_plugins()
        with _sigterm_raises():
            code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except BrokenPipeError as exc:
        if not _stdout_closed():  # another pipe or socket broke: a real error
            print(f"mrl {args.command}: error: {exc}", file=sys.stderr)
            return 2
        # `mrl search ... | head`: the reader left. Quiet, as Unix tools are; stdout goes to
        # devnull so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, ConnectionError) as exc:
        # Bad input: one clear line, no traceback. Bugs (other exceptions) keep their traceback.
        # under torchrun every process has the same error: say it once; except one only this
        # process can have (its RANK), which rank 0 never prints
        if _first_process() or getattr(exc, "every_process", False):
            print(f"mrl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (`Terminated`)
        # Temporary files were removed on the way out (the clean-ups ran); no traceback.
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        if _first_process():
            print(f"mrl {args.command}: {what}{_resume_hint(args)}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except OSError as exc:
        # The machine, not the input: a full disk, a read-only or unwritable place. What was
        # written before is intact (writes are atomic); one line says which file and why.
        print(f"mrl {args.command}: error: {first_line(exc)}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown


def _first_process() -> bool:
    """Not a torchrun process other than rank 0 (whose one-line messages would repeat rank 0's)."""
    return os.environ.get("RANK", "0") == "0"


PLUGINS_ENV = "MRL_PLUGINS"


def _import_plugins() -> None:
    """Import the modules named in $MRL_PLUGINS (comma-separated), so that what they register
    (e.g. `mrl.models.register_encoder("mine", ...)`) exists for the command: a registration
    lives only in the process that made it."""
    import importlib

    for name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the plugin was found; something it imports is missing
                raise ImportError(
                    f"{PLUGINS_ENV}: plugin {name!r} failed to import: {exc}"
                ) from exc
            raise ImportError(f"{PLUGINS_ENV}: cannot import {name!r} ({exc}); is its folder "
                              "on PYTHONPATH?") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a timeout, ``docker stop``, Slurm preemption). Raised in the main thread
    like Ctrl-C, so that ``finally`` and ``except BaseException`` clean-ups run (the default
    action kills the process at once and leaves checkpoint-sized temporary files behind)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` while a command runs (main thread only: Python installs
    signal handlers nowhere else); the previous handler is restored after."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave it as it is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resume_hint(args: argparse.Namespace) -> str:
    """What to run after an interruption ("" when the command just starts again)."""
    if args.command == "text" and getattr(args, "text_command", None) == "finetune":
        from mrl.text.checkpoint import checkpoint_file

        path = checkpoint_file(args.out)
        if path.is_file():
            return (f"; resume with the same command plus --resume (the last checkpoint, "
                    f"{_checkpoint_step(path)}is in {path.parent})")
        return "; no checkpoint was written yet: run the same command again to start over"
    if args.command == "train" and getattr(args, "out", None):
        from mrl.train import CHECKPOINT

        if not (Path(args.out) / CHECKPOINT).is_file():  # stopped within the first epoch
            return ("; no epoch finished, so there is no checkpoint: run the same command "
                    "again to start over")
    return _RESUME_HINTS.get(args.command, "")


def _checkpoint_step(path: Path) -> str:
    """``"step K, "`` of a text fine-tune checkpoint (memory-mapped: only that entry is read),
    or "" when it cannot be read."""
    try:
        import torch

        return f"step {int(torch.load(path, mmap=True, weights_only=True)['step'])}, "
    except Exception:  # noqa: BLE001  (a hint only: never fail the interruption message)
        return ""


# What to run after an interruption, by command.
_RESUME_HINTS = {
    "train": "; resume with the same command plus --resume (the last finished epoch is kept)",
    "reproduce": "; run the same command again to continue (finished runs are kept)",
}


def _one_line_warning(command: str):
    """Warnings as one line naming the command (the default also prints the source line of
    the ``warnings.warn`` call, which tells a CLI user nothing)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        kind = "" if category is UserWarning else f" ({category.__name__})"
        # Library warnings can span many lines (torch's DDP stride warning prints a stack):
        # the first line says what happened.
        lines = str(message).strip().splitlines() or [""]
        more = " [...]" if len(lines) > 1 else ""
        print(f"mrl {command}: warning{kind}: {lines[0]}{more}", file=file or sys.stderr)

    return show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
