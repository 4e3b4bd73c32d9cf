"""The `sweep` console entry point: interrupt handlers first, then the CLI's heavy imports."""

from __future__ import annotations

from pipeline.core import install_early_handlers


def main() -> None:
    """`sweep ...` and `python -m pipeline ...`: the one-line interrupt handlers are installed
    before typer, torch and MLflow are imported, then the typer app runs."""
    install_early_handlers()
    from pipeline.cli._commands import app

    app()
