"""Terminal progress for `sweep run`: a rich live display on a TTY, plain lines otherwise."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.tune import Reporter

_STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}


class RichReporter(Reporter):
    """Bars for trials (finished / n_trials) and the current trial's epochs; one line per trial.

    `quiet=True` (or stderr not being a terminal) prints only the per-trial lines and warnings.
    """

    def __init__(self, n_trials: int, quiet: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.live = not quiet and self.console.is_terminal
        self.quiet = quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console, disable=not self.live, transient=False)
        self.trials = self.progress.add_task("trials", total=n_trials, info="")
        self.epochs = None
        self.scan = None
        self.params: dict[int, str] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def preflight(self, done: int, total: int) -> None:
        if self.scan is None:
            self.scan = self.progress.add_task("scanning images", total=total, info="")
        self.progress.update(self.scan, completed=done)
        if done == total:
            self.progress.remove_task(self.scan)

    def trial_start(self, number: int, params: dict, epochs: int) -> None:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        self.params[number] = shown
        if self.epochs is not None:
            self.progress.remove_task(self.epochs)
        self.epochs = self.progress.add_task(f"trial {number} epochs", total=epochs, info="")
        if not self.quiet and not self.live:
            self.console.print(f"trial {number} started: {shown}")

    def epoch(self, number: int, result) -> None:
        if not self.live and not self.quiet:  # logs: one line per epoch, so long trials are not silent
            self.console.print(f"trial {number} epoch {result.epoch}: val_accuracy {result.val_accuracy:.4f} "
                               f"val_loss {result.val_loss:.4f} train_loss {result.train_loss:.4f} "
                               f"({result.seconds:.1f} s)", markup=False)
        if self.epochs is not None:
            self.progress.update(self.epochs, advance=1,
                                 info=f"val_acc {result.val_accuracy:.3f}  loss {result.train_loss:.3f}")

    def trial_end(self, number: int, state: str, value: float | None, note: str = "") -> None:
        if state in ("COMPLETE", "PRUNED"):
            self.progress.update(self.trials, advance=1)
        shown = "-" if value is None else f"{value:.4f}"
        extra = f" ({note})" if note else ""
        params = f"  {self.params.get(number, '')}" if self.live else ""  # no start line when live
        self.console.print(f"trial {number} [{_STATE_STYLE[state]}]{state}[/] best {shown}{extra}{params}")

    def message(self, text: str) -> None:
        self.console.print(f"[yellow]{text}[/]")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
