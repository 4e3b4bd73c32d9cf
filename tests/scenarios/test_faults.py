"""Faults during a sweep, at process level: Ctrl-C, SIGTERM, kill -9, then resume.

Each test starts the real CLI on a tiny study whose trials are long enough to be interrupted
mid-training, interrupts it once the first epoch is stored, and resumes with the same command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from pipeline.config import store_lock

from conftest import study_dict, write_study


def _cli(study: Path, home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", str(study), "--no-report", *args]


def _env(home: Path) -> dict:
    return {**os.environ, "SWEEP_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true"}


def _storage(home: Path) -> str:
    return f"sqlite:///{home / 'optuna.db'}"


def _wait_for_first_epoch(proc: subprocess.Popen, home: Path, timeout: float = 120) -> None:
    """Poll the Optuna storage until trial 0 has reported an epoch (so it is mid-training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        # Not before the sweep has created the store, and under its creation lock: opening a
        # store while another process creates its schema races that creation.
        if (home / "optuna.db").exists():
            try:
                with store_lock(_storage(home)):
                    trials = optuna.load_study(study_name="tiny", storage=_storage(home)).get_trials()
                if trials and trials[0].intermediate_values:
                    return
            except KeyError:  # the study is not stored yet
                pass
            except SQLAlchemyError:  # the sweep holds the database for a write
                pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail("trial 0 never reported an epoch")


def _nested(home: Path) -> tuple[list, dict[int, object]]:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = {int(r.data.tags["sweep.trial_number"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    return parents, nested


@pytest.fixture
def long_study(tmp_path, image_root):
    # 200 epochs: far longer than the test waits, so the signal always lands mid-trial.
    tree = study_dict(image_root, study={"n_trials": 2}, training={"epochs": 200})
    return write_study(tmp_path / "study.yaml", tree)


def _interrupt_then_resume(tmp_path, long_study, sig: int) -> tuple[subprocess.CompletedProcess, str]:
    home = tmp_path / "mlruns"
    proc = subprocess.Popen(
        _cli(long_study, home), cwd=tmp_path, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_first_epoch(proc, home)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    resumed = subprocess.run(
        # The resume trains shorter: a changed recipe must be accepted explicitly (it is refused
        # otherwise, see test_outcomes), which is also what a user finishing quickly would do.
        _cli(long_study, home, "--set", "training.epochs=1", "--accept-changes"),
        cwd=tmp_path,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, stderr, resumed


@pytest.mark.parametrize(
    "sig, code, reason",
    [
        (signal.SIGINT, 130, "interrupted (Ctrl-C)"),
        (signal.SIGTERM, 143, "interrupted (SIGTERM)"),
    ],
)
def test_interrupt_records_fail_and_resume_retries(tmp_path, long_study, sig, code, reason):
    home = tmp_path / "mlruns"
    proc, stderr, resumed = _interrupt_then_resume(tmp_path, long_study, sig)
    assert proc.returncode == code
    assert "Traceback" not in stderr
    assert "run the same command again to resume" in stderr
    assert resumed.returncode == 0, resumed.stderr
    said = (resumed.stdout + resumed.stderr).splitlines()
    assert [line for line in said if line.startswith(("plan:", "resuming"))] == [
        "plan: 2 trials (sampled)",
        "resuming study 'tiny': 0 of 2 trials done, trial 0 re-queued",
    ]

    trials = optuna.load_study(study_name="tiny", storage=_storage(home)).get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[0].user_attrs["fail_reason"] == reason
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 2
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].params == trials[0].params
    assert retry[0].state == TrialState.COMPLETE and retry[0].user_attrs["fail_reason"] is None

    parents, nested = _nested(home)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert nested[0].info.status == "KILLED"
    assert nested[0].data.tags["sweep.fail_reason"] == reason
    assert nested[retry[0].number].data.tags["sweep.retry_of"] == "0"


def test_kill_9_stale_trial_is_failed_closed_and_retried(tmp_path, long_study):
    home = tmp_path / "mlruns"
    proc, _, resumed = _interrupt_then_resume(tmp_path, long_study, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert resumed.returncode == 0, resumed.stderr

    trials = optuna.load_study(study_name="tiny", storage=_storage(home)).get_trials()
    assert trials[0].state == TrialState.FAIL
    assert not any(t.state == TrialState.RUNNING for t in trials)
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].params == trials[0].params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2

    parents, nested = _nested(home)
    assert len(parents) == 1, "the parent run is reused, not duplicated"
    assert parents[0].info.status == "FINISHED"
    assert nested[0].info.status == "FAILED"
    assert "heartbeat lost" in nested[0].data.tags["sweep.fail_reason"]
