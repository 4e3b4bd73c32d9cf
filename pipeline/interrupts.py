"""One-line Ctrl-C/SIGTERM exits while a command is still starting (before anything heavy loads).

Importing torch, mlflow and optuna takes seconds; an interrupt then used to print a long
traceback of half-loaded modules (once a segfault). Until a command has finished its imports and
installed its own handling (`cli.handled`), an interrupt prints one line and leaves with
`os._exit` (no finalisers run over half-initialised modules): 130 for Ctrl-C, 143 for SIGTERM.
Nothing has been written at that point, so there is nothing to clean up.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def _leave_at_once(signum: int, frame: FrameType | None) -> None:
    sig = signal.Signals(signum)
    os.write(2, f"interrupted ({NAMES[sig]}) while starting: nothing was changed\n".encode())
    os._exit(EXIT_CODES[sig])


def install_early_handlers() -> None:
    """Make Ctrl-C and SIGTERM exit at once with one line (until a command replaces the handlers)."""
    for sig in EXIT_CODES:
        signal.signal(sig, _leave_at_once)
