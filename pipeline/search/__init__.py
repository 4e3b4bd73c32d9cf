"""Optuna's side: the stored study and the objective (`open_study`, `optimize`), samplers and
pruners by name, trial events announced to observers (`TrialObserver`), baselines (the linear probe,
the seed recipe), seed re-runs and what a trial stores in its user attrs (its epoch history).
"""

from pipeline.search._baselines import add_baselines, plan_line, resume_line, run_reruns
from pipeline.search._events import TrialEnded, TrialObserver, TrialStarted
from pipeline.search._history import epoch_history
from pipeline.search._record import BASELINE_ATTR, RUN_ID_ATTR, SYNCED_RUNS_ATTR, TrialRecord, role_words, run_id_of
from pipeline.search._selection import candidate_table, choose_champion, role
from pipeline.search._stopping import same_failure
from pipeline.search._study_loop import optimize, overshoot
from pipeline.search._tune import Interrupted, count, grace_period, load_existing, open_storage, open_study

__all__ = [
    "BASELINE_ATTR",
    "Interrupted",
    "RUN_ID_ATTR",
    "SYNCED_RUNS_ATTR",
    "TrialEnded",
    "TrialObserver",
    "TrialRecord",
    "TrialStarted",
    "add_baselines",
    "candidate_table",
    "choose_champion",
    "count",
    "epoch_history",
    "grace_period",
    "load_existing",
    "open_storage",
    "open_study",
    "plan_line",
    "resume_line",
    "optimize",
    "overshoot",
    "role",
    "role_words",
    "run_id_of",
    "run_reruns",
    "same_failure",
]
