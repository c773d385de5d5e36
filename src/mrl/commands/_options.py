"""Checks of command-line numbers shared by the subcommands (a helper, not a subcommand: `mrl.cli`
skips modules whose name starts with "_"). The error names the flag as the user typed it
(``--batch-size``), not the library parameter it becomes (``batch_size``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

__all__ = ["check_minimums"]


def check_minimums(args: argparse.Namespace, minimums: Iterable[tuple[str, int]]) -> None:
    """Refuse ``args.<name> < low`` for each (name, low); a None value is an unset option."""
    for name, low in minimums:
        value = getattr(args, name)
        if value is not None and value < low:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= {low}, got {flag} {value}")
