"""Terminal progress for `sweep run`: a rich live display on a TTY, plain lines otherwise.

`ProgressDisplay` is a `TrialObserver`: the study announces trial events and study messages,
this prints them (to stderr, so stdout keeps the results).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pipeline.cli._console import PipeSafeConsole
from pipeline.core import listening
from pipeline.registry import Prediction, display_name
from pipeline.search import TrialEnded, TrialObserver, TrialStarted
from pipeline.training import EpochResult

_STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red"}


class ProgressDisplay(TrialObserver):
    """Bars for trials (counted / n_trials) and the current trial's epochs; one line per trial.

    `quiet=True` (or stderr not being a terminal) drops the bars; without a terminal each trial
    start and epoch is one line, so logs of long trials are not silent. `quiet` keeps only the
    per-trial result lines and messages. Use as a context manager (starts/stops the live bars).
    """

    def __init__(self, n_trials: int, quiet: bool = False, console: Console | None = None) -> None:
        self.console = console or PipeSafeConsole(stderr=True, highlight=False, soft_wrap=True)
        self.live = not quiet and self.console.is_terminal
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            disable=not self.live,
            transient=False,
        )
        self.trials = self.progress.add_task("trials", total=n_trials, info="")
        self.epochs: TaskID | None = None
        self.scan: TaskID | None = None
        self.scan_start = 0.0
        self.params: dict[int, str] = {}
        self.passes = PassLines(self.progress)
        self._listening = listening(self.passes.update)

    def __enter__(self) -> ProgressDisplay:
        self.progress.start()
        if self.live:
            self._listening.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._listening.__exit__(None, None, None)
        self.progress.stop()

    def images_scanned(self, done: int, total: int) -> None:
        if self.scan is None:
            self.scan = self.progress.add_task("scanning images", total=total, info="")
            self.scan_start = time.monotonic()
            if not self.live and not self.quiet:
                self.console.print(f"scanning {total} image files (each decoded once)", markup=False)
        seconds = max(time.monotonic() - self.scan_start, 1e-9)
        self.progress.update(self.scan, completed=done, info=f"{done / seconds:.0f} files/s")
        if done == total:
            self.progress.remove_task(self.scan)
            self.scan = None
            if not self.live and not self.quiet:
                self.console.print(
                    f"scanned {total} image files in {seconds:.1f} s ({total / seconds:.0f} files/s)", markup=False
                )

    def trial_started(self, event: TrialStarted) -> None:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in event.params.items())
        self.params[event.number] = shown
        if self.epochs is not None:
            self.progress.remove_task(self.epochs)
        self.epochs = self.progress.add_task(
            f"trial {event.number} epochs", total=event.config.training.epochs, info=""
        )
        if not self.quiet and not self.live:
            self.console.print(f"trial {event.number} started: {shown}", markup=False)

    def epoch_finished(self, number: int, result: EpochResult) -> None:
        if not self.live and not self.quiet:
            self.console.print(
                f"trial {number} epoch {result.epoch}: val_accuracy {result.val_accuracy:.4f} "
                f"val_loss {result.val_loss:.4f} train_loss {result.train_loss:.4f} ({result.seconds:.1f} s)",
                markup=False,
            )
        if self.epochs is not None:
            info = f"val_acc {result.val_accuracy:.3f}  loss {result.train_loss:.3f}"
            self.progress.update(self.epochs, advance=1, info=info)

    def trial_ended(self, event: TrialEnded) -> None:
        if event.state in ("COMPLETE", "PRUNED"):
            self.progress.update(self.trials, advance=1)
        shown = "-" if event.best_value is None else f"{event.best_value:.4f}"
        extra = f" ({escape(event.reason)})" if event.reason else ""
        params = f"  {escape(self.params.get(event.number, ''))}" if self.live else ""  # no start line when live
        style = _STATE_STYLE[event.state]
        self.console.print(f"trial {event.number} [{style}]{event.state}[/] best {shown}{extra}{params}")

    def message(self, text: str) -> None:
        self.console.print(f"[yellow]{escape(text)}[/]")


class PassLines:
    """One live line per pass over images in progress (`pipeline.core.listening`): what, a bar,
    images done / total, images/s and the time left at that rate; gone when the pass ends."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, tuple[TaskID, float]] = {}  # what -> (task, start time)

    def update(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if what not in self.tasks:
            if done >= total:
                return  # an empty or already finished pass: nothing to show
            self.tasks[what] = (self.progress.add_task(f"  {what}", total=total, info=""), now)
        task, start = self.tasks[what]
        if done >= total:
            self.progress.remove_task(task)
            del self.tasks[what]
            return
        seconds = now - start
        rate = done / seconds if seconds > 0 and done else 0.0
        left = f", {_clock((total - done) / rate)} left" if rate else ""
        self.progress.update(task, completed=done, info=f"{rate:.0f} img/s{left}" if rate else "")


@contextlib.contextmanager
def passes_shown(console: Console | None = None) -> Iterator[None]:
    """Live pass lines (`PassLines`) while inside, on a terminal only (the report stage)."""
    console = console or PipeSafeConsole(stderr=True, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        yield
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
    )
    with progress, listening(PassLines(progress).update):
        yield


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_predictions(predictions: list[Prediction], as_json: bool = False) -> str | Table:
    """JSON lines (one object per file) or a rich table: file, label, probability (or why skipped)."""
    if as_json:
        return "\n".join(p.to_json() for p in predictions)
    table = Table("file", "label", "probability", box=None, pad_edge=False)
    for p in predictions:  # Text: a '[' in a file name is not rich markup
        if p.error is not None:
            table.add_row(Text(display_name(p.file), overflow="fold"), Text("(skipped)"), Text(p.error))
        else:
            table.add_row(Text(display_name(p.file), overflow="fold"), Text(str(p.label)), f"{p.probability:.4f}")
    return table
