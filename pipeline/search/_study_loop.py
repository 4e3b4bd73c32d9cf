"""The run of trials: `study.optimize` with Optuna callbacks until the study has what it needs,
with any number of workers on one study.

- `n_trials` counts finished trials of the search (COMPLETE + PRUNED, `stopping.counted`: seed
  re-runs and the linear probe are extra); FAIL trials do not count. `max_failed_trials` bounds a
  failing run (`FailureBudget`); `study.timeout` stops starting trials; a grid study stops when
  every point has run. The seed re-runs follow once `n_trials` is reached (`baselines.run_reruns`).
- `n_trials` is exact with many workers: after each trial a worker starts another only while the
  search's trials finished, running or queued (`claimed`) are fewer than `n_trials` (`TrialClaims`); a
  worker that stops short of `n_trials` waits for the other workers' running trials, which either
  finish or are found dead and re-queued (`pipeline.distributed.DeadTrials`), and runs the re-queued
  ones. Two workers that check in the same instant can still each start one: trials finished beyond
  `n_trials` are the "overshoot" the report states (`overshoot`).

Like `pipeline.search`, this speaks only Optuna's public API and knows nothing of MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import StudyConfig
from pipeline.distributed import DeadTrials
from pipeline.search._events import TrialObserver
from pipeline.search._samplers import grid_exhausted
from pipeline.search._stopping import FailureBudget, counted, is_extra
from pipeline.search._tune import Objective, count
from pipeline.training import Prepared

# What a worker counts before starting another trial: finished, being run, or queued to run.
CLAIMED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def claimed(study: optuna.Study) -> int:
    """Trials of the search (not `stopping.is_extra`) finished, running or queued."""
    return sum(not is_extra(t) for t in study.get_trials(deepcopy=False, states=CLAIMED_STATES))


class TrialClaims:
    """Optuna callback, the check that keeps `n_trials` exact across workers: after each trial,
    sweep for dead trials of other workers, then stop starting trials once the search's trials
    finished, running or queued (`claimed`) reach `n_trials`. A worker that has just re-queued
    a dead trial's parameters goes on: it runs them next (Optuna hands out queued trials first).

    Args:
        n_trials: `study.n_trials`.
        dead: finds dead trials (None: no sweep).
    """

    def __init__(self, n_trials: int, dead: DeadTrials | None) -> None:
        self.n_trials, self.dead = n_trials, dead

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.dead is not None and self.dead.sweep():
            return
        if claimed(study) >= self.n_trials:
            study.stop()


def overshoot(trials: Sequence[FrozenTrial], n_trials: int) -> int:
    """Counted trials (COMPLETE + PRUNED, not extra) beyond `n_trials`: started by workers in the
    same instant as the last counted one (see the module doc); 0 when the study did not exceed it."""
    return max(0, counted(trials) - n_trials)


def _stopped(study: optuna.Study, cfg: StudyConfig, budget: FailureBudget, deadline: float | None) -> str | None:
    if counted(study) >= cfg.study.n_trials:
        return "n_trials reached"
    if budget.spent:
        return "too many failed trials"
    if grid_exhausted(study, cfg):
        return "grid exhausted"
    if deadline is not None and time.monotonic() >= deadline:
        return "timeout"
    return None


def optimize(
    study: optuna.Study,
    cfg: StudyConfig,
    prep: Prepared,
    observers: Sequence[TrialObserver],
    *,
    dead: DeadTrials | None = None,
    heartbeat: float | None = None,
    poll: float = 2.0,
) -> str:
    """Run trials until `n_trials` counted trials exist, the timeout passes, too many fail, or the
    grid is exhausted; `study.optimize` with Optuna's callbacks, repeated while other workers' trials
    may still need this worker (module doc).

    Each finished trial is checked: `TrialClaims` (dead trials, then `claimed` against
    `n_trials`), the failure budget, and the grid sampler's own stop. `study.timeout` (seconds)
    stops starting new trials.

    Args:
        dead: finds other workers' dead trials (after each trial and while waiting); None: no sweep.
        heartbeat: seconds between the trial's own heartbeats, for storages without Optuna's (None: off).
        poll: seconds between looks at the study while waiting for other workers' trials.

    Returns:
        Why it stopped: "n_trials reached", "timeout", "too many failed trials" or "grid exhausted".

    Raises:
        KeyboardInterrupt (`Interrupted` for SIGTERM): after the running trial is recorded FAIL.
    """
    s = cfg.study
    deadline = None if s.timeout is None else time.monotonic() + s.timeout
    budget = FailureBudget(s.max_failed_trials, count(study, (TrialState.FAIL,)), observers)
    objective = Objective(cfg, prep, observers, heartbeat)
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [TrialClaims(s.n_trials, dead), budget]
    told = stalled = False
    while (reason := _stopped(study, cfg, budget, deadline)) is None:
        queued = dead.sweep() if dead is not None else []
        running = count(study, (TrialState.RUNNING,))
        # Queued trials this worker did not queue are run by the worker that did, at once; only
        # when they still wait a poll later with nothing running (that worker died) are they run here.
        if queued or claimed(study) < s.n_trials or (stalled and not running):
            stalled = False
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            study.optimize(objective, timeout=remaining, callbacks=callbacks, catch=(Exception,), gc_after_trial=True)
            continue
        stalled = not running
        if running and not told:
            for observer in observers:
                observer.message(
                    f"waiting for {running} trial(s) of other workers: they finish, or are found dead and re-run here"
                )
            told = True
        time.sleep(poll)
    return reason
