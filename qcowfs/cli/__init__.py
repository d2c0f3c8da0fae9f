"""The command line: commands, their output (text, JSON, progress), the live-mount client.

`main` is the entry point (pyproject's `qcowfs` script, `python -m qcowfs`)."""

from .main import main

__all__ = ["main"]
