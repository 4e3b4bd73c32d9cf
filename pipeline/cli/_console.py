"""The terminal consoles of the command line, safe against a reader that goes away."""

from __future__ import annotations

import os
import sys

from rich.console import Console


class PipeSafeConsole(Console):
    """A console whose reader may go away (`sweep run | head -2`, a closed ssh log pipe): from the
    first write to a closed pipe on, this console is quiet, its stream goes to /dev/null and the
    command carries on, so the study and its report still finish. (Rich's default, which its
    docs invite subclasses to change, ends the program with exit 1 and no message.)"""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        stream = sys.stderr if self.stderr else sys.stdout
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # the interpreter's last flush must not fail either
        os.close(devnull)
