"""The `sweep` console entry point: interrupt handlers first (`pipeline.interrupts`), then the CLI."""

from __future__ import annotations

from pipeline.interrupts import install_early_handlers


def main() -> None:
    """`sweep ...`: early handlers first, then the typer app."""
    install_early_handlers()
    from pipeline.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
