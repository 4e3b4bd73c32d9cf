"""Trial events: what a study announces while it runs, and the observer protocol.

`pipeline.search` announces; `pipeline.tracking` (the MLflow observer) and `pipeline.cli` (the
progress display) listen; `pipeline.stages` wires them. Events are frozen values, so an
observer can keep them and never changes what another one sees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import StudyConfig
from pipeline.training import EpochResult


@dataclass(frozen=True)
class TrialStarted:
    """A trial has its parameters and is about to train."""

    number: int
    params: dict[str, Any]  # the sampled values, by search-space name
    config: StudyConfig  # the study with the sampled values applied: what the trial runs
    retry_of: int | None  # number of the FAIL trial whose parameters this one re-runs
    # Selection roles from the trial's user attrs (`baseline`, `rerun_of`, `seed_index`), if any.
    roles: Mapping[str, Any] = field(default_factory=dict)
    # Records one user attr on the trial (`record(key, value)`), e.g. the id of the run an observer
    # made for it (`pipeline.search.RUN_ID_ATTR`); keys are listed in `TrialRecord`.
    record: Callable[[str, Any], None] = field(default=lambda key, value: None, repr=False, compare=False)


@dataclass(frozen=True)
class TrialEnded:
    """A trial is over; `state` is the Optuna state it ends in: COMPLETE, PRUNED or FAIL."""

    number: int
    state: str
    metric: str  # `study.metric`
    best_value: float | None  # best `metric` over the epochs run; None when none ran
    best_epoch: int | None  # set for COMPLETE trials: the epoch whose weights are the checkpoint
    epochs_run: int
    seconds: float  # wall-clock seconds of the objective call
    reason: str | None  # FAIL: why, one line
    interrupted: bool  # FAIL by Ctrl-C or SIGTERM


class TrialObserver:
    """What a study announces. Every method is a no-op here: observers override what they need.

    Observers return nothing; one that has something to keep on the trial (the MLflow observer's
    run id) passes it to `TrialStarted.record`. They are called in the order given, in the trial's
    process.
    """

    def message(self, text: str) -> None:
        """A study-level line for the user (data warnings, a store outage, why the run stops)."""

    def images_scanned(self, done: int, total: int) -> None:
        """Pre-flight progress: `done` of `total` image files decoded."""

    def trial_started(self, event: TrialStarted) -> None:
        """Called once the trial's parameters are sampled, before training."""

    def epoch_finished(self, number: int, result: EpochResult) -> None:
        """Called after each epoch of trial `number`, before the pruner decides."""

    def trial_ended(self, event: TrialEnded) -> None:
        """Called once per trial, whatever its end (also when it failed before starting)."""
