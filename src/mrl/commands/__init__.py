"""Subcommands of the `mrl` CLI, one module each (see `mrl.cli`)."""
