"""Dead and interrupted trials: failed and re-queued once; trials that failed on their own are not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from pipeline.distributed import DeadTrials, TrialHeartbeat, recover
from pipeline.distributed._recovery import HEARTBEAT_ATTR, RETRIED_ATTR

DISTRIBUTIONS = {"lr": FloatDistribution(1e-3, 1e-1, log=True), "freeze_depth": IntDistribution(0, 2)}


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _study(tmp_path, sampler=None):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    return storage, optuna.create_study(study_name="s", storage=storage, sampler=sampler, load_if_exists=True)


def _add(study, state, number_lr, **attrs):
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            params={"lr": number_lr, "freeze_depth": 1},
            distributions=DISTRIBUTIONS,
            value=0.5 if state == TrialState.COMPLETE else None,
            user_attrs=attrs,
        )
    )


def test_dead_process_trial_is_failed_and_requeued_once(tmp_path, dead_pid):
    storage, study = _study(tmp_path)
    host = socket.gethostname()
    _add(study, TrialState.COMPLETE, 0.01)
    _add(study, TrialState.RUNNING, 0.02, host=host, pid=dead_pid)  # killed with -9 on this host
    _add(study, TrialState.RUNNING, 0.03, host="another-host", pid=dead_pid)  # its heartbeat decides
    _add(study, TrialState.FAIL, 0.04, fail_reason="non-finite loss: training loss became nan")
    _add(study, TrialState.FAIL, 0.05, fail_reason="interrupted (Ctrl-C)", interrupted=True)

    assert recover(storage, "s", max_retries=2) == [1, 4]
    trials = study.get_trials()
    assert [t.state for t in trials[:5]] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.FAIL,
        TrialState.FAIL,
    ]
    queued = trials[5:]
    assert [t.state for t in queued] == [TrialState.WAITING] * 2
    assert [t.params["lr"] for t in queued] == [0.02, 0.05]
    assert [optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) for t in queued] == [1, 4]
    assert study.user_attrs[RETRIED_ATTR] == [1, 4]

    assert recover(storage, "s", max_retries=2) == [], "a second start queues nothing again"
    assert len(study.get_trials()) == 7


def test_retries_stop_at_max_retries(tmp_path):
    storage, study = _study(tmp_path)
    _add(study, TrialState.FAIL, 0.02, interrupted=True, fail_reason="interrupted (SIGTERM)")
    assert recover(storage, "s", max_retries=0) == []
    assert recover(storage, "s", max_retries=1) == [0]
    retry = study.ask()  # the re-queued trial runs and is interrupted again
    assert retry.number == 1
    retry.set_user_attr("interrupted", True)
    retry.set_user_attr("fail_reason", "interrupted (SIGTERM)")
    study.tell(retry, state=TrialState.FAIL)
    assert recover(storage, "s", max_retries=1) == [], "trial 0's parameters ran twice: enough"
    assert recover(storage, "s", max_retries=2) == [1]
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING]


def test_failing_a_dead_trial_of_a_grid_study_does_not_stop_anything(tmp_path, dead_pid):
    # Finishing a trial runs the sampler's after_trial; a grid sampler's would call study.stop()
    # outside an optimisation (a RuntimeError) when the dead trial held the last grid point.
    grid = optuna.samplers.GridSampler({"lr": [0.02], "freeze_depth": [1]})
    storage, study = _study(tmp_path, sampler=grid)
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    trial.suggest_int("freeze_depth", 0, 2)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", dead_pid)
    assert recover(storage, "s", max_retries=1) == [0]
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]


def test_a_reused_pid_does_not_keep_a_dead_trial_running(tmp_path):
    storage, study = _study(tmp_path)
    host = socket.gethostname()
    _add(study, TrialState.RUNNING, 0.02, host=host, pid=os.getpid())  # its process still runs
    trial = study.ask()
    time.sleep(1.1)  # process start times are read up to 1 s early (whole-second boot time)
    newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # The trial names the pid of a process started after the trial: the pid was reused and
        # the trial's own process is gone.
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", newer.pid)
        assert recover(storage, "s", max_retries=1) == [1]
        assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    finally:
        newer.kill()
        newer.wait()


def _journal(tmp_path, name="s"):
    from pipeline.distributed import open_storage

    storage = open_storage(f"journal:///{tmp_path / 'optuna.journal'}")
    return storage, optuna.create_study(study_name=name, storage=storage, load_if_exists=True)


def test_a_trial_whose_own_heartbeat_stopped_is_failed_and_requeued_once_among_many_workers(tmp_path):
    # gRPC proxy and journal storages have no Optuna heartbeat: trials keep their own (`heartbeat_at`).
    storage, study = _journal(tmp_path)
    now = time.time()
    _add(study, TrialState.RUNNING, 0.02, host="elsewhere", heartbeat_at={"trial": 0, "at": now - 60})  # dead
    _add(study, TrialState.RUNNING, 0.03, host="elsewhere", heartbeat_at={"trial": 1, "at": now})  # alive
    # A retry that has not recorded its own beat yet: the beat it inherited is not its own.
    _add(study, TrialState.RUNNING, 0.04, host="elsewhere", heartbeat_at={"trial": 0, "at": now - 60})
    workers = [DeadTrials(_journal(tmp_path)[0], "s", grace_period=10, max_retries=1) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        queued = [n for found in pool.map(lambda w: w.sweep(), workers) for n in found]
    assert queued == [0], "one worker failed it and re-queued it"
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING, TrialState.WAITING]
    assert trials[3].params == trials[0].params
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[3]) == 0
    assert workers[0].sweep() == [], "nothing left to do"


def test_trial_heartbeat_keeps_a_trial_alive_until_its_process_stops_beating(tmp_path):
    storage, study = _journal(tmp_path)
    trial = study.ask()
    trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    dead = DeadTrials(storage, "s", grace_period=1.0, max_retries=1)
    with TrialHeartbeat(trial, 0.2):
        time.sleep(1.5)
        assert dead.sweep() == [], "beating: alive past the grace period"
        beats = study.get_trials()[0].user_attrs[HEARTBEAT_ATTR]
        assert beats["trial"] == 0 and time.time() - beats["at"] < 0.6
    time.sleep(1.3)  # its process "died": no beat for longer than the grace period
    assert dead.sweep() == [0]
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]
    assert TrialHeartbeat(trial, None).__enter__().thread is None, "storages with Optuna heartbeats: no thread"


def test_a_failing_heartbeat_is_said_once_per_streak_and_retried(caplog):
    import logging
    import threading

    from pipeline.distributed._recovery import keep_beating

    stop = threading.Event()
    outcomes = iter([OSError("server closed the connection"), OSError("again"), None, None])
    calls = []

    def beat():
        calls.append(1)
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        if len(calls) == 4:
            stop.set()

    with caplog.at_level(logging.WARNING, logger="pipeline.distributed._recovery"):
        keep_beating(beat, stop, 0.001, "trial 3")
    assert len(calls) == 4
    assert [r.getMessage() for r in caplog.records] == [
        "heartbeat of trial 3 failed (server closed the connection); retrying every 0 s",
        "heartbeat of trial 3 goes through again",
    ]
