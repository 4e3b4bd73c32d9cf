"""Trials whose process died: detect them, mark them FAIL and re-queue their parameters once.

A RUNNING trial is dead when
- its Optuna heartbeat is older than the storage's grace period (`fail_stale_trials`: RDB storages
  opened with a heartbeat, any machine);
- its own heartbeat (`HEARTBEAT_ATTR`, written by `TrialHeartbeat` for storages that have no Optuna
  heartbeat: the gRPC proxy, journal files) is older than the grace period, any machine;
- it was started on this host by a process that no longer exists (`psutil.pid_exists`, and its
  creation time against a reused pid: no need to wait for the grace period after a `kill -9`). The
  host is `$SWEEP_HOST` when set (a container's or a test's stand-in for another machine), else the
  host name.

`DeadTrials.sweep` fails such trials with `study.tell(number, state=FAIL)` (public API); the storage
lets only one process move a trial out of RUNNING, so only the process whose tell succeeded
re-queues its parameters (`RetryHeartbeatStaleTrialCallback`, the same record Optuna's heartbeat
callback writes): a dead trial is retried once however many workers notice it. Workers sweep after
each of their trials and while they wait for others to finish (`pipeline.search.optimize`).

Own heartbeats compare wall clocks of different hosts: keep them within a few seconds (NTP) and the
grace period well above that. A re-queued trial inherits the dead trial's user attrs; records of this
module name the trial they belong to, so inherited ones are never mistaken for the retry's own.

`recover` at a worker's start also re-queues FAIL trials that died or were interrupted (Ctrl-C,
SIGTERM) and were not retried yet; trials that failed on their own (NaN loss, a broken image) are
not: they would fail again. Call it under the study's start lock (`pipeline.distributed`).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import optuna
import psutil
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pipeline.core import first_line

RETRIED_ATTR = "retried_trials"  # study user attr: numbers of the FAIL trials already re-queued
HOST_ATTR = "host"  # trial user attrs naming the process that runs the trial
PID_ATTR = "pid"
OWNER_ATTR = "worker"  # trial user attr {"trial": number, "host": ..., "pid": ...} of the run that owns it
HEARTBEAT_ATTR = "heartbeat_at"  # trial user attr {"trial": number, "at": Unix seconds}
# Written by the objective when a trial fails: recovery tells a dead trial from one that failed on its own.
FAIL_REASON_ATTR = "fail_reason"  # first line of the error
INTERRUPTED_ATTR = "interrupted"  # True: stopped by Ctrl-C / SIGTERM
HOST_ENV = "SWEEP_HOST"

logger = logging.getLogger(__name__)


def host_name() -> str:
    """This worker's host name: `$SWEEP_HOST` when set, else `socket.gethostname()`."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def owner_record(number: int) -> dict[str, object]:
    """The `OWNER_ATTR` value a trial's process records when it starts trial `number`."""
    return {"trial": number, "host": host_name(), "pid": os.getpid()}


def _own(trial: FrozenTrial, attr: str) -> dict | None:
    """The trial's record `attr` when it was written for this trial (not inherited by a retry)."""
    value = trial.user_attrs.get(attr)
    return value if isinstance(value, dict) and value.get("trial") == trial.number else None


def _dead_here(trial: FrozenTrial, host: str) -> bool:
    owner = trial.user_attrs.get(OWNER_ATTR)
    if isinstance(owner, dict) and owner.get("trial") != trial.number:
        return False  # inherited by a retry that has not recorded its own process yet
    pid = trial.user_attrs.get(PID_ATTR)
    return trial.user_attrs.get(HOST_ATTR) == host and isinstance(pid, int) and process_gone(pid, trial.datetime_start)


def _heartbeat_stale(trial: FrozenTrial, grace_period: float, now: float) -> bool:
    beat = _own(trial, HEARTBEAT_ATTR)
    return beat is not None and now - float(beat["at"]) > grace_period


@dataclass
class DeadTrials:
    """Finds and fails the dead trials of one study; also an Optuna callback (sweeps after each trial).

    Args:
        storage: the study's storage (pass the heartbeat-enabled `RDBStorage` the study was opened
            with so that Optuna's stale heartbeats are detected too).
        study_name: the stored study.
        grace_period: seconds without an own heartbeat after which a trial is dead.
        max_retries: how many times one trial's parameters may be re-run.
    """

    storage: BaseStorage
    study_name: str
    grace_period: float
    max_retries: int
    _study: optuna.Study | None = field(default=None, init=False, repr=False)

    def quiet_study(self) -> optuna.Study:
        """The study with a plain sampler: finishing a trial with `tell` runs the sampler's
        `after_trial`, and a grid sampler's would try to stop an optimisation that is not running.
        Loaded once and kept, so Optuna's cache of finished trials serves every later sweep."""
        if self._study is None:
            self._study = optuna.load_study(
                study_name=self.study_name, storage=self.storage, sampler=optuna.samplers.RandomSampler()
            )
        return self._study

    def sweep(self) -> list[int]:
        """Fail the dead RUNNING trials; returns the numbers of those this call failed and re-queued.

        Trials failed by Optuna's own heartbeat check are re-queued by the storage's stale-trial
        callback (`pipeline.distributed.open_storage`); they are in the list when their re-queued trial
        appeared during this call (two workers checking in the same instant may both list one).
        """
        study = self.quiet_study()
        waiting = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
        optuna.storages.fail_stale_trials(study)
        queued = [
            RetryHeartbeatStaleTrialCallback.retry_history(t)[-1]
            for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if t.number not in waiting and RetryHeartbeatStaleTrialCallback.retry_history(t)
        ]
        host, now = host_name(), time.time()
        retry = RetryHeartbeatStaleTrialCallback(max_retry=self.max_retries)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not (_dead_here(t, host) or _heartbeat_stale(t, self.grace_period, now)):
                continue
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another worker failed it first: that one re-queues it
            failed = study.get_trials(deepcopy=True)[t.number]
            if len(RetryHeartbeatStaleTrialCallback.retry_history(failed)) < self.max_retries:
                retry(study, failed)
                queued.append(t.number)
        return queued

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sweep()


def recover(storage: BaseStorage, study_name: str, max_retries: int, grace_period: float | None = None) -> list[int]:
    """Fail the dead trials of `study_name` and re-queue the parameters of dead or interrupted ones.

    Args:
        storage: the study's storage (see `DeadTrials`).
        study_name: the stored study.
        max_retries: how many times one trial's parameters may be re-run.
        grace_period: seconds without an own heartbeat after which a trial is dead (None: only
            Optuna's heartbeat and this host's process ids decide).

    Returns:
        Numbers of the FAIL trials whose parameters were re-queued now (ascending).
    """
    dead = DeadTrials(storage, study_name, float("inf") if grace_period is None else grace_period, max_retries)
    queued = dead.sweep()
    study = dead.quiet_study()
    trials = study.get_trials(deepcopy=True)
    done = set(study.user_attrs.get(RETRIED_ATTR, [])) | set(queued)
    # Trials already re-queued elsewhere (e.g. by the heartbeat check's own retry callback).
    done |= {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
    for t in trials:
        # The callback re-queues a trial only while its retry chain is at most `max_retries` long.
        allowed = len(RetryHeartbeatStaleTrialCallback.retry_history(t)) < max_retries
        if t.state == TrialState.FAIL and died(t) and t.number not in done and allowed:
            retry(study, t)
            queued.append(t.number)
    if queued:
        study.set_user_attr(RETRIED_ATTR, sorted(set(study.user_attrs.get(RETRIED_ATTR, [])) | set(queued)))
    return sorted(queued)


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
    return not trial.user_attrs.get(FAIL_REASON_ATTR) or bool(trial.user_attrs.get(INTERRUPTED_ATTR))


class TrialHeartbeat:
    """While a trial runs, record `HEARTBEAT_ATTR` every `interval` seconds from a daemon thread.

    For storages without Optuna heartbeats (`pipeline.distributed.heartbeat_supported` is False);
    `interval=None` does nothing. Use as `with TrialHeartbeat(trial, 30): ...`: the first beat is
    written on entry, the thread stops on exit, before Optuna records the trial's end.
    """

    def __init__(self, trial: optuna.Trial, interval: float | None) -> None:
        self.trial, self.interval = trial, interval
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def beat(self) -> None:
        """Record one heartbeat now."""
        self.trial.set_user_attr(HEARTBEAT_ATTR, {"trial": self.trial.number, "at": time.time()})

    def __enter__(self) -> TrialHeartbeat:
        if self.interval is None:
            return self
        self.beat()
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-trial-{self.trial.number}", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        assert self.interval is not None
        keep_beating(self.beat, self.stop, self.interval, f"trial {self.trial.number}")

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def keep_beating(beat: Callable[[], None], stop: threading.Event, interval: float, what: str) -> None:
    """Call `beat` every `interval` seconds until `stop` is set, in a heartbeat thread.

    A storage that fails a beat (server restarting, network blip) must not end the work it keeps
    alive: the next beat retries. The first failure of a streak is logged as a warning naming
    `what` and the reason, and the recovery once beats go through again, so a heartbeat that keeps
    failing (and lets others take the work for dead) is never silent. A trial failed elsewhere
    (`UpdateFinishedTrialError`: taken for dead) ends the loop: nothing is left to keep alive.
    """
    failing = False
    while not stop.wait(interval):
        try:
            beat()
        except optuna.exceptions.UpdateFinishedTrialError:
            return
        except Exception as err:  # noqa: BLE001  any storage error; the next beat retries
            if not failing:
                logger.warning("heartbeat of %s failed (%s); retrying every %.0f s", what, first_line(err), interval)
            failing = True
            continue
        if failing:
            logger.warning("heartbeat of %s goes through again", what)
        failing = False
