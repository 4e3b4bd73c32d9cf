"""Many machines, one study: two workers run the same command against PostgreSQL storage."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import study_dict, write_study


def test_two_workers_share_one_study_and_one_parent_run(tmp_path, image_root, postgres):
    storage, tracking = postgres("optuna"), postgres("mlflow")
    # Create both schemas once: concurrent first-time migrations race in any database.
    optuna.storages.RDBStorage(storage)
    MlflowClient(tracking).search_experiments()
    tree = study_dict(image_root, study={"n_trials": 6}, training={"epochs": 6})
    study_file = write_study(tmp_path / "study.yaml", tree)
    env = {**os.environ, "SWEEP_HOME": str(tmp_path / "mlruns"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        str(study_file),
        "--storage",
        storage,
        "--tracking-uri",
        tracking,
        "--no-report",
        "--quiet",
    ]
    workers = [
        subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # Each worker checks the count before starting a trial, so together they overshoot by <= 1.
    assert 6 <= len(finished) <= 7 and len(finished) == len(trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2, "both workers ran trials"

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, "the workers agree on one parent run"
    assert parents[0].info.status == "FINISHED"
    assert sorted(int(r.data.tags["sweep.trial_number"]) for r in nested) == [t.number for t in trials]
    assert {r.data.tags["mlflow.parentRunId"] for r in nested} == {parents[0].info.run_id}


def test_two_workers_on_a_new_sqlite_store_both_run_distinct_trials(tmp_path, image_root):
    # Both create the embedded stores at once: their schema migrations must not collide.
    study_file = write_study(
        tmp_path / "study.yaml", study_dict(image_root, study={"n_trials": 6}, training={"epochs": 2})
    )
    env = {**os.environ, "SWEEP_HOME": str(tmp_path / "mlruns"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(study_file), "--no-report", "--quiet"]
    workers = [
        subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}").trials
    assert 6 <= len(trials) <= 7 and all(t.state == TrialState.COMPLETE for t in trials)
    # Each trial's sampler is seeded from its trial number, unique across workers: no replays,
    # not even of the first draws of two processes starting in the same instant.
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(drawn)) == len(drawn)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
