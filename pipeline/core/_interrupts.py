"""One-line Ctrl-C/SIGTERM exits while a command is still starting (before anything heavy loads).

Importing torch, mlflow and optuna takes seconds; an interrupt then would print a long
traceback of half-loaded modules (or crash in a half-initialised extension). Until a command
has finished its imports and installed its own handling (`cli.handled`), an interrupt prints one line and leaves with
`os._exit` (no finalisers run over half-initialised modules): 130 for Ctrl-C, 143 for SIGTERM.
Nothing has been written at that point, so there is nothing to clean up.

Later, while a store's schema is being created or migrated (Optuna's RDB tables, MLflow's alembic
migrations, a new experiment), an interrupt would leave the database half-migrated for good: every
later start then fails on it. `deferred_interrupts` holds Ctrl-C and SIGTERM for the few seconds
such a step takes and delivers the signal right after it, so an interrupt is safe at any moment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
# Added as a note to the KeyboardInterrupt of a `sweep run` stopped before its first trial started,
# and of one stopped in its report stage (every trial had ended).
BEFORE_TRIALS = "sweep: interrupted before any trial started"
IN_REPORT = "sweep: interrupted in the report stage"
# What an interrupt leaves behind, per command (one line each).
LEFT_BEHIND = {
    "run": "the trial that was running, if any, is recorded FAIL (it does not count and its parameters "
    "are retried); run the same command again to resume the study",
    "run-before-trials": "stopped before any trial started; run the same command again to start the study",
    "run-in-report": "the trials had ended; the report stage stopped (a test evaluation already stored is "
    "kept and reused); run `sweep report` with this study file, or the same command again, to finish it",
    "report": "the report stage stopped; a test evaluation already stored is kept and reused; run "
    "`sweep report` again to finish it",
    "default": "stopped; nothing was changed",
}


def _leave_at_once(signum: int, frame: FrameType | None) -> None:
    sig = signal.Signals(signum)
    os.write(2, f"interrupted ({NAMES[sig]}) while starting: nothing was changed\n".encode())
    os._exit(EXIT_CODES[sig])


def left_behind(command: str, err: BaseException) -> str:
    """The line saying what an interrupt of `command` (a function name of `pipeline.cli`) left behind."""
    notes = getattr(err, "__notes__", ())
    if command == "run" and BEFORE_TRIALS in notes:
        return LEFT_BEHIND["run-before-trials"]
    if command == "run" and IN_REPORT in notes:
        return LEFT_BEHIND["run-in-report"]
    return LEFT_BEHIND.get(command, LEFT_BEHIND["default"])


def install_early_handlers() -> None:
    """Make Ctrl-C and SIGTERM exit at once with one line (until a command replaces the handlers)."""
    for sig in EXIT_CODES:
        signal.signal(sig, _leave_at_once)


@contextlib.contextmanager
def deferred_interrupts(what: str = "the stores") -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the block runs; a signal received meanwhile is delivered to the
    handlers of before the block (e.g. `KeyboardInterrupt`) right after it ends, also when it raised.

    Only the main thread can install signal handlers; elsewhere the block runs unguarded (signals
    are delivered to the main thread anyway). Blocks nest: an inner block hands the held signal to
    the outer one. The first held signal prints one line saying the stop is coming.

    Args:
        what: names the store being opened or written, in that line (`finishing with {what}, then stopping`).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if not held:
            name = NAMES[signal.Signals(signum)]
            os.write(2, f"{name}: finishing with {what} first (seconds), then stopping\n".encode())
        held.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in EXIT_CODES}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # None: a handler installed outside Python; the default action is the closest we can restore.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])
