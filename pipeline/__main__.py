"""`python -m pipeline ...`: the same as the `sweep` command (workers and tests launch it so)."""

from pipeline.cli import main

main()
