"""When a study stops: what `n_trials` counts (re-runs and the probe do not), the failure budget,
and failures that repeat on every trial.

Optuna callbacks (called after each finished trial, as `study.optimize(callbacks=...)` does);
they only read trials and call `study.stop()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.search._events import TrialObserver
from pipeline.search._record import record

COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)  # what `n_trials` counts


class FailureBudget:
    """Optuna callback: stop the study once `limit` trials have failed in this run.

    Args:
        limit: `study.max_failed_trials`.
        failed_before: FAIL trials the study held when this run started (they do not count).
    """

    def __init__(self, limit: int, failed_before: int, observers: Sequence[TrialObserver]) -> None:
        self.limit, self.failed_before, self.observers = limit, failed_before, observers
        self.spent = False

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if (
            trial.state != TrialState.FAIL
            or len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - self.failed_before < self.limit
        ):
            return
        self.spent = True
        text = f"stopping: {self.limit} trials failed in this run (see sweep.fail_reason on their MLflow runs)"
        same = same_failure(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))[self.failed_before :])
        if same:
            text = f"stopping: {self.limit} trials failed in this run, every one with {same}"
        for observer in self.observers:
            observer.message(text)
        study.stop()


def same_failure(failed: Sequence[FrozenTrial]) -> str | None:
    """When two or more FAIL trials share one fail reason, that reason plus a hint that it does
    not depend on the sampled parameters (more trials cannot help); else None."""
    reasons = {record(t).fail_reason for t in failed}
    if len(failed) < 2 or len(reasons) != 1 or None in reasons:
        return None
    return (
        f"the same error: {reasons.pop()}; it does not depend on the sampled parameters, so more "
        "trials cannot help: fix the data, model or training setting it names and run again"
    )


def is_extra(trial: FrozenTrial) -> bool:
    """A trial outside the search's budget: a seed re-run or the linear-probe baseline (the seed
    recipe is a sampled point like any other and counts)."""
    r = record(trial)
    return r.is_rerun or r.is_probe


def counted(study: optuna.Study | Sequence[FrozenTrial]) -> int:
    """What `n_trials` counts: COMPLETE + PRUNED trials that are not re-runs or the probe (of a
    study, or of trials already read)."""
    trials = study.get_trials(deepcopy=False) if isinstance(study, optuna.Study) else study
    return sum(t.state in COUNTED_STATES and not is_extra(t) for t in trials)


def rerun_seed(data_seed: int, rerun_of: int, seed_index: int) -> int:
    """Training seed of re-run `seed_index` of trial `rerun_of`: a SeedSequence hash of the three,
    so it differs from every original's `data.seed + number` in practice and is the same on
    every worker and resume."""
    return int(np.random.SeedSequence([data_seed, rerun_of, seed_index]).generate_state(1)[0])
