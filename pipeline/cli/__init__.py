"""The command line: typer commands (`_commands`), the live progress display (`_display`) and
the console entry point (`_entry`). Each command parses, wires one stage and prints one line per
outcome; errors map to exit codes there and nowhere else.

`main` is light to import (the entry point installs interrupt handlers before the heavy imports);
`app`, the typer application, is loaded on first use.
"""

from __future__ import annotations

from typing import Any

from pipeline.cli._entry import main

__all__ = ["app", "main"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from pipeline.cli._commands import app

        return app
    raise AttributeError(f"module 'pipeline.cli' has no attribute {name!r}")
