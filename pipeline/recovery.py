"""Trials whose process died: mark them FAIL and re-queue their parameters.

A RUNNING trial is dead when its heartbeat is older than the storage's grace period (Optuna's
`fail_stale_trials`, any machine), or when it was started on this host by a process that no
longer exists (`psutil.pid_exists`, its creation time against a reused pid: no need to wait for
the grace period after a `kill -9`).
Dead and interrupted (Ctrl-C, SIGTERM) trials are re-queued once each, up to `max_retries`
deep, with Optuna's `RetryFailedTrialCallback`; trials that failed on their own (NaN loss, a
broken image) are not: they would fail again.
"""

from __future__ import annotations

import datetime
import socket

import optuna
import psutil
from optuna.storages import BaseStorage, RetryFailedTrialCallback
from optuna.trial import FrozenTrial, TrialState

RETRIED_ATTR = "retried_trials"  # study user attr: numbers of the FAIL trials already re-queued
HOST_ATTR = "host"  # trial user attrs naming the process that runs the trial
PID_ATTR = "pid"


def recover(storage: BaseStorage | str, study_name: str, max_retries: int) -> list[int]:
    """Fail the dead trials of `study_name` and re-queue the parameters of dead or interrupted ones.

    Args:
        storage: the study's storage; pass the heartbeat-enabled `RDBStorage` the study was opened
            with so that stale heartbeats are detected.
        study_name: the stored study.
        max_retries: how many times one trial's parameters may be re-run.

    Returns:
        Numbers of the FAIL trials whose parameters were re-queued now (ascending).
    """
    # A study object of its own with a plain sampler: finishing a trial with `tell` runs the
    # sampler's `after_trial`, and a grid sampler's would try to stop an optimisation that is
    # not running.
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler())
    optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get(PID_ATTR)
        if t.user_attrs.get(HOST_ATTR) == host and isinstance(pid, int) and process_gone(pid, t.datetime_start):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)

    trials = study.get_trials(deepcopy=True)
    done = set(study.user_attrs.get(RETRIED_ATTR, []))
    # Trials already re-queued elsewhere (e.g. by the heartbeat check's own retry callback).
    done |= {n for t in trials for n in RetryFailedTrialCallback.retry_history(t)}
    retry = RetryFailedTrialCallback(max_retry=max_retries)
    queued = []
    for t in trials:
        # The callback re-queues a trial only while its retry chain is at most `max_retries` long.
        allowed = len(RetryFailedTrialCallback.retry_history(t)) < max_retries
        if t.state == TrialState.FAIL and died(t) and t.number not in done and allowed:
            retry(study, t)
            queued.append(t.number)
    if queued:
        study.set_user_attr(RETRIED_ATTR, sorted(set(study.user_attrs.get(RETRIED_ATTR, [])) | set(queued)))
    return queued


def process_gone(pid: int, since: datetime.datetime | None) -> bool:
    """True when process `pid` of this host no longer runs, or is a zombie, or the pid now
    belongs to a process created after `since` (the trial's start: the pid was reused)."""
    if not psutil.pid_exists(pid):
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        # Optuna stores naive local datetimes; `timestamp()` reads them as local time too. The
        # creation time is read up to 1 s early (whole-second boot time): never a false "gone".
        return since is not None and proc.create_time() > since.timestamp()
    except psutil.NoSuchProcess:  # it ended between the two looks
        return True


def died(trial: FrozenTrial) -> bool:
    """True for a FAIL trial that did not fail on its own: its process died (no reason recorded)
    or it was interrupted (Ctrl-C, SIGTERM)."""
    return not trial.user_attrs.get("fail_reason") or bool(trial.user_attrs.get("interrupted"))
