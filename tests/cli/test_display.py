"""What `sweep run` prints without a terminal (CI logs, nohup): the pre-flight scan as two lines
(start, and the end with its rate), trial and epoch lines; `--quiet` keeps only the results."""

from __future__ import annotations

import io
import re

from rich.console import Console

from pipeline.cli._display import ProgressDisplay


def lines(quiet: bool) -> list[str]:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    with ProgressDisplay(3, quiet=quiet, console=console) as display:
        for done in range(1, 501):
            display.images_scanned(done, 500)
        display.message("a study message")
    return buffer.getvalue().splitlines()


def test_the_scan_without_a_terminal_is_a_start_and_an_end_line():
    start, end, message = lines(quiet=False)
    assert start == "scanning 500 image files (each decoded once)"
    assert re.fullmatch(r"scanned 500 image files in \d+\.\d s \(\d+ files/s\)", end), end
    assert message == "a study message"


def test_quiet_keeps_the_messages_only():
    assert lines(quiet=True) == ["a study message"]
